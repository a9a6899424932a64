"""The Maildir++ store on a real filesystem: UIDs, flags, keywords, folders, name validation."""
from __future__ import annotations

import os
import time

import pytest

from mailsuite.mailbox.dotlock import DotLock
from mailsuite.mailbox.errors import LockBusy
from mailsuite.mailbox.maildir import UIDLIST, UidList
from mailsuite.mailbox.store import (
    FolderExists, InvalidMailboxName, MailboxError, MailStore, NoSuchFolder, NoSuchMessage,
)

BODY = b"From: a@example.net\r\nSubject: hi\r\n\r\nhello\r\n"


def deliver(maildir: str, n: int, body: bytes = BODY, start: int = 0) -> list[str]:
    """Drop files into new/ the way the delivery agent names them."""
    keys = []
    for i in range(start, start + n):
        key = f"{1700000000 + i}.M{i}P99Q{i}.testhost,S={len(body)}"
        tmp = os.path.join(maildir, "tmp", key)
        with open(tmp, "wb") as f:
            f.write(body)
        os.rename(tmp, os.path.join(maildir, "new", key))
        keys.append(key)
    return keys


@pytest.fixture
def account(tmp_path):
    acct = MailStore(str(tmp_path / "mail")).account("alice@example.org")
    acct.ensure_layout()
    return acct


def test_layout_special_use_and_subscriptions(account):
    assert account.list_folders() == ["INBOX", "Archive", "Drafts", "Junk", "Sent", "Trash"]
    assert account.special_use("Sent") == "\\Sent"
    assert account.special_use("Junk") == "\\Junk"
    assert account.special_use("INBOX") is None
    assert set(account.subscriptions()) == {"Sent", "Drafts", "Trash", "Junk", "Archive"}
    assert os.path.isfile(os.path.join(account.path, ".Sent", "maildirfolder"))
    # ensure_layout is idempotent
    account.ensure_layout()
    assert len(account.subscriptions()) == 5


def test_uids_stable_across_reopen_and_new_to_cur(account, tmp_path):
    keys = deliver(account.path, 3)
    inbox = account.folder("INBOX")
    msgs = inbox.sync()
    assert [m.uid for m in msgs] == [1, 2, 3]
    assert [m.key for m in msgs] == keys
    assert os.listdir(os.path.join(account.path, "new")) == []
    assert all(m.path.endswith(":2,") and "/cur/" in m.path for m in msgs)
    assert inbox.recent == {1, 2, 3}
    assert all(m.size == len(BODY) for m in msgs)
    validity = inbox.uidvalidity
    assert inbox.uidnext == 4

    # A fresh store (another process) sees the same UIDs and UIDVALIDITY.
    other = MailStore(str(tmp_path / "mail")).account("alice@example.org").folder("inbox")
    assert [(m.uid, m.key) for m in other.sync()] == [(m.uid, m.key) for m in msgs]
    assert other.uidvalidity == validity
    assert other.recent == frozenset()  # the first session already took \Recent
    deliver(account.path, 1, start=10)
    assert [m.uid for m in other.sync()] == [1, 2, 3, 4]
    assert other.recent == {4}
    assert [m.uid for m in inbox.sync()] == [1, 2, 3, 4]


def test_uids_never_reused_after_expunge(account, tmp_path):
    deliver(account.path, 3)
    inbox = account.folder("INBOX")
    inbox.sync()
    assert inbox.expunge([3]) == [3]
    assert [m.uid for m in inbox.sync()] == [1, 2]
    reopened = MailStore(str(tmp_path / "mail")).account("alice@example.org").folder("INBOX")
    assert reopened.uidnext == 4
    deliver(account.path, 1, start=20)
    assert [m.uid for m in reopened.sync()] == [1, 2, 4]
    header = open(os.path.join(account.path, UIDLIST)).readline()
    assert header.startswith("3 V") and " N" in header and " G" in header


def test_flags_in_file_names_and_keywords_file(account):
    deliver(account.path, 1)
    inbox = account.folder("INBOX")
    (msg,) = inbox.sync()
    stored = inbox.set_flags(msg.uid, ["\\Seen", "\\Flagged", "\\Answered", "\\Draft", "\\Deleted",
                                       "$Forwarded", "$Junk", "\\Recent"])
    assert stored == {"\\Seen", "\\Flagged", "\\Answered", "\\Draft", "\\Deleted",
                      "$Forwarded", "$Junk"}
    (name,) = os.listdir(os.path.join(account.path, "cur"))
    assert name == msg.key + ":2,DFRSTab"
    with open(os.path.join(account.path, "dovecot-keywords")) as f:
        assert f.read() == "0 $Forwarded\n1 $Junk\n"
    assert inbox.remove_flags(msg.uid, ["$Forwarded", "\\Seen"]) == {
        "\\Flagged", "\\Answered", "\\Draft", "\\Deleted", "$Junk"}
    (name,) = os.listdir(os.path.join(account.path, "cur"))
    assert name == msg.key + ":2,DFRTb"
    assert inbox.add_flags(msg.uid, ["\\Seen"]) >= {"\\Seen"}
    # Another tool's unknown letter (P = passed) survives our flag changes.
    os.rename(os.path.join(account.path, "cur", msg.key + ":2,DFRSTb"),
              os.path.join(account.path, "cur", msg.key + ":2,PS"))
    inbox.sync()
    assert inbox.get(msg.uid).flags == {"\\Seen"}
    inbox.add_flags(msg.uid, ["\\Flagged"])
    assert os.listdir(os.path.join(account.path, "cur")) == [msg.key + ":2,FPS"]


def test_append_copy_move_expunge(account):
    inbox = account.folder("INBOX")
    when = 1600000000.0
    uid = inbox.append(b"Subject: appended\r\n\r\nbody\r\n", ["\\Seen", "$label1"], when)
    assert uid == 1
    info = inbox.get(uid)
    assert info.internaldate == when and info.size == 27
    assert info.flags == {"\\Seen", "$label1"}
    assert os.path.getmtime(info.path) == when
    with inbox.open_message(uid) as f:
        assert f.read() == b"Subject: appended\r\n\r\nbody\r\n"
    assert os.listdir(os.path.join(account.path, "tmp")) == []

    deliver(account.path, 2)
    inbox.sync()
    sent = account.folder("Sent")
    assert inbox.copy([1, 2], sent) == [(1, 1), (2, 2)]
    copied = sent.sync()
    assert copied[0].flags == {"\\Seen", "$label1"} and copied[0].internaldate == when
    assert "$label1" in sent.keywords
    assert inbox.move([3], sent) == [(3, 3)]
    assert [m.uid for m in inbox.sync()] == [1, 2]
    moved = sent.get(3)
    assert moved.key in {m.key for m in sent.sync()}
    inbox.set_flags(2, ["\\Deleted"])
    assert inbox.expunge() == [2]
    assert [m.uid for m in inbox.sync()] == [1]
    assert inbox.expunge([99]) == []
    with pytest.raises(NoSuchMessage):
        inbox.open_message(2)
    with pytest.raises(NoSuchMessage):
        inbox.set_flags(2, ["\\Seen"])


def test_append_from_file_object(account, tmp_path):
    src = tmp_path / "big.eml"
    data = b"Subject: big\r\n\r\n" + b"x" * 3_000_000 + b"\r\n"
    src.write_bytes(data)
    inbox = account.folder("INBOX")
    with open(src, "rb") as f:
        uid = inbox.append(f)
    assert inbox.get(uid).size == len(data)
    with inbox.open_message(uid) as f:
        assert f.read() == data


def test_folder_create_rename_delete(account):
    account.create_folder("Archive/2026")
    assert os.path.isdir(os.path.join(account.path, ".Archive.2026", "cur"))
    account.create_folder("Café")
    assert os.path.isdir(os.path.join(account.path, ".Caf&AOk-"))
    account.create_folder("v1.2")  # a '.' inside a name must not create a hierarchy level
    assert "v1.2" in account.list_folders()
    assert os.path.isdir(os.path.join(account.path, ".v1&AC4-2"))
    with pytest.raises(FolderExists):
        account.create_folder("Sent")
    with pytest.raises(FolderExists):
        account.create_folder("inbox")
    account.subscribe("Archive/2026")
    account.rename_folder("Archive", "Old")
    folders = account.list_folders()
    assert "Old" in folders and "Old/2026" in folders and "Archive/2026" not in folders
    assert "Old/2026" in account.subscriptions()
    account.delete_folder("Old/2026")
    assert "Old/2026" not in account.list_folders()
    assert not any(n.startswith("..") for n in os.listdir(account.path))
    with pytest.raises(NoSuchFolder):
        account.folder("Old/2026")
    with pytest.raises(MailboxError):
        account.delete_folder("INBOX")
    with pytest.raises(NoSuchFolder):
        account.delete_folder("Nope")


def test_rename_inbox_moves_messages(account):
    deliver(account.path, 2)
    account.folder("INBOX").sync()
    account.rename_folder("INBOX", "Old mail")
    assert account.folder("INBOX").sync() == []
    assert len(account.folder("Old mail").sync()) == 2


@pytest.mark.parametrize("name", [
    "..", "../x", "a/../../b", "x/..", ".hidden", "a/.b", "a\\b", "a//b", "/abs", "trail/",
    "ctl\x01", "new\nline", "tab\tx", "del\x7f", "", "wild*", "wild%", " lead",
])
def test_invalid_names_create_nothing_outside(account, tmp_path, name):
    before = sorted(os.listdir(tmp_path))
    before_domain = sorted(os.listdir(os.path.dirname(account.path)))
    with pytest.raises(InvalidMailboxName):
        account.create_folder(name)
    with pytest.raises(InvalidMailboxName):
        account.folder(name)
    with pytest.raises((InvalidMailboxName, NoSuchFolder)):
        account.rename_folder("Sent", name)
    assert sorted(os.listdir(tmp_path)) == before
    assert sorted(os.listdir(os.path.dirname(account.path))) == before_domain
    assert account.list_folders() == ["INBOX", "Archive", "Drafts", "Junk", "Sent", "Trash"]


def test_invalid_account_addresses(tmp_path):
    store = MailStore(str(tmp_path))
    for bad in ["../../etc@example.org", "alice@..", "a/b@example.org", "noat"]:
        with pytest.raises(InvalidMailboxName):
            store.account(bad)


def test_stale_dotlock_taken_over_and_live_one_refused_at_once(account):
    path = os.path.join(account.path, UIDLIST)
    lock = path + ".lock"
    open(lock, "w").close()
    old = time.time() - 300
    os.utime(lock, (old, old))
    deliver(account.path, 1)
    assert [m.uid for m in account.folder("INBOX").sync()] == [1]
    assert not os.path.exists(lock)
    # A live lock: a second locker is refused at once (it waits on the reactor, not here).
    with DotLock(path):
        with pytest.raises(LockBusy):
            with DotLock(path):
                pass


def test_uidlist_parses_dovecot_extensions_and_version_1():
    ul = UidList.parse(b"3 V1275660208 N25022 G3085f01b7f11094c501100008c4a11c1\n"
                       b"25006 :1276528487.M364837P9451.kurkku,S=1355,W=1394:2,\n"
                       b"25017 W2481 S2400 :1276533073.M242911P3632.kurkku:2,F\n")
    assert ul.uidvalidity == 1275660208 and ul.nextuid == 25022
    assert ul.uids == {"1276528487.M364837P9451.kurkku,S=1355,W=1394": 25006,
                       "1276533073.M242911P3632.kurkku": 25017}
    again = UidList.parse(ul.serialize())
    assert again.uids == ul.uids and again.extra == {"1276533073.M242911P3632.kurkku":
                                                     "W2481 S2400"}
    v1 = UidList.parse(b"1 1000 7\n5 msg1:2,S\n6 msg2\n")
    assert (v1.uidvalidity, v1.nextuid, v1.uids) == (1000, 7, {"msg1": 5, "msg2": 6})


def test_state_token_changes_on_delivery(account):
    inbox = account.folder("INBOX")
    inbox.sync()
    token = inbox.state_token()
    assert inbox.state_token() == token
    deliver(account.path, 1)
    assert inbox.state_token() != token


def test_large_folder_sync_reads_only_what_changed(account, monkeypatch):
    """2,000 messages: the first sync lists and numbers them all; a fresh store (a new process)
    gets the same UIDs from its index; an unchanged folder is not listed again, and one new
    message is picked up. (The timings are measured by bench/mailbox_sync.py, never here.)"""
    n = 2_000
    deliver(account.path, n)
    inbox = account.folder("INBOX")
    first = [(m.uid, m.key) for m in inbox.sync()]
    assert len(first) == n and [uid for uid, _ in first] == list(range(1, n + 1))
    assert [(m.uid, m.key) for m in inbox.sync()] == first
    fresh = MailStore(account.store.mail_dir).account("alice@example.org").folder("INBOX")
    assert [(m.uid, m.key) for m in fresh.sync()] == first
    settle(account.path)  # directory mtimes settled: an unchanged folder costs a few stats
    fresh.sync()
    listed = []
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p=".": listed.append(p) or real_listdir(p))
    fresh.sync()
    assert listed == []
    deliver(account.path, 1, start=n)
    assert len(fresh.sync()) == n + 1


def test_move_back_and_forth_never_reuses_a_uid(account):
    deliver(account.path, 2)
    inbox, trash = account.folder("INBOX"), account.folder("Trash")
    inbox.sync()
    assert inbox.move([1], trash) == [(1, 1)]
    assert trash.move([1], inbox) == [(1, 3)]
    assert [m.uid for m in inbox.sync()] == [2, 3]
    assert inbox.move([3], trash) == [(3, 2)]
    assert [m.uid for m in trash.sync()] == [2]


def test_copies_in_opposite_directions_from_threads_do_not_deadlock(account):
    import threading

    deliver(account.path, 20)
    inbox, sent = account.folder("INBOX"), account.folder("Sent")
    inbox.sync()
    for m in inbox.sync():
        inbox.copy([m.uid], sent)
    errors = []

    def run(src, dst):
        # Both locks are tried, never waited for without bound: a copy that meets the other
        # thread's lock raises LockBusy having changed nothing, and runs again as the io
        # pool's LockWaitingPool would run it (docs/design/maildir.md, "The dotlock").
        try:
            for _ in range(10):
                for _attempt in range(1000):
                    try:
                        src.copy([m.uid for m in src.sync()][:5], dst)
                        break
                    except LockBusy:
                        continue
                else:  # pragma: no cover - reported below
                    raise AssertionError("never got both locks")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(account.folder("INBOX"), account.folder("Sent"))),
               threading.Thread(target=run, args=(account.folder("Sent"), account.folder("INBOX")))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "deadlock"
    assert not errors
    uids = [m.uid for m in inbox.sync()]
    assert len(uids) == len(set(uids)) == 20 + 50


def test_subscriptions_file_in_dovecots_v2_format(account):
    account.create_folder("Archive/2026")
    account.subscribe("Archive/2026")
    with open(os.path.join(account.path, "subscriptions"), "rb") as f:
        data = f.read()
    assert data.startswith(b"V\t2\n\n") and b"Archive\t2026\n" in data
    # A file Dovecot wrote (including a tab-escaped name) reads back as IMAP names.
    with open(os.path.join(account.path, "subscriptions"), "wb") as f:
        f.write(b"V\t2\n\nINBOX\nLists\tdovecot\nodd\x01tname\n")
    assert account.subscriptions() == ["INBOX", "Lists/dovecot", "odd\tname"]
    account.unsubscribe("Lists/dovecot")
    assert account.subscriptions() == ["INBOX", "odd\tname"]
    with open(os.path.join(account.path, "subscriptions"), "rb") as f:
        assert f.read() == b"V\t2\n\nINBOX\nodd\x01tname\n"


def test_recreated_folder_gets_a_new_uidvalidity(account):
    folder = account.create_folder("Projects")
    folder.append(b"Subject: a\r\n\r\nx\r\n")
    first = folder.uidvalidity
    account.delete_folder("Projects")
    again = account.create_folder("Projects")
    assert again.sync() == []
    assert again.uidvalidity != first
    assert again.append(b"Subject: b\r\n\r\ny\r\n") == 1


def test_changes_by_another_process_are_followed(account, tmp_path):
    """Another process renames (flags) and deletes files behind our back."""
    deliver(account.path, 3)
    mine = account.folder("INBOX")
    msgs = mine.sync()
    other = MailStore(account.store.mail_dir).account("alice@example.org").folder("INBOX")
    other.sync()
    other.set_flags(1, ["\\Seen"])
    other.expunge([2])
    with mine.open_message(1) as f:  # renamed: found again by its key
        assert f.read() == BODY
    with pytest.raises(NoSuchMessage):
        mine.open_message(2)
    assert mine.add_flags(3, ["\\Flagged"]) == {"\\Flagged"}
    after = {m.uid: m.flags for m in mine.sync()}
    assert after == {1: {"\\Seen"}, 3: {"\\Flagged"}}
    assert msgs[0].uid == 1


def settle(maildir: str) -> None:
    """Date cur/ and new/ two seconds back: the store trusts a directory mtime older than one
    second (a change within the same tick could hide behind it), so no need to wait for one."""
    old = time.time() - 2
    for sub in ("cur", "new"):
        os.utime(os.path.join(maildir, sub), (old, old))

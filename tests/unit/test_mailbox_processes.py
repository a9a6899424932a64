"""Two processes on one folder, each with its own FolderIndex (two MailStores here): what one
changes, the other must list under the same UIDs, never a message it has dropped, never one
message twice (docs/design/maildir.md, "UIDs of moved files", "Syncing a folder")."""
from __future__ import annotations

import os

import pytest

from mailsuite.mailbox import folder as folder_module
from mailsuite.mailbox import uidfile
from mailsuite.mailbox.maildir import UIDLIST, file_stamp
from mailsuite.mailbox.store import MailStore
from tests.unit.test_mailbox_store import deliver

ALICE = "alice@example.org"


@pytest.fixture
def two(tmp_path):
    """(ours, theirs): the INBOX of one account as two processes see it, both synced."""
    root = str(tmp_path / "mail")
    account = MailStore(root).account(ALICE)
    account.ensure_layout()
    deliver(account.path, 6)
    ours = account.folder("INBOX")
    theirs = MailStore(root).account(ALICE).folder("INBOX")
    assert [m.uid for m in ours.sync()] == [1, 2, 3, 4, 5, 6]
    assert [m.uid for m in theirs.sync()] == [1, 2, 3, 4, 5, 6]
    return ours, theirs


def rewrite_uidlist(folder) -> None:
    """What an EXPUNGE does once enough stale lines have gathered."""
    state = folder._state
    with state.hold_uidlist():
        state.uid_file.compact()


def test_a_message_expunged_elsewhere_goes_after_a_rewrite_of_the_uidlist(two):
    """They expunge 2 and rewrite dovecot-uidlist without its line; a STATUS here (UIDNEXT)
    reads that rewrite before any sync. Our next sync must still drop 2 (its key no longer
    leads to its UID)."""
    ours, theirs = two
    assert theirs.expunge([2]) == [2]
    rewrite_uidlist(theirs)
    assert ours.uidnext == 7
    assert [m.uid for m in ours.sync()] == [1, 3, 4, 5, 6]


def test_an_expunge_that_finds_the_file_renamed_looks_for_it_again(two, monkeypatch):
    """Between our look at the file and the unlink, they change its flags (a rename): the
    message is expunged under its new name, not reported expunged while its file lives on."""
    ours, theirs = two
    real_exists = os.path.exists

    def renamed_right_after_we_looked(path):
        found = real_exists(path)
        if found and "/cur/" in path:
            monkeypatch.setattr(folder_module.os.path, "exists", real_exists)
            theirs.add_flags(3, ["\\Seen"])
        return found

    monkeypatch.setattr(folder_module.os.path, "exists", renamed_right_after_we_looked)
    assert ours.expunge([3]) == [3]
    assert [m.uid for m in theirs.sync()] == [1, 2, 4, 5, 6]
    cur = os.listdir(os.path.join(ours.path, "cur"))
    assert len(cur) == 5 and not any(n.endswith(":2,S") for n in cur)


def test_a_uidlist_rewritten_between_stat_and_read_is_read_whole(two, monkeypatch):
    """Our stat sees the old file grown; before we open it, they rename a rewrite over it.
    The offset of the old file means nothing in the new one: it is read whole."""
    ours, theirs = two
    path = os.path.join(ours.path, UIDLIST)
    deliver(ours.path, 1, start=10)
    theirs.sync()  # appends "7 :<key>" to the old file
    grown = file_stamp(path)
    assert theirs.expunge([1]) == [1]
    rewrite_uidlist(theirs)  # a new inode, other offsets
    monkeypatch.setattr(uidfile, "file_stamp", lambda p: grown if p == path else file_stamp(p))
    ours._state.uid_file.reload()
    monkeypatch.undo()
    assert ours._state.uidlist.uids == theirs._state.uidlist.uids
    assert [m.uid for m in ours.sync()] == [2, 3, 4, 5, 6, 7]


def test_a_key_given_a_new_uid_elsewhere_is_listed_once(two):
    """They gave one of our listed messages a new UID (its old one forgotten there): we list
    it once, under the new UID, and the old UID is gone."""
    ours, theirs = two
    key = ours.get(4).key
    state = theirs._state
    with state.lock:
        state.forget_uids([4])
        state.register([key])  # 7
    assert [(m.uid, m.key == key) for m in ours.sync()][-3:] == [(5, False), (6, False),
                                                                  (7, True)]
    assert 4 not in {m.uid for m in ours.sync()}


def test_uids_that_could_not_be_written_are_never_written_later(two, monkeypatch):
    """Our append to dovecot-uidlist fails (disk full): the UID it gave in memory may go to
    another key elsewhere, so we must not list our key under it, nor write it later."""
    ours, theirs = two
    key_a, key_b, key_c = deliver(ours.path, 3, start=20)
    for k in (key_a, key_b, key_c):
        os.rename(os.path.join(ours.path, "new", k), os.path.join(ours.path, "cur", k + ":2,"))

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(uidfile, "open_append", full)
    state = ours._state
    with state.lock, pytest.raises(OSError):
        state.register([key_a])
    monkeypatch.undo()
    with theirs._state.lock:
        assert theirs._state.register([key_b]) == [7]
    with state.lock:
        assert state.register([key_c]) == [8]
    with open(os.path.join(ours.path, UIDLIST)) as f:
        numbers = [line.split(" ")[0] for line in f.read().splitlines()[1:]]
    assert numbers == ["1", "2", "3", "4", "5", "6", "7", "8"]
    listed = {m.uid: m.key for m in ours.sync()}
    assert (listed[7], listed[8], listed[9]) == (key_b, key_c, key_a)
    assert {m.uid: m.key for m in theirs.sync()} == listed


def test_a_copy_that_finds_the_file_renamed_links_it_under_its_new_name(two, monkeypatch):
    """COPY holds only the destination's lock: the source file may be renamed (a flag change,
    here by the other process) before the link. The copy must not be left out silently, or a
    client that moves mail by COPY and EXPUNGE would lose it."""
    ours, theirs = two
    real_link = os.link
    calls = []

    def renamed_first(src, dst):
        if not calls:
            theirs.add_flags(3, ["\\Flagged"])
        calls.append(src)
        return real_link(src, dst)

    monkeypatch.setattr(folder_module.os, "link", renamed_first)
    pairs = ours.copy([3], ours)
    monkeypatch.undo()
    assert [old for old, _ in pairs] == [3] and len(calls) == 2
    copied = {m.uid: m for m in ours.sync()}[pairs[0][1]]
    with open(copied.path, "rb") as a, open(ours.get(3).path, "rb") as b:
        assert a.read() == b.read()

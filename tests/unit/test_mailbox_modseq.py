"""The per-folder mod-sequence log (mailbox/modseq.py; docs/design/maildir.md,
"Mod-sequences"): every change gets a new mod-sequence, shared by every process's index."""
from __future__ import annotations

import os

from mailsuite.mailbox.index import FolderIndex
from mailsuite.mailbox.modseq import MODSEQ_FILE, ModSeqLog
from mailsuite.mailbox.store import MailStore

MSG = b"From: a@example.org\r\nSubject: x\r\n\r\nbody\r\n"


def _folder(tmp_path, store=None):
    store = store or MailStore(str(tmp_path / "mail"))
    account = store.account("alice@example.org")
    account.ensure_layout()
    return account.folder("INBOX")


def _modseqs(folder):
    return {i.uid: i.modseq for i in folder.sync()}


def test_every_change_raises_highestmodseq(tmp_path):
    f = _folder(tmp_path)
    start = f.highest_modseq()
    u1 = f.append(MSG)
    u2 = f.append(MSG)
    after_append = f.highest_modseq()
    assert after_append > start
    ms = _modseqs(f)
    assert ms[u1] > 0 and ms[u2] > 0
    f.add_flags(u1, ["\\Seen"])
    assert f.modseqs([u1])[u1][0] > ms[u1]
    assert f.highest_modseq() > after_append
    unchanged = f.highest_modseq()
    f.add_flags(u1, ["\\Seen"])  # no change: no new mod-sequence
    assert f.highest_modseq() == unchanged
    f.expunge([u2])
    assert f.highest_modseq() > unchanged
    assert f.vanished(unchanged) == [u2]
    assert f.vanished(f.highest_modseq()) == []


def test_a_second_index_and_a_restart_see_the_same_modseqs(tmp_path):
    f = _folder(tmp_path)
    uids = [f.append(MSG) for _ in range(3)]
    f.add_flags(uids[0], ["\\Flagged"])
    f.expunge([uids[2]])
    before = _modseqs(f)
    highest = f.highest_modseq()
    # Another process: its own MailStore, so its own FolderIndex on the same directory.
    other = _folder(tmp_path, MailStore(str(tmp_path / "mail")))
    assert _modseqs(other) == before
    assert other.highest_modseq() == highest
    assert other.vanished(highest - 1) == [uids[2]]
    # A change in the other process is seen here with the mod-sequence it got there.
    other.add_flags(uids[1], ["\\Seen"])
    got = other.modseqs([uids[1]])[uids[1]][0]
    f._state.invalidate()
    assert _modseqs(f)[uids[1]] == got > highest
    assert f.highest_modseq() == other.highest_modseq()


def test_a_change_by_another_maildir_tool_gets_a_new_modseq(tmp_path):
    f = _folder(tmp_path)
    u = f.append(MSG)
    old = _modseqs(f)[u]
    cur = os.path.join(f.path, "cur")
    (name,) = os.listdir(cur)
    os.rename(os.path.join(cur, name), os.path.join(cur, name.split(":2,")[0] + ":2,S"))
    f._state.invalidate()
    info = f.sync()[0]
    assert "\\Seen" in info.flags and info.modseq > old
    # While no process ran: noticed by the next one, from the letters in the log.
    highest = f.highest_modseq()
    (name,) = os.listdir(cur)
    os.rename(os.path.join(cur, name), os.path.join(cur, name.split(":2,")[0] + ":2,FS"))
    fresh = _folder(tmp_path, MailStore(str(tmp_path / "mail")))
    # (Above the log's reservation: a fresh reader cannot know whether lines were lost.)
    assert _modseqs(fresh)[u] == fresh.highest_modseq() > highest


def test_log_is_compacted_and_expunges_are_bounded(tmp_path, monkeypatch):
    import mailsuite.mailbox.modseq as modseq
    monkeypatch.setattr(modseq, "MAX_EXPUNGED", 5)
    f = _folder(tmp_path)
    uids = [f.append(MSG) for _ in range(15)]
    for u in uids[:12]:
        f.expunge([u])
    highest = f.highest_modseq()
    log = ModSeqLog(f.path)
    log.load()
    # Compacted: the oldest expunges are forgotten, the highest mod-sequence is kept.
    assert len(log.expunged) <= 10 and log.floor > 0 and log.highest == highest
    assert sorted(log.entries) == uids[12:]
    # Older than what is remembered: the caller reports every missing UID instead.
    assert f.vanished(0) is None
    assert f.vanished(log.floor) == sorted(log.expunged)
    assert _modseqs(_folder(tmp_path, MailStore(str(tmp_path / "mail")))) == _modseqs(f)


def test_uidvalidity_change_starts_a_new_log(tmp_path):
    f = _folder(tmp_path)
    u = f.append(MSG)
    highest = f.highest_modseq()
    path = os.path.join(f.path, MODSEQ_FILE)
    with open(path) as fh:
        text = fh.read()
    head, rest = text.split("\n", 1)
    with open(path, "w") as fh:
        fh.write("mailsuite-modseq 1 V1\n" + rest)
    fresh = FolderIndex(f.path)
    fresh.sync()
    assert fresh.infos[u].modseq > 0
    assert fresh.modseqs.uidvalidity == f.uidvalidity
    assert fresh.modseqs.highest >= highest


def test_corrupt_lines_are_ignored(tmp_path):
    f = _folder(tmp_path)
    u = f.append(MSG)
    path = os.path.join(f.path, MODSEQ_FILE)
    with open(path, "a") as fh:
        fh.write("garbage line here and there\nx y :S\n")
    fresh = FolderIndex(f.path)
    fresh.sync()
    assert fresh.infos[u].modseq == _modseqs(f)[u]


def test_a_sync_while_another_process_holds_the_log_waits_instead_of_listing_modseq_0(tmp_path):
    import pytest

    from mailsuite.mailbox.errors import LockBusy

    f = _folder(tmp_path)
    u = f.append(MSG)
    f.sync()
    cur = os.path.join(f.path, "cur")
    (name,) = os.listdir(cur)
    os.rename(os.path.join(cur, name), os.path.join(cur, name.split(":2,")[0] + ":2,S"))
    f._state.invalidate()
    lock = os.path.join(f.path, MODSEQ_FILE + ".lock")
    with open(lock, "w") as held:  # another live process of this host holds the log
        held.write(f"{os.getppid()}:{f._state.modseqs.rules.hostname}\n")
    with pytest.raises(LockBusy):
        f.sync()
    os.unlink(lock)
    info = f.sync()[0]
    assert "\\Seen" in info.flags and info.modseq > 0 and info.uid == u

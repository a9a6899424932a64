"""The renames of new/ -> cur/ beside the rest of a sync (docs/design/maildir.md, "Syncing a
folder"; mailsuite/mailbox/moves.py). No process here: `Moves.start` is replaced by stand-ins
for what a helper does; the real helper runs in tests/scenario/test_mailbox_moves.py."""
from __future__ import annotations

import errno
import os

import pytest

from mailsuite.mailbox import moves as moves_module
from mailsuite.mailbox.index import FolderIndex
from mailsuite.mailbox.maildir import UIDLIST, read_uidlist
from mailsuite.mailbox.moves import Moves, cur_name, move_all
from tests.unit.test_mailbox_store import account, deliver  # noqa: F401 (fixture)


def test_cur_name_keeps_a_version_2_info_and_empties_any_other():
    assert cur_name("1.M1.h,S=5") == ("1.M1.h,S=5", "1.M1.h,S=5:2,")
    assert cur_name("1.M1.h,S=5:2,FS") == ("1.M1.h,S=5", "1.M1.h,S=5:2,FS")
    assert cur_name("1.M1.h:1,odd") == ("1.M1.h", "1.M1.h:2,")


def test_move_all_reports_each_failed_rename_by_index(tmp_path):
    for d in ("new", "cur"):
        (tmp_path / d).mkdir()
    for n in ("a", "c"):
        (tmp_path / "new" / n).write_bytes(b"x")
    nfd = os.open(tmp_path / "new", os.O_RDONLY | os.O_DIRECTORY)
    cfd = os.open(tmp_path / "cur", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert move_all(nfd, cfd, ["a", "b", "c:2,S"]) == [(1, errno.ENOENT), (2, errno.ENOENT)]
    finally:
        os.close(nfd)
        os.close(cfd)
    assert sorted(os.listdir(tmp_path / "cur")) == ["a:2,"]


class Helper:
    """Stands in for the helper process: it renames when the sync waits for it."""

    def __init__(self, moves: Moves):
        self.moves = moves

    def communicate(self):
        failed = move_all(self.moves.nfd, self.moves.cfd, self.moves.names)
        return b"".join(b"%d %d\n" % f for f in failed) + b"done\n", None


def test_with_a_helper_uids_are_given_beside_the_renames_and_written_after_them(
        account, monkeypatch):
    """The point of the helper: the renames are under way while the sync gives UIDs; but no
    other process may read a UID whose file is still in new/ (docs/design/maildir.md, "UIDs
    of moved files"), so they reach dovecot-uidlist only after the renames."""
    deliver(account.path, 20)
    new = os.path.join(account.path, "new")
    uidlist = os.path.join(account.path, UIDLIST)
    events = []
    monkeypatch.setattr(Moves, "start", lambda self: (
        events.append(("start", len(self.names))), setattr(self, "proc", Helper(self))))
    real_register, real_write = FolderIndex.register, FolderIndex._write_registered
    monkeypatch.setattr(FolderIndex, "register", lambda self, keys, *a, **k: (
        events.append(("register", len(os.listdir(new)), os.path.exists(uidlist + ".lock"))),
        real_register(self, keys, *a, **k))[1])
    monkeypatch.setattr(FolderIndex, "_write_registered", lambda self: (
        self.uid_file.unwritten and events.append(("write", len(os.listdir(new)))),
        real_write(self))[1])
    msgs = account.folder("INBOX").sync()
    # Started with every name; UIDs given while all 20 were in new/, under the dotlock;
    # written once new/ was empty.
    assert events == [("start", 20), ("register", 20, True), ("write", 0)]
    assert [m.uid for m in msgs] == list(range(1, 21))
    assert os.listdir(new) == []
    assert all(os.path.exists(m.path) for m in msgs)
    assert sorted(read_uidlist(uidlist).uids.values()) == list(range(1, 21))
    assert not os.path.exists(uidlist + ".lock")


def test_without_a_helper_files_are_renamed_before_any_uid_is_given(account, monkeypatch):
    """Another process reading dovecot-uidlist without the lock must find the file of every
    UID in cur/: otherwise it may list a later message first and this one below it later."""
    deliver(account.path, 5)
    new = os.path.join(account.path, "new")
    seen = []
    real_register = FolderIndex.register
    monkeypatch.setattr(FolderIndex, "register", lambda self, keys, *a, **k: (
        seen.append(len(os.listdir(new))), real_register(self, keys, *a, **k))[1])
    assert [m.uid for m in account.folder("INBOX").sync()] == [1, 2, 3, 4, 5]
    assert seen == [0]


def test_a_helper_that_died_half_way_is_finished_by_the_sync(account, monkeypatch):
    keys = deliver(account.path, 30)

    def half(self):
        # As if a helper renamed the first half of its list, then died without a report.
        move_all(self.nfd, self.cfd, self.names[:15])
        self.proc = None

    monkeypatch.setattr(Moves, "start", half)
    msgs = account.folder("INBOX").sync()
    assert [m.key for m in msgs] == keys
    assert sorted(os.listdir(os.path.join(account.path, "cur"))) == [k + ":2," for k in keys]


def test_files_another_process_took_first_leave_the_listing(account, monkeypatch):
    keys = deliver(account.path, 10)
    new, cur = (os.path.join(account.path, d) for d in ("new", "cur"))

    def race(self):
        # Before the renames: another process deletes one file and moves another to cur/
        # with \Seen (as Dovecot or mutt would).
        if not self.names:
            return  # a later sync, new/ empty
        os.unlink(os.path.join(new, keys[3]))
        os.rename(os.path.join(new, keys[6]), os.path.join(cur, keys[6] + ":2,S"))

    monkeypatch.setattr(Moves, "start", race)
    inbox = account.folder("INBOX")
    inbox.claims_recent = True
    msgs = inbox.sync()
    assert [m.key for m in msgs] == [k for i, k in enumerate(keys) if i not in (3, 6)]
    assert all(os.path.exists(m.path) for m in msgs)
    assert inbox.recent == {m.uid for m in msgs}  # only the ones this sync moved
    uids = read_uidlist(os.path.join(account.path, UIDLIST)).uids
    # Renamed before any UID was given: neither got one in this sync.
    assert keys[3] not in uids and keys[6] not in uids and len(uids) == 8
    # cur/ changed under us: the next sync lists it and gives the moved one the next UID.
    again = {m.uid: m for m in inbox.sync()}
    assert again[9].key == keys[6] and keys[3] not in {m.key for m in again.values()}
    assert again[9].flags == frozenset({"\\Seen"}) and len(again) == 9
    assert 9 not in inbox.recent


def test_any_other_rename_failure_fails_the_sync_and_the_next_one_starts_over(
        account, monkeypatch):
    deliver(account.path, 5)
    real_move_all = moves_module.move_all

    def denied(nfd, cfd, names):
        return [(0, errno.EACCES)] + real_move_all(nfd, cfd, names[1:])

    monkeypatch.setattr(moves_module, "move_all", denied)
    inbox = account.folder("INBOX")
    with pytest.raises(OSError) as caught:
        inbox.sync()
    assert caught.value.errno == errno.EACCES
    monkeypatch.setattr(moves_module, "move_all", real_move_all)
    assert [m.uid for m in inbox.sync()] == [1, 2, 3, 4, 5]


def test_small_batches_spawn_nothing(account, monkeypatch):
    monkeypatch.setattr(moves_module, "APART_MIN", 10)
    deliver(account.path, 9)
    monkeypatch.setattr(moves_module.subprocess, "Popen",
                        lambda *a, **k: pytest.fail("no helper below APART_MIN"))
    assert len(account.folder("INBOX").sync()) == 9

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


def test_renames_start_before_uids_are_given(account, monkeypatch):
    """The point of the helper: the renames are under way while the sync registers UIDs."""
    deliver(account.path, 20)
    events = []
    monkeypatch.setattr(Moves, "start", lambda self: events.append(("start", len(self.names))))
    real_register = FolderIndex.register
    monkeypatch.setattr(FolderIndex, "register", lambda self, keys, *a: (
        events.append(("register", len(os.listdir(os.path.join(account.path, "new"))))),
        real_register(self, keys, *a))[1])
    msgs = account.folder("INBOX").sync()
    # Started with every name, while all 20 files were still in new/.
    assert events == [("start", 20), ("register", 20)]
    assert [m.uid for m in msgs] == list(range(1, 21))
    assert os.listdir(os.path.join(account.path, "new")) == []
    assert all(os.path.exists(m.path) for m in msgs)


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
    assert 4 not in inbox.recent and 7 not in inbox.recent
    uids = read_uidlist(os.path.join(account.path, UIDLIST)).uids
    assert (uids[keys[3]], uids[keys[6]]) == (4, 7)  # given before the renames: kept
    # cur/ changed under us: the next sync lists it and finds the moved one under its UID.
    again = {m.uid: m for m in inbox.sync()}
    assert 4 not in again and again[7].key == keys[6]
    assert again[7].flags == frozenset({"\\Seen"}) and len(again) == 9


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

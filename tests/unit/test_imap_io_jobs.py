"""IMAP in memory: how many io-pool jobs a command costs. Under load every job waits in the
pool's queue behind other sessions' store work, so a command that changes the store refreshes
the selection in the same job, and announcing an expunge costs no job of its own
(docs/design/imap.md, "Selection and refresh")."""
from __future__ import annotations

import os

import pytest
from twisted.internet.task import Clock

from mailsuite.imap import selection
from mailsuite.mailbox.errors import LockBusy
from mailsuite.mailbox.index import FolderLock
from mailsuite.pools import InlinePool
from tests.unit.imapkit import simple, tagged, world  # noqa: F401

ALICE = "alice@example.org"


class CountingPool(InlinePool):
    """An InlinePool that remembers the name of every job it ran."""

    def __init__(self) -> None:
        self.jobs: list[str] = []

    def run(self, fn, *args, **kwargs):
        self.jobs.append(getattr(fn, "__name__", repr(fn)))
        return super().run(fn, *args, **kwargs)


def counted(client) -> CountingPool:
    pool = CountingPool()
    client.proto.pool = pool
    return pool


def held_files(world, folder: str = "") -> list[str]:
    tmp = os.path.join(world.maildir(ALICE, folder), "tmp")
    return [n for n in os.listdir(tmp) if n.startswith("expunged.")]


def test_expunge_and_its_refresh_are_one_job(world):
    for i in range(3):
        world.append(ALICE, "", simple(f"m{i}"))
    c = world.connect()
    c.cmd(b"a SELECT INBOX")
    c.cmd(b"b STORE 2 +FLAGS.SILENT (\\Deleted)")
    world.append(ALICE, "", simple("arrived meanwhile"))
    pool = counted(c)
    resp = c.cmd(b"c EXPUNGE")
    assert pool.jobs == ["expunge_folder"]
    assert resp[:2] == [b"* 2 EXPUNGE", b"* 3 EXISTS"] and tagged(resp).startswith(b"c OK")


def test_append_to_the_selected_folder_and_its_refresh_are_one_job(world):
    c = world.connect()
    c.cmd(b"a SELECT INBOX")
    pool = counted(c)
    msg = simple("appended")
    resp = c.cmd(b"b APPEND INBOX {%d+}\r\n%s" % (len(msg), msg))
    assert pool.jobs == ["append_messages"]
    assert b"* 1 EXISTS" in resp and tagged(resp).startswith(b"b OK [APPENDUID")


def test_announcing_an_expunge_costs_no_job_and_the_held_file_goes_at_the_next_refresh(world):
    world.append(ALICE, "", simple("shown to both"))
    a, b = world.connect(), world.connect()
    a.cmd(b"a SELECT INBOX")
    b.cmd(b"a SELECT INBOX")
    a.cmd(b"b STORE 1 +FLAGS.SILENT (\\Deleted)")
    a.cmd(b"c EXPUNGE")
    assert held_files(world)  # b still shows it
    pool = counted(b)
    assert b"* 1 EXPUNGE" in b.cmd(b"b NOOP")
    assert pool.jobs == ["refresh_folder"]
    a.cmd(b"d NOOP")  # nothing changed: the refresh only drops the file nobody shows now
    assert held_files(world) == []


def test_a_busy_lock_after_the_change_refreshes_apart_and_never_stores_twice(world, monkeypatch):
    c = world.connect()
    c.cmd(b"a SELECT INBOX")
    refresh, busy = selection.refresh_folder, [True]

    def refresh_once_busy(folder, known):
        if busy.pop() if busy else False:
            raise LockBusy("INBOX", "another session of this process")
        return refresh(folder, known)

    monkeypatch.setattr(selection, "refresh_folder", refresh_once_busy)
    pool = counted(c)
    msg = simple("once")
    resp = c.cmd(b"b APPEND INBOX {%d+}\r\n%s" % (len(msg), msg))
    assert pool.jobs == ["append_messages", "refresh_once_busy"]  # the refresh, apart
    assert b"* 1 EXISTS" in resp and tagged(resp).startswith(b"b OK")
    assert len(world.messages(ALICE)) == 1


def test_status_and_list_take_the_refresh_in_their_one_job(world):
    world.append(ALICE, "", simple("first"))
    c = world.connect()
    c.cmd(b"a SELECT INBOX")
    world.append(ALICE, "", simple("second"))
    pool = counted(c)
    resp = c.cmd(b'b STATUS INBOX (MESSAGES)')
    assert pool.jobs == ["sync_folder"]
    assert resp[:2] == [b'* STATUS "INBOX" (MESSAGES 2)', b"* 2 EXISTS"]
    world.append(ALICE, "", simple("third"))
    pool.jobs.clear()
    resp = c.cmd(b'c STATUS Sent (MESSAGES)')
    assert pool.jobs == ["named_state"]
    assert resp[:2] == [b'* STATUS "Sent" (MESSAGES 0)', b"* 3 EXISTS"]
    world.append(ALICE, "", simple("fourth"))
    pool.jobs.clear()
    resp = c.cmd(b'd LIST "" "*"')
    assert pool.jobs == ["folders_and_subscriptions"]
    # The LIST responses first, then what changed (as after any command without mailbox data).
    assert resp.index(b"* 4 EXISTS") > max(i for i, line in enumerate(resp)
                                            if line.startswith(b"* LIST"))
    pool.jobs.clear()
    c.cmd(b'e LIST "" "*"')
    assert pool.jobs == ["folders_and_subscriptions"]  # nothing changed: no second job


def test_append_with_keywords_checks_their_room_in_its_one_job(world):
    c = world.connect()
    c.cmd(b"a SELECT INBOX")
    pool = counted(c)
    msg = simple("labelled")
    resp = c.cmd(b"b APPEND INBOX ($Label1) {%d+}\r\n%s" % (len(msg), msg))
    assert pool.jobs == ["append_messages"]
    assert tagged(resp).startswith(b"b OK [APPENDUID")
    for i in range(25):
        c.cmd(b"c STORE 1 +FLAGS (kw%d)" % i)
    pool.jobs.clear()
    resp = c.cmd(b"d APPEND INBOX (one-too-many) {%d+}\r\n%s" % (len(msg), msg))
    assert pool.jobs == ["append_messages"] and tagged(resp).startswith(b"d NO [LIMIT]"), resp
    assert len(world.messages(ALICE)) == 1


class CountingLock:
    """Counts the outermost takings of every folder lock (re-entrant takings inside a hold are
    free: no wait in line, no hand-over to another thread)."""

    def __init__(self, monkeypatch) -> None:
        self.holds = 0
        enter, leave = FolderLock.__enter__, FolderLock.__exit__
        depth = {}

        def counting_enter(lock):
            got = enter(lock)
            depth[lock] = depth.get(lock, 0) + 1
            if depth[lock] == 1:
                self.holds += 1
            return got

        def counting_exit(lock, *exc):
            depth[lock] -= 1
            return leave(lock, *exc)

        monkeypatch.setattr(FolderLock, "__enter__", counting_enter)
        monkeypatch.setattr(FolderLock, "__exit__", counting_exit)


@pytest.mark.parametrize("command", [
    b"APPEND INBOX ($Label1) {%d+}\r\n%s" % (len(simple("new")), simple("new")),
    b"EXPUNGE",
    b"UID STORE 1 +FLAGS ($Label2)",
], ids=["APPEND", "EXPUNGE", "UID STORE"])
def test_a_command_that_changes_the_folder_takes_its_lock_once(world, monkeypatch, command):
    world.append(ALICE, "", simple("first"))
    c = world.connect()
    c.cmd(b"a SELECT INBOX")
    c.cmd(b"b STORE 1 +FLAGS.SILENT (\\Deleted)")
    world.append(ALICE, "", simple("arrived meanwhile"))  # so the refresh has news to tell
    locks = CountingLock(monkeypatch)
    resp = c.cmd(b"c " + command)
    assert tagged(resp).startswith(b"c OK"), resp
    assert b"EXISTS" in b"".join(resp)  # the refresh ran, in the same hold
    assert locks.holds == 1


def test_the_jobs_of_a_folder_go_to_its_line(tmp_path):
    from mailsuite.mailbox.store import MailStore
    from mailsuite.mailbox.waits import LockWaitingPool
    from tests.unit.manualpool import ManualPool

    class LinePool(ManualPool):
        lines: list = []

        def run_in_line(self, key, fn, *args, **kwargs):
            self.lines.append((key, getattr(fn, "__name__", "")))
            return super().run_in_line(key, fn, *args, **kwargs)

    folder = MailStore(str(tmp_path)).account(ALICE).folder("INBOX")
    inner = LinePool()
    waiting = LockWaitingPool(inner, Clock(), wait=5.0)
    waiting.run(selection.sync_folder, folder)
    waiting.run(folder.sync)
    waiting.run(os.path.exists, folder.path)  # on no folder: any thread
    assert inner.lines == [(folder.path, "sync_folder"), (folder.path, "sync")]
    assert inner.names() == ["sync_folder", "sync", "exists"]

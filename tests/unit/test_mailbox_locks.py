"""Folder locks that never stall the io pool (issue 13; docs/design/maildir.md, "The dotlock"):
when a dotlock is stale, LockBusy at once for a live one, waiting on the reactor, the bound, and
a delivery made while a folder was locked."""
from __future__ import annotations

import os
import socket
import time

import pytest
from twisted.internet import task
from twisted.logger import capturedLogs

from mailsuite.mailbox.dotlock import DotLock, LockRules
from mailsuite.mailbox.errors import LockBusy
from mailsuite.mailbox.maildir import UIDLIST
from mailsuite.mailbox.store import MailStore
from mailsuite.mailbox.waits import LockWaitingPool
from mailsuite.pools import InlinePool
from tests.unit.test_imap_append_spool import QueuedPool
from tests.unit.test_mailbox_store import deliver

HOST = "mx1.example"
NOW = 1_800_000_000.0


def rules(alive=(), started=None, **kw) -> LockRules:
    """Rules on a fake host and clock: PIDs in `alive` exist; `started` maps pid -> start."""
    starts = started or {}
    return LockRules(hostname=HOST, now=lambda: NOW, alive=lambda pid: pid in alive,
                     started=starts.get, pid=lambda: 100, **kw)


# -- when a dotlock is stale ------------------------------------------------------------------
def test_lock_of_a_dead_process_on_this_host_is_stale_at_once():
    assert "4242 is gone" in rules().stale(b"4242:mx1.example\n", NOW - 1, False)


def test_lock_of_a_live_process_on_this_host_is_respected_however_old():
    r = rules(alive={4242}, started={4242: NOW - 5000})
    assert r.stale(b"4242:mx1.example\n", NOW - 1000, False) is None


def test_lock_whose_pid_was_reused_by_a_younger_process_is_stale():
    r = rules(alive={4242}, started={4242: NOW - 10})
    assert "reused" in r.stale(b"4242:mx1.example\n", NOW - 60, False)
    # Started (to /proc's precision) before the lock was made: its owner.
    assert r.stale(b"4242:mx1.example\n", NOW - 11, False) is None


def test_our_own_pid_is_stale_only_when_no_thread_of_ours_holds_the_lock():
    r = rules(alive={100})
    assert r.stale(b"100:mx1.example\n", NOW - 1, True) is None
    assert "no thread" in r.stale(b"100:mx1.example\n", NOW - 1, False)


def test_lock_of_another_host_is_stale_only_after_the_bound():
    r = rules(stale_seconds=120.0)  # no PID of the other host is "alive" here: never asked
    assert r.stale(b"4242:mx2.example\n", NOW - 119, False) is None
    assert "mx2.example" in r.stale(b"4242:mx2.example\n", NOW - 121, False)


@pytest.mark.parametrize("content", [b"", b"garbage", b"12x:mx1.example", b"4242:"])
def test_lock_without_a_readable_owner_is_stale_after_a_moment(content):
    r = rules()
    assert r.stale(content, NOW - 1, False) is None  # being written right now
    assert "no owner" in r.stale(content, NOW - 3, False)


# -- DotLock ----------------------------------------------------------------------------------
def make_lock(path: str, content: bytes, age: float = 0.0) -> str:
    lock = path + ".lock"
    with open(lock, "wb") as f:
        f.write(content)
    if age:
        when = time.time() - age
        os.utime(lock, (when, when))
    return lock


def live_owner() -> bytes:
    """Our parent process on this host: alive, and started before any lock we make now."""
    return f"{os.getppid()}:{socket.gethostname()}\n".encode()


def test_stale_dotlock_is_broken_at_once_with_one_log_line(tmp_path):
    path = str(tmp_path / "dovecot-uidlist")
    lock = make_lock(path, b"4242:mx1.example\n")
    with capturedLogs() as events:
        with DotLock(path, rules(alive=set())):
            assert open(lock, "rb").read() == b"100:mx1.example\n"
    assert not os.path.exists(lock)
    [event] = [e for e in events if "stale lock" in e["log_format"]]
    assert event["path"] == lock and event["owner"] == "4242:mx1.example"
    assert "4242 is gone" in event["why"]


def test_live_dotlock_is_refused_at_once_naming_its_owner(tmp_path):
    path = str(tmp_path / "dovecot-uidlist")
    lock = make_lock(path, live_owner())
    with pytest.raises(LockBusy) as e:
        with DotLock(path):
            pass
    assert e.value.lock == lock and e.value.owner == live_owner().decode().strip()
    assert open(lock, "rb").read() == live_owner()  # untouched


def test_release_leaves_a_lock_another_process_took_over(tmp_path):
    path = str(tmp_path / "dovecot-uidlist")
    held = DotLock(path)
    held.__enter__()
    # Broken by someone who thought us dead (never before it looked stale: at least
    # UNWRITTEN_GRACE_SECONDS after we made it), and taken anew, perhaps with the same inode
    # number and size.
    made = os.stat(path + ".lock").st_mtime
    os.unlink(path + ".lock")
    lock = make_lock(path, live_owner())
    os.utime(lock, (made + 3, made + 3))
    held.__exit__()
    assert open(path + ".lock", "rb").read() == live_owner()


def test_release_removes_our_lock_with_one_lstat(tmp_path, monkeypatch):
    path = str(tmp_path / "dovecot-uidlist")
    with DotLock(path):
        assert os.path.exists(path + ".lock")
        opened = []
        real_open = os.open
        monkeypatch.setattr(os, "open", lambda *a, **kw: opened.append(a) or real_open(*a, **kw))
    assert not os.path.exists(path + ".lock") and opened == []


# -- waiting on the reactor ------------------------------------------------------------------
def locked_job(path: str) -> str:
    with DotLock(path):
        return "done"


def test_waiters_hold_no_pool_thread_and_others_are_served(tmp_path):
    path = str(tmp_path / "dovecot-uidlist")
    lock = make_lock(path, live_owner())
    pool, clock = QueuedPool(), task.Clock()
    waiting = LockWaitingPool(pool, clock, wait=5.0)
    results = [waiting.run(locked_job, path) for _ in range(10)]
    pool.drain()
    assert pool.calls == [] and waiting.waiting() == {lock: 10}  # nothing in the pool
    other = waiting.run(lambda: "other user served")
    pool.drain()
    assert other.result == "other user served"
    assert not any(d.called for d in results)
    os.unlink(lock)
    clock.advance(0.3)
    pool.drain()
    assert [d.result for d in results] == ["done"] * 10
    assert waiting.waiting() == {} and clock.getDelayedCalls() == []


def test_the_wait_is_bounded_then_the_caller_gets_lock_busy(tmp_path):
    path = str(tmp_path / "dovecot-uidlist")
    make_lock(path, live_owner())
    pool, clock = QueuedPool(), task.Clock()
    d = LockWaitingPool(pool, clock, wait=2.0).run(locked_job, path)
    failures = []
    d.addErrback(failures.append)
    pool.drain()
    tries = 1
    while clock.getDelayedCalls():
        clock.advance(clock.getDelayedCalls()[0].getTime() - clock.seconds())
        tries += len(pool.calls)
        pool.drain()
    assert failures and failures[0].check(LockBusy)
    assert clock.seconds() == pytest.approx(2.0)
    assert 5 < tries < 30  # backoff: retried, but not in a busy loop


def test_waiters_are_served_in_arrival_order_one_attempt_at_a_time(tmp_path):
    path = str(tmp_path / "dovecot-uidlist")
    lock = make_lock(path, live_owner())
    pool, clock = QueuedPool(), task.Clock()
    waiting = LockWaitingPool(pool, clock, wait=5.0)
    served: list[int] = []

    def job(n: int) -> None:
        with DotLock(path):
            served.append(n)

    for n in range(5):
        waiting.run(job, n)
        pool.drain()
    for _ in range(4):  # while the lock is held, only the first waiter tries it
        clock.advance(clock.getDelayedCalls()[0].getTime() - clock.seconds())
        assert len(pool.calls) == 1
        pool.drain()
    os.unlink(lock)
    # The front waiter's next try, wherever its jittered backoff put it (up to 1.25 x
    # MAX_RETRY): the five are then served in one go, in arrival order.
    clock.advance(clock.getDelayedCalls()[0].getTime() - clock.seconds())
    pool.drain()
    assert served == [0, 1, 2, 3, 4]
    assert waiting.waiting() == {} and clock.getDelayedCalls() == []


def test_a_job_ending_lets_the_first_waiter_try_at_once(tmp_path):
    # In this process a lock is released when a job of the pool ends: the first waiter must
    # not sit out its backoff after that.
    path = str(tmp_path / "dovecot-uidlist")
    lock = make_lock(path, live_owner())
    pool, clock = QueuedPool(), task.Clock()
    waiting = LockWaitingPool(pool, clock, wait=5.0)
    d = waiting.run(locked_job, path)
    pool.drain()
    for _ in range(5):  # a long backoff by now
        clock.advance(clock.getDelayedCalls()[0].getTime() - clock.seconds())
        pool.drain()
    os.unlink(lock)
    waiting.run(lambda: "another job")
    pool.drain()
    assert d.result == "done"  # without the clock moving


# -- a delivery while the folder is locked ---------------------------------------------------
@pytest.fixture
def store(tmp_path) -> MailStore:
    return MailStore(str(tmp_path / "mail"))


def test_delivery_made_while_locked_appears_in_arrival_order_once_free(store):
    account = store.account("alice@example.org")
    folder = account.folder("INBOX")
    deliver(account.path, 2)
    assert [m.uid for m in folder.sync()] == [1, 2]
    lock = make_lock(os.path.join(account.path, UIDLIST), live_owner())
    [third] = deliver(account.path, 1, start=2)
    with pytest.raises(LockBusy):
        folder.sync()  # moved to cur/ and listed, but no UID could be given
    [fourth] = deliver(account.path, 1, start=3)
    os.unlink(lock)
    infos = folder.sync()
    assert [(m.uid, m.key) for m in infos][2:] == [(3, third), (4, fourth)]
    # Every other session of this process sees the same list.
    assert [m.uid for m in account.folder("INBOX").sync()] == [1, 2, 3, 4]


def test_busy_lock_leaves_expunge_copy_and_move_undone(store):
    account = store.account("alice@example.org")
    account.ensure_layout()
    inbox, archive = account.folder("INBOX"), account.folder("Archive")
    deliver(account.path, 2)
    [a, b] = [m.uid for m in inbox.sync()]
    lock = make_lock(os.path.join(archive.path, UIDLIST), live_owner())
    for op in (lambda: inbox.copy([a], archive), lambda: inbox.move([a], archive)):
        with pytest.raises(LockBusy):
            op()
    assert os.listdir(os.path.join(archive.path, "cur")) == []
    os.unlink(lock)
    lock = make_lock(os.path.join(inbox.path, UIDLIST), live_owner())
    with pytest.raises(LockBusy):
        inbox.expunge([b])
    with pytest.raises(LockBusy):
        inbox.move([a], archive)
    assert len(os.listdir(os.path.join(inbox.path, "cur"))) == 2
    assert os.listdir(os.path.join(archive.path, "cur")) == []
    os.unlink(lock)
    assert inbox.move([a], archive) == [(a, 1)] and inbox.expunge([b]) == [b]


def test_waiting_pool_over_the_store_runs_the_job_again_once_free(store):
    account = store.account("alice@example.org")
    folder = account.folder("INBOX")
    deliver(account.path, 1)
    lock = make_lock(os.path.join(account.path, UIDLIST), live_owner())
    clock = task.Clock()
    d = LockWaitingPool(InlinePool(), clock, wait=5.0).run(folder.sync)
    assert not d.called
    os.unlink(lock)
    clock.advance(0.5)
    assert [m.uid for m in d.result] == [1]

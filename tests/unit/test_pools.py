"""WorkerPool (mailsuite/pools.py): real threads, results delivered on the reactor thread in
batches. The reactor here is a fake that only collects callFromThread calls, so what runs on
"the reactor" runs when the test says, never in a pool thread."""
from __future__ import annotations

import threading

import pytest
from twisted.internet import defer

from mailsuite.pools import PoolStopped, WorkerPool

DEADLINE = 10.0  # seconds: a pool thread that has not answered by then is a failure


class FakeReactor:
    """callFromThread collects the calls; run_calls runs them on the test's thread."""

    def __init__(self) -> None:
        self.calls: list = []
        self.arrived = threading.Condition()

    def callFromThread(self, f, *args, **kwargs) -> None:
        with self.arrived:
            self.calls.append((f, args, kwargs))
            self.arrived.notify_all()

    def wait_for_call(self) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: self.calls, DEADLINE), "no result came back"

    def run_calls(self) -> int:
        with self.arrived:
            calls, self.calls = self.calls, []
        for f, args, kwargs in calls:
            f(*args, **kwargs)
        return len(calls)


@pytest.fixture
def reactor():
    return FakeReactor()


@pytest.fixture
def pool(reactor):
    p = WorkerPool("test", 4, reactor)
    yield p
    p.stop()


def results_of(d: defer.Deferred) -> list:
    out: list = []
    d.addBoth(out.append)
    return out


def test_a_result_fires_its_deferred_on_the_reactor_not_in_the_pool_thread(pool, reactor):
    ran_in = []
    d = pool.run(lambda x, y=0: ran_in.append(threading.current_thread()) or x + y, 2, y=3)
    got = results_of(d)
    reactor.wait_for_call()
    assert got == []  # nothing fires in the pool thread
    reactor.run_calls()
    assert got == [5]
    assert ran_in[0] is not threading.current_thread()
    assert ran_in[0].name.startswith("PoolThread-mailsuite-test-")


def test_an_exception_becomes_a_failure(pool, reactor):
    def boom():
        raise ValueError("no")
    got = results_of(pool.run(boom))
    reactor.wait_for_call()
    reactor.run_calls()
    assert len(got) == 1 and got[0].check(ValueError)


def test_results_that_finish_while_the_reactor_is_busy_come_back_in_one_wakeup(reactor):
    pool = WorkerPool("test", 1, reactor)
    gate = threading.Event()
    try:
        first = results_of(pool.run(gate.wait, DEADLINE))
        rest = [results_of(pool.run(lambda i=i: i)) for i in range(5)]
        gate.set()
        # One thread runs all six in order; the first result schedules the one delivery.
        reactor.wait_for_call()
        done = threading.Event()
        pool.run(done.set)
        assert done.wait(DEADLINE)
        assert len(reactor.calls) == 1
        reactor.run_calls()
        assert first == [True] and [r for (r,) in rest] == [0, 1, 2, 3, 4]
    finally:
        pool.stop()


def test_threads_start_on_demand_up_to_the_limit(reactor):
    pool = WorkerPool("test", 3, reactor)
    gate = threading.Event()
    try:
        for _ in range(5):
            pool.run(gate.wait, DEADLINE)
        assert len(pool._threads) == 3
        gate.set()
    finally:
        pool.stop()


def test_stop_runs_what_was_queued_and_refuses_more(reactor):
    pool = WorkerPool("test", 1, reactor)
    gate, started = threading.Event(), threading.Event()
    ran = []
    pool.run(lambda: started.set() or gate.wait(DEADLINE))
    assert started.wait(DEADLINE)
    pool.run(ran.append, "queued before stop")
    assert (pool.backlog(), pool.busy()) == (1, 1)
    gate.set()
    pool.stop()
    pool.stop()  # idempotent
    assert ran == ["queued before stop"]
    assert all(not t.is_alive() for t in pool._threads)
    failed = results_of(pool.run(ran.append, "after stop"))
    assert failed[0].check(PoolStopped)
    assert ran == ["queued before stop"]


def test_imap_and_pop3_sessions_get_the_small_mailbox_pool(tmp_path, monkeypatch,
                                                          prepared_directory):
    """Their store work runs in `pools.mailbox` (MAILBOX_THREADS threads, docs/design/imap.md
    "Throughput"), not in the io pool that SMTP delivery fills with fsync waits."""
    from twisted.internet.testing import MemoryReactorClock

    from mailsuite.config import Config
    from mailsuite.pools import MAILBOX_THREADS
    from mailsuite.service import build_parts

    monkeypatch.setattr("twisted.names.client.getResolver", lambda: None)
    config = Config()
    config.server.data_dir = str(tmp_path)
    config.server.hostname = "mx.example.org"
    prepared_directory(str(tmp_path / "mailsuite.db"))
    parts = build_parts(config, MemoryReactorClock())
    try:
        assert parts.mailbox_io.pool is parts.pools.mailbox
        assert parts.pools.mailbox in parts.pools.all()
        assert parts.pools.mailbox.maxthreads == MAILBOX_THREADS < parts.pools.io.maxthreads
    finally:
        for pool in parts.pools.all():
            pool.stop()


def test_jobs_of_one_line_run_one_after_another_on_one_thread_and_hold_up_no_one_else(pool):
    gate, started = threading.Event(), threading.Event()
    ran: list = []
    lock = threading.Lock()

    def job(name, fail=False):
        with lock:
            ran.append((name, threading.current_thread()))
        if fail:
            raise ValueError(name)

    pool.run_in_line("INBOX", lambda: started.set() or gate.wait(DEADLINE))
    assert started.wait(DEADLINE)
    pool.run_in_line("INBOX", job, "a1", fail=True)  # a failure does not stop the line
    pool.run_in_line("INBOX", job, "a2")
    other, plain = threading.Event(), threading.Event()
    pool.run_in_line("Sent", other.set)
    pool.run(plain.set)
    # Another line and a job in no line run while INBOX's first job still holds its line.
    assert other.wait(DEADLINE) and plain.wait(DEADLINE)
    assert ran == [] and pool.backlog() == 2
    gate.set()
    done = threading.Event()
    pool.run_in_line("INBOX", done.set)
    assert done.wait(DEADLINE)
    assert [name for name, _ in ran] == ["a1", "a2"]
    assert ran[0][1] is ran[1][1]  # the thread that ran the first ran the next at once
    assert pool.backlog() == 0

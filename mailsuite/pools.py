"""Thread pools we own for blocking work: SQL, password hashing, file I/O with fsync.

Never the reactor's default pool: Twisted's resolver uses it for every hostname connect, so
filling it with SQL or argon2 work would stall outbound delivery (docs/design/twisted.md).
"""
from __future__ import annotations

import collections
import queue
import threading
from typing import Any, Callable, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet import defer
from twisted.python.failure import Failure

T = TypeVar("T")
MAILBOX_THREADS = 4  # imaptest, 50 clients staying logged in: 4 threads beat 8 and 16 on 2 cores


_NO_LINE = object()  # the key of a job given by run(), not run_in_line()


class PoolStopped(Exception):
    """Work submitted after shutdown began."""


class WorkerPool:
    """N threads of our own; `run(fn, *args)` returns a Deferred firing with fn's result.

    Leaner than Twisted's ThreadPool + deferToThreadPool (docs/design/twisted.md, "Blocking
    work"): a job is one put on a C queue, and results come back to the reactor in batches,
    one reactor wake-up for all the results that finished while the reactor was busy, instead
    of one callFromThread per job. Threads start on demand up to `maxthreads` and live until
    stop(); jobs queued before stop() still run."""

    def __init__(self, name: str, maxthreads: int, reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.name = name
        self.maxthreads = maxthreads
        self._reactor = reactor
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # the counts below, and _results
        self._idle = 0  # threads waiting for a job
        self._working = 0  # threads running one
        self._results: collections.deque = collections.deque()  # (Deferred, ok, value)
        self._delivery_due = False  # a _deliver is scheduled on the reactor
        # key -> the jobs of that key waiting behind its running one (run_in_line)
        self._lines: dict[Any, collections.deque] = {}
        self._in_lines = 0  # jobs waiting in those lines
        self._started = False
        self._stopped = False
        self.jobs = 0  # given to the pool so far (metrics)

    def start(self) -> None:
        if not self._started and not self._stopped:
            self._started = True
            self._grow()

    def stop(self) -> None:
        """Idempotent; the jobs already queued run, then the threads end and are joined. A
        stopped WorkerPool stays stopped."""
        was_started, self._started = self._started, False
        if self._stopped:
            return
        self._stopped = True
        if not was_started:
            return
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred:
        return self._submit(_NO_LINE, fn, args, kwargs)

    def run_in_line(self, key: Any, fn: Callable[..., T], *args: Any, **kwargs: Any
                    ) -> defer.Deferred:
        """As run(), except that the jobs of one `key` never run at the same time: a job
        whose key has one running waits behind it, and the thread that ran it runs the next
        at once (docs/design/imap.md, "Throughput"). Jobs of other keys are not held up."""
        return self._submit(key, fn, args, kwargs)

    def _submit(self, key: Any, fn: Callable[..., Any], args: tuple, kwargs: dict
                ) -> defer.Deferred:
        if self._stopped:
            return defer.fail(PoolStopped(f"the {self.name} pool has stopped (shutting down)"))
        self.start()
        self.jobs += 1
        d: defer.Deferred = defer.Deferred()
        job = (d, fn, args, kwargs, key)
        if key is not _NO_LINE:
            with self._lock:
                line = self._lines.get(key)
                if line is not None:
                    line.append(job)
                    self._in_lines += 1
                    return d
                self._lines[key] = collections.deque()
        self._queue.put(job)
        self._grow()
        return d

    def backlog(self) -> int:
        """Jobs waiting for a free thread, or in a line behind the running job of their key."""
        return self._queue.qsize() + self._in_lines

    def busy(self) -> int:
        """Threads running a job now."""
        return self._working

    def _grow(self) -> None:
        """Start a thread when more jobs wait than threads are idle (up to maxthreads)."""
        if not self._started or len(self._threads) >= self.maxthreads:
            return  # a pool never shrinks: once full, no lock is needed to know it
        with self._lock:
            if self._queue.qsize() <= self._idle or len(self._threads) >= self.maxthreads:
                return
            thread = threading.Thread(target=self._work, daemon=True,
                                      name=f"PoolThread-mailsuite-{self.name}-{len(self._threads)}")
            self._threads.append(thread)
            self._idle += 1  # counted idle until it takes its first job
        thread.start()

    def _work(self) -> None:
        """A pool thread: run jobs until the stop sentinel (None)."""
        get, lock, results, lines = self._queue.get, self._lock, self._results, self._lines
        job = None
        while True:
            if job is None:
                job = get()
            with lock:
                self._idle -= 1
                self._working += 1
            if job is None:
                with lock:
                    self._working -= 1
                return
            d, fn, args, kwargs, key = job
            job = None
            try:
                value, ok = fn(*args, **kwargs), True
            except BaseException:
                value, ok = Failure(), False
            with lock:
                self._working -= 1
                self._idle += 1
                results.append((d, ok, value))
                wake = not self._delivery_due
                self._delivery_due = True
                if key is not _NO_LINE:
                    line = lines[key]
                    if line:
                        job = line.popleft()  # the next of its key, on this thread at once
                        self._in_lines -= 1
                    else:
                        del lines[key]
            d = value = None
            if wake:
                self._reactor.callFromThread(self._deliver)

    def _deliver(self) -> None:
        """On the reactor: fire the Deferreds of every result that is in. Results that come
        in meanwhile wait for the next reactor turn (one more wake-up), so a steady stream of
        results cannot keep the reactor from its sockets."""
        with self._lock:
            batch = list(self._results)
            self._results.clear()
        for d, ok, value in batch:
            if ok:
                d.callback(value)
            else:
                d.errback(value)
        with self._lock:
            if self._results:
                again = True
            else:
                again = self._delivery_due = False
        if again:
            self._reactor.callFromThread(self._deliver)


class Pools(Service):
    """The pools of one mailsuite process, started and stopped with the service tree."""

    def __init__(self, db_threads: int = 4, reactor: Any = None):
        self.db = WorkerPool("db", db_threads, reactor)
        self.hash = WorkerPool("hash", 2, reactor)  # argon2 releases the GIL: 2 cores, 2 threads
        # Maildir/spool writes with fsync. Jobs mostly wait (fsync, a folder's lock), so more
        # threads than cores: while a busy folder's writers wait for each other, the jobs of
        # other folders and sessions (LIST, STATUS, SELECT) still find a free thread.
        self.io = WorkerPool("io", 16, reactor)
        # The store work of IMAP and POP3 sessions (service.py wraps it in mailbox/waits.py's
        # LockWaitingPool). Few threads: its jobs are short Python work between syscalls, and
        # every syscall hands the GIL over; with 16 runnable threads the reactor waited for the
        # GIL behind them (docs/design/imap.md, "Throughput"). Lock waits take no thread.
        self.mailbox = WorkerPool("mailbox", MAILBOX_THREADS, reactor)
        # Inbound checks (pyspf, dkimpy): threads that mostly wait for DNS answers, kept apart
        # so slow name servers cannot hold up Maildir writes.
        self.trust = WorkerPool("trust", 8, reactor)

    def all(self) -> tuple[WorkerPool, ...]:
        return (self.db, self.hash, self.io, self.mailbox, self.trust)

    def startService(self) -> None:
        super().startService()
        for pool in self.all():
            pool.start()

    def stopService(self) -> None:
        super().stopService()
        for pool in self.all():
            pool.stop()


class WorkPool(Protocol):
    """What parts need of a pool: run blocking `fn` off the reactor, get a Deferred; the jobs
    given with one key to `run_in_line` never run at the same time."""

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        ...

    def run_in_line(self, key: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any
                    ) -> defer.Deferred:
        ...


class InlinePool:
    """A WorkPool that runs `fn` at once on the calling thread (unit tests only)."""

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        return defer.maybeDeferred(fn, *args, **kwargs)

    def run_in_line(self, key: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any
                    ) -> defer.Deferred:
        return self.run(fn, *args, **kwargs)  # one job at a time anyway

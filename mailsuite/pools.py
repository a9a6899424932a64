"""Thread pools we own for blocking work: SQL, password hashing, file I/O with fsync.

Never the reactor's default pool: Twisted's resolver uses it for every hostname connect, so
filling it with SQL or argon2 work would stall outbound delivery (docs/design/twisted.md).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class PoolStopped(Exception):
    """Work submitted after shutdown began."""


class WorkerPool:
    """One named ThreadPool; `run(fn, *args)` returns a Deferred firing with fn's result."""

    def __init__(self, name: str, maxthreads: int, reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.name = name
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=maxthreads, name=f"mailsuite-{name}")
        self._started = False
        self._stopped = False
        self.jobs = 0  # given to the pool so far (metrics)

    def start(self) -> None:
        if not self._started and not self._stopped:
            self._pool.start()
            self._started = True

    def stop(self) -> None:
        # ThreadPool.stop() twice raises AlreadyQuit: stay idempotent. A
        # stopped ThreadPool cannot start again, so a stopped WorkerPool stays stopped.
        self._stopped = True
        if self._started:
            self._started = False
            self._pool.stop()

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred:
        if self._stopped:
            return defer.fail(PoolStopped(f"the {self.name} pool has stopped (shutting down)"))
        self.start()
        self.jobs += 1
        return threads.deferToThreadPool(self._reactor, self._pool, fn, *args, **kwargs)

    def backlog(self) -> int:
        """Jobs waiting for a free thread."""
        return self._pool.q.qsize()

    def busy(self) -> int:
        """Threads running a job now."""
        return len(self._pool.working)


class Pools(Service):
    """The pools of one mailsuite process, started and stopped with the service tree."""

    def __init__(self, db_threads: int = 4, reactor: Any = None):
        self.db = WorkerPool("db", db_threads, reactor)
        self.hash = WorkerPool("hash", 2, reactor)  # argon2 releases the GIL: 2 cores, 2 threads
        # Maildir/spool writes with fsync. Jobs mostly wait (fsync, a folder's lock), so more
        # threads than cores: while a busy folder's writers wait for each other, the jobs of
        # other folders and sessions (LIST, STATUS, SELECT) still find a free thread.
        self.io = WorkerPool("io", 16, reactor)
        # Inbound checks (pyspf, dkimpy): threads that mostly wait for DNS answers, kept apart
        # so slow name servers cannot hold up Maildir writes.
        self.trust = WorkerPool("trust", 8, reactor)

    def all(self) -> tuple[WorkerPool, ...]:
        return (self.db, self.hash, self.io, self.trust)

    def startService(self) -> None:
        super().startService()
        for pool in self.all():
            pool.start()

    def stopService(self) -> None:
        super().stopService()
        for pool in self.all():
            pool.stop()


class WorkPool(Protocol):
    """What parts need of a pool: run blocking `fn` off the reactor, get a Deferred."""

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        ...


class InlinePool:
    """A WorkPool that runs `fn` at once on the calling thread (unit tests only)."""

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        return defer.maybeDeferred(fn, *args, **kwargs)

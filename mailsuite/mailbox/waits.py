"""Waiting for a busy folder lock on the reactor, never in a pool thread.

Store operations try their locks (dotlock.py, index.FolderLock) and raise LockBusy at once when
another session or process holds one. `LockWaitingPool` wraps the io pool for the protocol
servers: a job that raised LockBusy gives its thread back, waits on the reactor with the other
waiters of the same lock, and runs again; after `wait` seconds the caller gets the LockBusy
(IMAP `NO [INUSE]`, POP3 `-ERR [IN-USE]`). N sessions waiting for one folder therefore cost no
pool thread, and everyone else is served meanwhile (docs/design/maildir.md, "The dotlock").

Jobs run through it must be safe to run again after a LockBusy: the store takes its locks
before its first change for that reason.
"""
from __future__ import annotations

import random
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from mailsuite.mailbox.errors import LockBusy
from mailsuite.pools import WorkPool

FIRST_RETRY = 0.01  # seconds after the first LockBusy
MAX_RETRY = 0.25  # the retries of one lock are at most this far apart


class _Waiter:
    """One job waiting: what to run again, until when, and its current backoff."""
    __slots__ = ("d", "fn", "args", "kwargs", "deadline", "delay", "busy")

    def __init__(self, d: defer.Deferred, fn: Callable[..., Any], args: tuple, kwargs: dict):
        self.d, self.fn, self.args, self.kwargs = d, fn, args, kwargs
        self.deadline: float | None = None  # set at the first LockBusy
        self.delay = FIRST_RETRY
        self.busy: LockBusy | None = None


class _Lock:
    """The waiters of one lock and the one timer that retries them all."""
    __slots__ = ("waiters", "call")

    def __init__(self) -> None:
        self.waiters: list[_Waiter] = []
        self.call: IDelayedCall | None = None


class LockWaitingPool:
    """A WorkPool: `run(fn, ...)` as the inner pool's, except that a LockBusy from `fn` is
    waited out on `clock` for at most `wait` seconds (then it is the result)."""

    def __init__(self, pool: WorkPool, clock: IReactorTime, wait: float):
        self.pool = pool
        self.clock = clock
        self.wait = wait
        self._locks: dict[str, _Lock] = {}

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._attempt(_Waiter(d, fn, args, kwargs))
        return d

    def waiting(self) -> dict[str, int]:
        """lock -> number of jobs waiting for it (for tests and diagnostics)."""
        return {k: len(v.waiters) for k, v in self._locks.items() if v.waiters}

    def _attempt(self, w: _Waiter) -> None:
        def failed(failure: Any) -> None:
            if not failure.check(LockBusy):
                w.d.errback(failure)
                return
            w.busy = failure.value
            now = self.clock.seconds()
            if w.deadline is None:
                w.deadline = now + self.wait
            if now >= w.deadline:
                w.d.errback(failure)  # the bound: this client is told the folder is in use
                return
            self._enqueue(w.busy.lock, w)

        try:
            job = self.pool.run(w.fn, *w.args, **w.kwargs)
        except Exception:
            w.d.errback()
            return
        job.addCallbacks(w.d.callback, failed)

    def _enqueue(self, key: str, waiter: _Waiter) -> None:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = _Lock()
        lock.waiters.append(waiter)
        if lock.call is None:
            self._schedule(key, lock)

    def _schedule(self, key: str, lock: _Lock) -> None:
        now = self.clock.seconds()
        # Jitter: two jobs that took two folders' locks in opposite orders must not meet
        # again at the same moment.
        delay = min(w.delay for w in lock.waiters) * random.uniform(0.75, 1.25)
        soonest = min(w.deadline for w in lock.waiters if w.deadline is not None)
        lock.call = self.clock.callLater(max(0.0, min(delay, soonest - now)),
                                         self._retry, key)

    def _retry(self, key: str) -> None:
        lock = self._locks[key]
        lock.call = None
        waiters, lock.waiters = lock.waiters, []
        now = self.clock.seconds()
        for w in waiters:
            if w.deadline is not None and now >= w.deadline:
                w.d.errback(w.busy)  # the bound: this client is told the folder is in use
            else:
                w.delay = min(w.delay * 2, MAX_RETRY)
                self._attempt(w)
        if not lock.waiters and lock.call is None and self._locks.get(key) is lock:
            del self._locks[key]  # those that meet the lock again come back with their backoff

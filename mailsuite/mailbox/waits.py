"""Waiting for a busy folder lock on the reactor, never in a pool thread.

Store operations try their locks (dotlock.py, index.FolderLock) and raise LockBusy at once when
another session or process holds one. `LockWaitingPool` wraps the io pool for the protocol
servers: a job that raised LockBusy gives its thread back, waits on the reactor with the other
waiters of the same lock, and runs again; after `wait` seconds the caller gets the LockBusy
(IMAP `NO [INUSE]`, POP3 `-ERR [IN-USE]`). N sessions waiting for one folder therefore cost no
pool thread, and everyone else is served meanwhile (docs/design/maildir.md, "The dotlock").

The waiters of one lock form a queue, served in arrival order: only the one in front tries
the lock, again after its backoff and at once whenever a job of this pool ends (in this process
that is how a lock is released). When it gets the lock, the next one tries at once. So a crowd
waiting for one busy folder costs one attempt at a time, not a stampede of them, and a session
that has waited longest is served first, not after everyone who arrived later.

Jobs run through it must be safe to run again after a LockBusy: the store takes its locks
before its first change for that reason.

The jobs of one folder (a Folder as first argument, or a bound method of one) run in the
folder's line (`WorkPool.run_in_line`): one after another, back to back on one thread, so the
sessions of a busy folder do not hand its lock, and the GIL, back and forth between threads
(docs/design/imap.md, "Throughput").
"""
from __future__ import annotations

import random
from collections import deque
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from mailsuite.mailbox.errors import LockBusy
from mailsuite.mailbox.folder import Folder
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
    """The waiters of one lock, in arrival order; the timer of the one in front, and whether
    its attempt is running."""
    __slots__ = ("waiters", "call", "trying")

    def __init__(self) -> None:
        self.waiters: deque[_Waiter] = deque()
        self.call: IDelayedCall | None = None
        self.trying = False


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
        self._attempt(_Waiter(d, fn, args, kwargs), None)
        return d

    def waiting(self) -> dict[str, int]:
        """lock -> number of jobs waiting for it (for tests and diagnostics)."""
        return {k: len(v.waiters) for k, v in self._locks.items() if v.waiters}

    def _attempt(self, w: _Waiter, key: str | None) -> None:
        """Run `w`'s job; `key`: the lock whose queue `w` heads, or None for a first run."""
        def done(result: Any) -> None:
            self._leave(key)
            w.d.callback(result)
            self._kick()

        def failed(failure: Any) -> None:
            if not failure.check(LockBusy):
                self._leave(key)
                w.d.errback(failure)
                self._kick()
                return
            w.busy = failure.value
            now = self.clock.seconds()
            if w.deadline is None:
                w.deadline = now + self.wait
            if now >= w.deadline:
                self._leave(key)
                w.d.errback(failure)  # the bound: this client is told the folder is in use
                self._kick()
            elif w.busy.lock == key:
                self._lost(key, w)
            else:  # a first LockBusy, or another lock than the one it waited for
                self._leave(key)
                self._enqueue(w.busy.lock, w)
                self._kick()

        try:
            line = _line(w.fn, w.args)
            if line is None:
                job = self.pool.run(w.fn, *w.args, **w.kwargs)
            else:
                job = self.pool.run_in_line(line, w.fn, *w.args, **w.kwargs)
        except Exception:
            self._leave(key)
            w.d.errback()
            return
        job.addCallbacks(done, failed)

    def _enqueue(self, key: str, waiter: _Waiter) -> None:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = _Lock()
        lock.waiters.append(waiter)
        if lock.call is None and not lock.trying:
            self._schedule(key, lock)

    def _leave(self, key: str | None) -> None:
        """The front waiter of `key` is done waiting (served, failed, or gone to another lock)."""
        lock = self._locks.get(key) if key is not None else None
        if lock is None:
            return
        lock.trying = False
        lock.waiters.popleft()
        if not lock.waiters:
            if lock.call is not None:
                lock.call.cancel()
            del self._locks[key]

    def _lost(self, key: str, w: _Waiter) -> None:
        """The front waiter met its lock busy again: it stays in front, with a longer backoff."""
        lock = self._locks[key]
        lock.trying = False
        w.delay = min(w.delay * 2, MAX_RETRY)
        self._schedule(key, lock)

    def _schedule(self, key: str, lock: _Lock) -> None:
        if lock.call is not None:
            lock.call.cancel()
        now = self.clock.seconds()
        # Jitter: two jobs that took two folders' locks in opposite orders must not meet
        # again at the same moment.
        delay = lock.waiters[0].delay * random.uniform(0.75, 1.25)
        soonest = min(w.deadline for w in lock.waiters if w.deadline is not None)
        lock.call = self.clock.callLater(max(0.0, min(delay, soonest - now)),
                                         self._retry, key)

    def _retry(self, key: str) -> None:
        """The timer of `key`: tell the waiters whose bound has passed, then let the front one
        try."""
        lock = self._locks[key]
        lock.call = None
        now = self.clock.seconds()
        expired = [w for w in lock.waiters if w.deadline is not None and now >= w.deadline]
        for w in expired:
            lock.waiters.remove(w)
        if not lock.waiters:
            del self._locks[key]
        elif not lock.trying:
            lock.trying = True
            self._attempt(lock.waiters[0], key)
        for w in expired:
            w.d.errback(w.busy)  # the bound: this client is told the folder is in use

    def _kick(self) -> None:
        """A job of this pool ended, perhaps releasing a lock: the front waiter of every lock
        not being tried tries now instead of after its backoff."""
        for key, lock in list(self._locks.items()):
            if not lock.trying and lock.waiters:
                if lock.call is not None:
                    lock.call.cancel()
                    lock.call = None
                lock.trying = True
                self._attempt(lock.waiters[0], key)


def _line(fn: Callable[..., Any], args: tuple) -> str | None:
    """The line of a job: the path of the folder it works on (its first argument, or the
    object of a bound method); None for a job on no folder."""
    target = args[0] if args and isinstance(args[0], Folder) else getattr(fn, "__self__", None)
    return target.path if isinstance(target, Folder) else None

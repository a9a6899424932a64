"""Group commit: one directory fsync makes the renames of every message that arrived together
durable (docs/design/queue.md, "Group commit").

An io job writes a message's files (each fsynced, renamed into place) and then asks
`GroupCommit.sync(directories)` on the reactor thread. Per directory at most one fsync runs at a
time: requests that come while one runs wait and are all covered by the next one, which starts as
soon as the running one ends. A request is never covered by an fsync that started before it (its
rename may have come after that fsync began). When an fsync fails, every request it was to cover
fails with that error, so every 250 of the batch becomes a 451 and nothing is acknowledged.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable

from twisted.internet import defer

from mailsuite.pools import WorkPool
from mailsuite.safeio import fsync_dir


@dataclass
class _Directory:
    """One directory's requests: tickets are taken on the reactor thread after the rename they
    stand for; the fsync job reads `requested` (under the lock) just before it calls fsync, so
    it covers every ticket up to that number."""

    requested: int = 0
    waiting: list[tuple[int, defer.Deferred]] = field(default_factory=list)
    running: bool = False


class GroupCommit:
    """Coalesces directory fsyncs; `sync` runs on the reactor thread, the fsyncs in `io`."""

    def __init__(self, io: WorkPool, sync: Callable[[str], None] = fsync_dir):
        self._io = io
        self._sync = sync
        self._lock = threading.Lock()
        self._dirs: dict[str, _Directory] = {}
        self.fsyncs = 0  # directory fsyncs done (for tests and the bench)

    def sync(self, directories: Iterable[str]) -> defer.Deferred:
        """Fires (with None) once every directory was fsynced after this call; errbacks with
        the first failure."""
        waits = [self._request(directory) for directory in sorted(set(directories))]
        if not waits:
            return defer.succeed(None)
        if len(waits) == 1:
            return waits[0]
        return defer.gatherResults(waits, consumeErrors=True).addCallbacks(
            lambda _: None, lambda f: f.value.subFailure)

    def _request(self, directory: str) -> defer.Deferred:
        state = self._dirs.setdefault(directory, _Directory())
        with self._lock:
            state.requested += 1
            ticket = state.requested
        d: defer.Deferred = defer.Deferred()
        state.waiting.append((ticket, d))
        if not state.running:
            self._start(directory, state)
        return d

    def _start(self, directory: str, state: _Directory) -> None:
        state.running = True
        try:
            d = self._io.run(self._fsync, directory, state)
        except Exception as e:
            d = defer.succeed((state.requested, e))
        d.addCallback(self._done, directory, state)

    def _fsync(self, directory: str, state: _Directory) -> tuple[int, BaseException | None]:
        """io thread: fsync once for every ticket taken so far."""
        with self._lock:
            covered = state.requested
        try:
            self._sync(directory)
        except Exception as e:
            return covered, e
        return covered, None

    def _done(self, outcome: tuple[int, BaseException | None], directory: str,
              state: _Directory) -> None:
        covered, error = outcome
        self.fsyncs += 1
        state.running = False
        batch = [d for ticket, d in state.waiting if ticket <= covered]
        state.waiting = [(t, d) for t, d in state.waiting if t > covered]
        for d in batch:
            if error is not None:
                d.errback(error)
            else:
                d.callback(None)
        if state.waiting and not state.running:
            self._start(directory, state)
        elif not state.waiting and not state.running:
            self._dirs.pop(directory, None)

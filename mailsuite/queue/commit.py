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

from typing import Callable, Iterable

from twisted.internet import defer
from twisted.python.failure import Failure

from mailsuite.pools import WorkPool
from mailsuite.safeio import fsync_dir


class GroupCommit:
    """Coalesces directory fsyncs; all methods run on the reactor thread."""

    def __init__(self, io: WorkPool, sync: Callable[[str], None] = fsync_dir):
        self._io = io
        self._sync = sync
        self._waiting: dict[str, list[defer.Deferred]] = {}  # not covered by a running fsync
        self._running: set[str] = set()
        self.fsyncs = 0  # directory fsyncs started (for tests and the bench)

    def sync(self, directories: Iterable[str]) -> defer.Deferred:
        """Fires (with None) once every directory was fsynced after this call; errbacks with
        the first failure."""
        waits = []
        for directory in sorted(set(directories)):
            d: defer.Deferred = defer.Deferred()
            self._waiting.setdefault(directory, []).append(d)
            waits.append(d)
            if directory not in self._running:
                self._start(directory)
        if not waits:
            return defer.succeed(None)
        if len(waits) == 1:
            return waits[0]
        return defer.gatherResults(waits, consumeErrors=True).addCallbacks(
            lambda _: None, lambda f: f.value.subFailure)

    def _start(self, directory: str) -> None:
        batch = self._waiting.pop(directory, [])
        if not batch:
            return
        self._running.add(directory)
        self.fsyncs += 1
        try:
            d = self._io.run(self._sync, directory)
        except Exception:
            d = defer.fail()
        d.addBoth(self._done, directory, batch)

    def _done(self, result: object, directory: str, batch: list[defer.Deferred]) -> None:
        self._running.discard(directory)
        for d in batch:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(None)
        if directory in self._waiting:
            self._start(directory)

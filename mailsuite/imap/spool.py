"""APPEND literals written to a temporary file as they arrive, not kept in memory.

The reactor thread only appends to a small buffer; the file writes run in the io pool. When
more than `MAX_PENDING` octets wait for the disk, `wants_pause` asks the connection to stop
reading until the writes catch up. See docs/design/imap.md, "Lines and literals".
"""
from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Callable, Optional

from twisted.internet import defer
from twisted.python.failure import Failure

from mailsuite.pools import WorkPool

CHUNK = 64 * 1024  # octets per write in the io pool
MAX_PENDING = 256 * 1024  # octets in memory (buffered or being written) before reading pauses


class LiteralSpool:
    """One literal on its way to a file in `directory` (the account's tmp/)."""

    def __init__(self, pool: WorkPool, directory: str, size: int):
        self.pool = pool
        self.directory = directory
        self.size = size
        self.path: Optional[str] = None
        self.file: Optional[BinaryIO] = None
        self.buffer = bytearray()
        self.in_flight = 0  # octets handed to the io pool and not written yet
        self.error: Optional[Failure] = None
        self.discarded = False
        self._chain: defer.Deferred = pool.run(self._open)
        self._chain.addErrback(self._failed)
        self.on_drained: Optional[Callable[[], None]] = None  # called when writes catch up

    # -- reactor thread ---------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.error is not None or self.discarded:
            return  # the command fails at the end; the literal's octets are still consumed
        self.buffer += data
        if len(self.buffer) >= CHUNK:
            self._flush()

    @property
    def wants_pause(self) -> bool:
        return len(self.buffer) + self.in_flight > MAX_PENDING and self.error is None

    def finish(self) -> defer.Deferred:
        """Fires with the file, rewound, once every octet is written; fails with the write
        error (ENOSPC ...) if one happened."""
        self._flush()
        d: defer.Deferred = defer.Deferred()

        def done(_: object) -> None:
            if self.error is not None:
                d.errback(self.error)
            elif self.discarded or self.file is None:
                d.errback(Failure(OSError("the spooled literal is gone")))
            else:
                self.pool.run(self._rewind).chainDeferred(d)
        self._chain.addBoth(done)
        return d

    def discard(self) -> None:
        """Close and remove the file (after the command, or when the connection is lost)."""
        if self.discarded:
            return
        self.discarded = True
        self.buffer = bytearray()
        self._chain.addBoth(lambda _: self.pool.run(self._remove)).addErrback(lambda _: None)

    # -- helpers ----------------------------------------------------------------------------
    def _flush(self) -> None:
        if not self.buffer or self.error is not None or self.discarded:
            return
        data, self.buffer = bytes(self.buffer), bytearray()
        self.in_flight += len(data)

        def write(_: object) -> defer.Deferred:
            if self.error is not None or self.discarded or self.file is None:
                return defer.succeed(None)
            return self.pool.run(self.file.write, data)

        def written(result: object) -> object:
            self.in_flight -= len(data)
            if not self.wants_pause and self.on_drained is not None:
                self.on_drained()
            return result
        self._chain.addCallback(write)
        self._chain.addErrback(self._failed)
        self._chain.addBoth(written)

    def _failed(self, failure: Failure) -> None:
        if self.error is None:
            self.error = failure
        return None

    def _open(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="imap-append.", suffix=".part", dir=self.directory)
        self.file = os.fdopen(fd, "w+b")

    def _rewind(self) -> BinaryIO:
        assert self.file is not None
        self.file.flush()
        self.file.seek(0)
        return self.file

    def _remove(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

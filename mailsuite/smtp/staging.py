"""A message being received, streamed to a file in the queue's incoming directory.

The SMTP server hands body bytes to `StagedMessage.write` as they arrive; the writes run one at a
time in the io pool, in order. `backlog` is what is not on disk yet: the server stops reading from
the client while it is over `HIGH_WATER` and reads again once it falls under `LOW_WATER`
(`on_backlog(True/False)`), so a client faster than the disk cannot grow our memory
(docs/design/smtp.md, "DATA"). `finish()` fires once everything is written and the file closed;
the queue then takes the file over (`MessageQueue.submit_file`), either after that or, with
`finish(then)`, in the same io job as the last write (docs/design/smtp.md, "DATA on disk").
With `finish(then, then_data)`, a message that is still all in memory at the end (under
WRITE_CHUNK, or kept there by `hold()`; nothing written yet) is never written here:
`then_data(bytes)` gets it instead (the queue delivers it to the Maildir from memory,
docs/design/queue.md). `discard()` removes the file.
Nothing here touches a file on the reactor thread.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure

from mailsuite import unique
from mailsuite.pools import WorkPool
from mailsuite.safeio import write_all

# Bytes handed to one io job at most, and the backlog that pauses / resumes the client.
WRITE_CHUNK = 64 * 1024
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# A message up to MEMORY_PER_MESSAGE may stay in memory until its final dot while the process
# holds no more than MEMORY_TOTAL of such messages (docs/design/smtp.md, "Messages kept in
# memory"); past either, it is staged as it arrives.
MEMORY_PER_MESSAGE = 1024 * 1024
MEMORY_TOTAL = 32 * 1024 * 1024


class MemoryBudget:
    """The bytes the process's messages may keep in memory; used on the reactor thread only."""

    def __init__(self, total: int = MEMORY_TOTAL):
        self.total = total
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.total:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


BUDGET = MemoryBudget()


class StagedMessage:
    def __init__(self, io: WorkPool, directory: str, on_backlog: Callable[[bool], None],
                 budget: MemoryBudget | None = None):
        self._io = io
        self._directory = directory
        self._on_backlog = on_backlog
        self._budget = budget if budget is not None else BUDGET
        self._held = 0  # bytes of the budget this message holds (hold())
        self._pending: list[bytes] = []
        self.backlog = 0  # bytes accepted by write() and not yet on disk
        self.size = 0  # bytes accepted by write()
        self.path: str | None = None
        self._fd: int | None = None
        # The file is created by the first write job (with its bytes; closed at once when that
        # is the whole message), so a small message costs one io job, not open+write+close.
        self._busy = False  # an io job (create, write, close) is running
        self._over = False  # we asked the server to stop reading
        self.error: Failure | None = None  # the first failed io job; further writes are dropped
        self._done: list[defer.Deferred] = []  # finish()/discard() waiting for the last job
        self._closing = False
        self._discarded = False
        self._then: Callable[[str], Any] | None = None  # run after the close (finish(then))
        self._then_data: Callable[[bytes], Any] | None = None  # run instead, for a message
        # that never left memory (finish(then, then_data))
        self._outcome: Any = _NOT_RUN  # what `then` returned, or its Failure

    # -- reactor side ------------------------------------------------------------------------
    def hold(self, size: int) -> bool:
        """May the caller keep the message, `size` bytes so far, in memory rather than write()
        it? Only while nothing of it was written, up to MEMORY_PER_MESSAGE, and while the
        budget allows; it is then delivered from memory at finish(then, then_data). The hold
        ends with the message (finished, discarded) or at the first write()."""
        if self.size or self._closing or size > MEMORY_PER_MESSAGE:
            return False
        if size > self._held:
            if not self._budget.take(size - self._held):
                return False
            self._held = size
        return True

    def _release_memory(self) -> None:
        if self._held:
            self._budget.give(self._held)
            self._held = 0

    def write(self, data: bytes) -> None:
        if not data or self._closing or self.error is not None:
            return
        self._release_memory()  # from now on the bytes are bounded by HIGH_WATER
        self._pending.append(data)
        self.backlog += len(data)
        self.size += len(data)
        if self.backlog > HIGH_WATER and not self._over:
            self._over = True
            self._on_backlog(True)
        self._pump()

    def write_last(self, data: bytes) -> None:
        """The message's last bytes: held for `finish`, so that one job writes them, closes the
        file (creating it first, for a message that is all in `data`) and runs `then`."""
        if data and not self._closing and self.error is None:
            self._pending.append(data)
            self.backlog += len(data)
            self.size += len(data)

    def finish(self, then: Callable[[str], Any] | None = None,
               then_data: Callable[[bytes], Any] | None = None) -> defer.Deferred:
        """Fires with the path once every byte is written and the file closed; errbacks with
        the first io failure (the file is then already removed). With `then`, `then(path)`
        runs in the io thread right after the close, in the job that writes the last bytes
        (a message under WRITE_CHUNK: create, write, close and `then` in one job), and the
        Deferred fires with its result or its failure (the file is then left for `discard`).
        With `then_data` too, a message no byte of which is on disk yet (under WRITE_CHUNK,
        or kept in memory by hold()) is not written at all: `then_data(message)` runs in the
        io thread instead of the create, write, close and `then`, and the Deferred fires with
        its result or failure (nothing to discard)."""
        self._closing = True
        self._then = then
        self._then_data = then_data if then is not None else None
        d: defer.Deferred = defer.Deferred()
        self._done.append(d)
        self._pump()
        return d

    def discard(self) -> None:
        """Abandon the message: stop writing and remove the file (after the job in flight)."""
        self._release_memory()
        self._discarded = self._closing = True
        self._pending = []
        self.backlog = 0
        self._release()
        self._pump()

    # -- io jobs -----------------------------------------------------------------------------
    def _io_job(self, fn: Callable, *args: object) -> defer.Deferred:
        try:
            return self._io.run(fn, *args)
        except Exception:
            return defer.fail()

    def _created(self, result: tuple[int | None, str], n: int) -> None:
        self._fd, self.path = result
        self._written(n, n)

    def _pump(self) -> None:
        if self._busy:
            return
        writing = not self._discarded and self.error is None
        if self.path is None and not (writing and (self._pending or self._closing)):
            if self._closing:
                self._complete()  # nothing was created (or the create failed): nothing to remove
            return
        if writing and (self._pending or self.path is None):
            data = b"".join(self._pending) if len(self._pending) > 1 else \
                (self._pending[0] if self._pending else b"")
            if self.path is None and self._closing and self._then_data is not None:
                # Nothing of it was written (under WRITE_CHUNK, or held): from memory.
                self._pending = []
                self._busy = True
                self._io_job(self._then_data, data).addBoth(self._ran_in_memory)
                return
            chunk, rest = data[:WRITE_CHUNK], data[WRITE_CHUNK:]
            self._pending = [rest] if rest else []
            self._busy = True
            if self.path is None:
                last = self._closing and not rest
                job = self._last_job if last else self._io_job
                job(_create, self._directory, chunk, last).addCallbacks(
                    self._created, self._failed, callbackArgs=(len(chunk),))
            elif self._closing and not rest:
                fd, self._fd = self._fd, None  # the last bytes: write and close in one job
                self._last_job(_write_close, fd, chunk).addCallbacks(
                    self._written, self._failed, callbackArgs=(len(chunk),))
            else:
                self._io_job(write_all, self._fd, chunk).addCallbacks(
                    self._written, self._failed, callbackArgs=(len(chunk),))
            return
        if not self._closing:
            return
        fd, self._fd = self._fd, None
        remove = self._discarded or self.error is not None
        if fd is None and not remove:
            if self._then is None or self._outcome is not _NOT_RUN:
                self._complete()
                return
            self._busy = True  # closed already: `then` gets a job of its own
            self._last_job(_nothing).addBoth(self._closed)
            return
        path = self.path if remove else None
        self.path = None if remove else self.path
        self._busy = True
        job = self._io_job if remove else self._last_job
        job(_close, fd, path).addBoth(self._closed)

    def _last_job(self, fn: Callable, *args: object) -> defer.Deferred:
        """The io job that completes the file, followed in the same job by `then`."""
        if self._then is None:
            return self._io_job(fn, *args)
        return self._io_job(_and_then, fn, args, self._then, self.path).addCallback(
            self._then_ran)

    def _then_ran(self, result: tuple[object, Any]) -> object:
        job_result, self._outcome = result
        return job_result

    def _ran_in_memory(self, result: Any) -> None:
        """`then_data` ran (or failed) on the whole message: no file was made."""
        self._busy = False
        self._outcome = result
        self._pending = []
        self.backlog = 0
        self._complete()

    def _written(self, _: int, n: int) -> None:
        self._busy = False
        self.backlog = max(0, self.backlog - n)  # 0 already if discarded meanwhile
        if self.backlog < LOW_WATER:
            self._release()
        self._pump()

    def _release(self) -> None:
        if self._over:
            self._over = False
            self._on_backlog(False)

    def _failed(self, failure: Failure) -> None:
        self._busy = False
        if self.error is None:
            self.error = failure
        self._pending = []
        self.backlog = 0
        self._release()
        self._closing = True  # nothing more will be written: remove the file
        self._pump()

    def _closed(self, result: object) -> None:
        self._busy = False
        if isinstance(result, Failure) and self.error is None and not self._discarded:
            self.error = result
        self._complete()

    def _complete(self) -> None:
        self._release_memory()
        done, self._done = self._done, []
        for d in done:
            if self.error is not None and not self._discarded:
                d.errback(self.error)
            elif self._then is not None and not self._discarded:
                if isinstance(self._outcome, Failure):
                    d.errback(self._outcome)
                else:
                    d.callback(self._outcome)
            else:
                d.callback(self.path)


_NOT_RUN = object()  # `then` has not run (yet)


def _and_then(fn: Callable, args: tuple, then: Callable[[str], Any], path: str | None
              ) -> tuple[object, Any]:
    """io thread: the job that completes the file (`fn`, whose failure is the file's), then
    `then(path)` (the path `_create` made when `path` is None); its failure is returned, not
    raised, so the reactor side can tell it from a failed write."""
    result = fn(*args)
    if path is None:
        path = result[1]  # type: ignore[index]
    try:
        return result, then(path)
    except BaseException:
        return result, Failure()


def _nothing() -> None:
    return None


def _open(directory: str) -> tuple[int, str]:
    """io thread: a new file `<pid>.<random>` (the pid lets start-up clean-up tell a crashed
    receiver's files from those of a live process on the same spool)."""
    path = os.path.join(directory, f"{unique.pid()}.{unique.token_hex(8)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        return os.open(path, flags, 0o600), path
    except FileNotFoundError:  # the first message (or the directory was removed)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        return os.open(path, flags, 0o600), path


def _create(directory: str, data: bytes, close: bool) -> tuple[int | None, str]:
    """io thread: a new staged file with `data` in it; closed when `close` (the whole message),
    else its descriptor is returned for the writes that follow. On failure nothing is left."""
    fd, path = _open(directory)
    try:
        write_all(fd, data)
        if close:
            os.close(fd)
            return None, path
    except BaseException:
        try:
            os.close(fd)
        finally:
            os.unlink(path)
        raise
    return fd, path


def _write_close(fd: int | None, data: bytes) -> int:
    """io thread: the last bytes of the message, then close (the descriptor is closed even
    when the write fails; the file is then removed by the failure path)."""
    try:
        if fd is not None:
            write_all(fd, data)
    finally:
        if fd is not None:
            os.close(fd)
    return len(data)


def _close(fd: int | None, remove: str | None) -> None:
    """io thread: close, and unlink `remove` if given (close errors are reported)."""
    try:
        if fd is not None:
            os.close(fd)
    finally:
        if remove is not None:
            try:
                os.unlink(remove)
            except FileNotFoundError:
                pass

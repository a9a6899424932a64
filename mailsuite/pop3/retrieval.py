"""RETR and TOP (RFC 1939 §7): one message streamed to the client, a 64 KiB read at a time in
the io pool and none while the session's output is paused, through the one dot-stuffer
(mailsuite.dotstuff), which is correct across chunk boundaries (docs/design/pop3.md).

`open_for_sending` runs in the io pool; `MessageSender` runs on the reactor and is driven by
POP3Server, the transport's producer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsuite.dotstuff import DotStuffer
from mailsuite.mailbox.store import MessageInfo

if TYPE_CHECKING:
    from mailsuite.mailbox.store import Folder
    from mailsuite.pop3.server import POP3Server

log = Logger()

CHUNK = 64 * 1024


class Readable(Protocol):
    """An open message: the file itself (RETR) or a TopReader over it (TOP)."""

    def read(self, size: int) -> bytes:
        ...

    def close(self) -> None:
        ...


class TopReader:
    """A binary file limited to the header and the first `lines` body lines (TOP, RFC 1939 §7).
    Used from the io thread only."""

    def __init__(self, f: BinaryIO, lines: int):
        self._f = f
        self._in_header = True
        self._left = lines

    def read(self, size: int) -> bytes:
        out = []
        total = 0
        while total < size:
            if not self._in_header and self._left <= 0:
                break
            line = self._f.readline(CHUNK)
            if not line:
                break
            if self._in_header:
                if line in (b"\r\n", b"\n"):
                    self._in_header = False
            elif line.endswith(b"\n"):
                self._left -= 1
            out.append(line)
            total += len(line)
        return b"".join(out)

    def close(self) -> None:
        self._f.close()


class MessageSender:
    """Streams one file through a DotStuffer: one read in the io pool at a time, none while the
    session's output is paused (POP3Server is the transport's producer), so a 50 MB message
    never sits in memory and a client that does not read holds at most one chunk."""

    def __init__(self, proto: "POP3Server", f: Readable):
        self.proto = proto
        self.f: Readable | None = f
        self.stuffer = DotStuffer()
        self.reading = False
        self.stopped = False
        self.done: defer.Deferred = defer.Deferred()

    def start(self) -> defer.Deferred:
        self._next()
        return self.done

    def resume(self) -> None:
        self._next()

    def _next(self) -> None:
        if self.reading or self.stopped or self.proto.output_paused:
            return
        self.reading = True
        d = self.proto.io(self.f.read, CHUNK)
        d.addCallbacks(self._got, self._failed)

    def _got(self, data: bytes) -> None:
        self.reading = False
        if self.stopped:
            self._release()
            return
        if not data:
            self.proto.send(self.stuffer.finish())
            self.stop()
            return
        self.proto.resetTimeout()  # a long download is not an idle client
        self.proto.send(self.stuffer.feed(data))
        self._next()

    def _failed(self, failure: Failure) -> None:
        self.reading = False
        log.error("pop3 {user}: reading a message failed: {error}; closing the connection",
                  user=self.proto.user, error=describe(failure.value))
        # The response has started: we cannot send -ERR any more, so drop the connection.
        self.stop()
        self.proto.abort()

    def stop(self) -> None:
        """End the transfer (done, failed, or the connection went away); closes the file once
        no read is in flight."""
        if not self.stopped:
            self.stopped = True
            if not self.done.called:
                self.done.callback(None)
        if not self.reading:
            self._release()

    def _release(self) -> None:
        f, self.f = self.f, None
        if f is not None:
            self.proto.io(f.close).addErrback(lambda _: None)


# -- blocking (run in the io pool) -----------------------------------------------------------
def open_for_sending(folder: "Folder", info: MessageInfo, top_lines: int | None) -> Readable:
    f = folder.open_message(info.uid)
    return f if top_lines is None else TopReader(f, top_lines)


def describe(error: BaseException) -> str:
    """An exception in one log line: its class and message, never a traceback."""
    text = str(error).replace("\n", " ")[:300]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__

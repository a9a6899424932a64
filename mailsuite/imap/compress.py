"""COMPRESS=DEFLATE (RFC 4978): raw deflate (RFC 1951, zlib with wbits=-15) in both directions
once the tagged OK has been sent, inside TLS when TLS is on. See docs/design/imap.md,
"COMPRESS=DEFLATE".

Output: every write goes through one compressor; a Z_SYNC_FLUSH follows each burst of
responses (scheduled for the next reactor turn, and before closing), so the client can decode
every response without waiting for more (RFC 4978 §4).

Input: inflated at most `CHUNK` octets at a time, and only while the line reader is not paused:
a small compressed packet that inflates to gigabytes (a decompression bomb) costs one chunk of
memory and then waits, compressed, like any input the server is not reading yet.
"""
from __future__ import annotations

import zlib
from typing import Any, Callable, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver

from mailsuite.imap import responses as R
from mailsuite.imap.parser import Token, astring
from mailsuite.imap.responses import CommandError, bad
from mailsuite.imap.session import Session

log = Logger()

CHUNK = 64 * 1024  # octets inflated per step
COMPRESSIONACTIVE = b"COMPRESSIONACTIVE"


class DeflateTransport:
    """The connection's transport with deflate in front of it; everything but writing and
    closing is the wrapped transport's (producer registration, peer, TLS state...)."""

    def __init__(self, transport: Any, clock: IReactorTime, level: int = 6):
        self._transport = transport
        self._clock = clock
        self._z = zlib.compressobj(level, zlib.DEFLATED, -15)
        self._flush_call: Optional[IDelayedCall] = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        out = self._z.compress(data)
        if out:
            self._transport.write(out)
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self.flush)

    def writeSequence(self, seq: list[bytes]) -> None:
        for data in seq:
            self.write(data)

    def flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        out = self._z.flush(zlib.Z_SYNC_FLUSH)
        if out:
            self._transport.write(out)

    def loseConnection(self) -> None:
        self.flush()
        self._transport.loseConnection()

    def abortConnection(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._transport.abortConnection()


class Inflater:
    """Compressed input -> the line reader, in CHUNK steps while `can_take()`."""

    def __init__(self, deliver: Callable[[bytes], None], can_take: Callable[[], bool],
                 failed: Callable[[str], None]):
        self._z = zlib.decompressobj(-15)
        self.pending = b""  # compressed octets not inflated yet
        self._more = False  # the last step filled CHUNK: zlib may hold more output
        self._running = False
        self._deliver, self._can_take, self._failed = deliver, can_take, failed

    def feed(self, data: bytes) -> None:
        if data:
            self.pending += data
        if self._running:
            return  # the step running further up the stack goes on
        self._running = True
        try:
            self._deliver(b"")  # lines already inflated and waiting come first
            while self._can_take() and (self.pending or self._more):
                before = len(self.pending)
                try:
                    out = self._z.decompress(self.pending, CHUNK)
                except zlib.error as e:
                    self.pending, self._more = b"", False
                    self._failed(f"invalid deflate data: {e}")
                    return
                self.pending = self._z.unconsumed_tail
                self._more = len(out) == CHUNK
                if self._z.eof:
                    self.pending, self._more = b"", False
                    self._failed("the client ended the deflate stream")
                    return
                if out:
                    self._deliver(out)
                elif len(self.pending) == before:
                    break
        finally:
            self._running = False


class CompressCommand(Session):
    """COMPRESS DEFLATE. Placed before LineReceiver among IMAPServer's bases: its dataReceived
    inflates before the line reader sees the octets."""

    inflater: Optional[Inflater] = None

    def dataReceived(self, data: bytes) -> None:
        # Inside the line reader's own loop (setLineMode after a literal) the octets are
        # inflated already.
        if self.inflater is not None and not self._busyReceiving:  # type: ignore[attr-defined]
            self.inflater.feed(data)
        else:
            LineReceiver.dataReceived(self, data)  # type: ignore[arg-type]

    def do_COMPRESS(self, tag: bytes, args: list[Token]) -> None:
        if len(args) != 1:
            raise bad("COMPRESS needs a mechanism")
        if astring(args[0]).upper() != b"DEFLATE":
            raise bad("unknown compression mechanism")  # RFC 4978 §3
        if self.inflater is not None:
            raise CommandError(R.NO, "DEFLATE is active already", COMPRESSIONACTIVE)
        self.send(tag + b" OK DEFLATE active")  # the last uncompressed octets we send
        # What the client pipelined after the command is compressed already (RFC 4978 §3).
        rest = self.clearLineBuffer()  # type: ignore[attr-defined]
        self.transport = DeflateTransport(self.transport, self.clock)  # type: ignore[assignment]
        self.inflater = Inflater(
            lambda data: LineReceiver.dataReceived(self, data),  # type: ignore[arg-type]
            lambda: not self.paused and not self.closed,  # type: ignore[attr-defined]
            self._compression_failed)
        self.inflater.pending = rest
        # The line reader's loop that ran this command has nothing left to read: inflate `rest`
        # on the next turn, once this command is done.
        self.clock.callLater(0, self._inflate_waiting)
        log.info("imap: {user} from {peer}: COMPRESS DEFLATE", user=self.user, peer=self.peer)
        return None  # answered; done() resumes reading, which inflates `rest`

    def _inflate_waiting(self) -> None:
        if not self.closed and not self.paused:  # type: ignore[attr-defined]
            self.dataReceived(b"")

    def _compression_failed(self, why: str) -> None:
        log.info("imap: {user} from {peer}: {why}: closing", user=self.user, peer=self.peer, why=why)
        self.send(b"* BYE " + why.encode("ascii", "replace"))
        self.hangup()

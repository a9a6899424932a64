"""clamd as a content engine: the INSTREAM command over a unix or TCP socket
(docs/design/trust-engines.md; clamd(8), "INSTREAM").

One connection per message: `zINSTREAM\\0`, then the message in chunks, each `<4-byte big-endian
length><data>`, then a zero-length chunk; clamd answers one line ended by NUL: `stream: OK`,
`stream: <Signature> FOUND`, or a text ending in `ERROR`. The file is read in the io pool chunk
by chunk and each chunk is written only when the transport is not paused (flow control), so a
25 MB message neither blocks the reactor nor sits whole in memory. Failures give the [clamd]
on_failure verdict and one log line; `scan` never errbacks.
"""
from __future__ import annotations

import struct
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (TCP4ClientEndpoint, TCP6ClientEndpoint,
                                        UNIXClientEndpoint)
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from mailsuite.config import ClamdSection
from mailsuite.pools import WorkPool
from mailsuite.smtp.replies import Reply
from mailsuite.trust import ACCEPT, REJECT, TEMPFAIL, Envelope, Verdict
from mailsuite.trust.rspamd import timed_out

log = Logger(namespace="mailsuite.trust.clamd")

UNAVAILABLE = Reply(451, "4.7.1", "virus scanner unavailable, try again later",
                    reason="scanner_unavailable")
CHUNK = 64 * 1024
MAX_ANSWER = 4096  # clamd's answer is one short line; more than this is not clamd
MAX_SIGNATURE = 100


def printable(text: str, limit: int) -> str:
    """`text` as printable ASCII on one line, cut to `limit` characters."""
    chars = (c if " " <= c <= "~" else " " for c in text)
    return " ".join("".join(chars).split())[:limit]


class ClamdFailure(Exception):
    """clamd did not scan the message. `short` goes into the X-Virus-Scanned header, the
    exception text into the log."""

    def __init__(self, short: str, detail: str = ""):
        super().__init__(detail or short)
        self.short = short


@implementer(IPushProducer)
class InstreamProtocol(Protocol):
    """The client side of one INSTREAM exchange.

    `answer` fires with clamd's answer (str, without the NUL) or fails when the connection
    ends first. The caller writes chunks with `send_chunk` after `ready()` fires (the transport
    is not paused), and `finish()` after the last one."""

    def __init__(self) -> None:
        self.answer: Deferred = Deferred()
        self._buffer = b""
        self._paused = False
        self._waiting: Deferred | None = None

    @property
    def answered(self) -> bool:
        return self.answer.called

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.transport.write(b"zINSTREAM\0")

    def send_chunk(self, data: bytes) -> None:
        self.transport.write(struct.pack(">I", len(data)) + data)

    def finish(self) -> None:
        self.transport.write(struct.pack(">I", 0))

    def ready(self) -> Deferred:
        """Fires when the transport accepts more data."""
        if not self._paused:
            return defer.succeed(None)
        if self._waiting is None:
            self._waiting = Deferred()
        return self._waiting

    # IPushProducer: the transport pauses us when its write buffer is full.
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.answered:
            return
        self._buffer += data
        end = self._buffer.find(b"\0")
        if end >= 0:
            self.answer.callback(self._buffer[:end].decode("ascii", "replace"))
        elif len(self._buffer) > MAX_ANSWER:
            self.answer.errback(ClamdFailure("clamd error", "answer too long"))

    def connectionLost(self, reason: Any = None) -> None:
        self.resumeProducing()  # wake a writer waiting on ready(); it then sees `answered`
        if not self.answered:
            self.answer.errback(ClamdFailure("connection lost",
                                             "connection closed before clamd answered"))

    def close(self) -> None:
        self.answer.addErrback(lambda _: None)  # an answer nobody waits for any more
        if self.transport is not None:
            self.transport.unregisterProducer()
            self.transport.abortConnection()


def endpoint_for(socket: str, reactor: Any, timeout: float) -> Any:
    """A client endpoint for [clamd] socket: "tcp:host:port" or a unix socket path."""
    if socket.startswith("tcp:"):
        host, _, port = socket[4:].rpartition(":")
        host = host.strip("[]")
        if ":" in host:
            return TCP6ClientEndpoint(reactor, host, int(port), timeout=timeout)
        return TCP4ClientEndpoint(reactor, host, int(port), timeout=timeout)
    return UNIXClientEndpoint(reactor, socket, timeout=timeout)


def interpret(answer: str) -> Verdict:
    """The Verdict for clamd's INSTREAM answer (raises ClamdFailure for errors)."""
    text = answer.strip()
    if text.startswith("stream:"):
        text = text[len("stream:"):].strip()
    if text == "OK":
        return Verdict(ACCEPT, log="clamd: clean")
    if text.endswith(" FOUND"):
        signature = printable(text[:-len(" FOUND")], MAX_SIGNATURE) or "unknown"
        return Verdict(REJECT, log=f"clamd: virus {signature}",
                       reply=Reply(554, "5.7.0", f"message refused: {signature}", reason="virus"))
    if "size limit exceeded" in text:
        raise ClamdFailure("size limit exceeded", printable(answer, 200))
    raise ClamdFailure("clamd error", printable(answer, 200))


class ClamdScanner:
    """ContentScanner over clamd's INSTREAM.

    config: the [clamd] section; reactor: for connections and the timeout (a task.Clock in
    tests); io: the pool file reads run in; endpoint: an IStreamClientEndpoint (by default made
    from config.socket; tests pass a fake); chunk_size: bytes per INSTREAM chunk."""

    name = "clamd"

    def __init__(self, config: ClamdSection, reactor: Any, io: WorkPool, endpoint: Any = None,
                 chunk_size: int = CHUNK):
        self.config = config
        self.reactor = reactor
        self.io = io
        self.chunk_size = chunk_size
        if endpoint is None and config.socket:
            endpoint = endpoint_for(config.socket, reactor, config.timeout)
        self.endpoint = endpoint

    def wanted(self, envelope: Envelope) -> bool:
        if not self.config.socket:
            return False
        return envelope.listener == "mx" or self.config.scan_submission

    def scan(self, envelope: Envelope, message_path: str, size: int) -> Deferred:
        tag = envelope.queue_id or "-"
        if size > self.config.max_size:
            return defer.succeed(Verdict(
                ACCEPT, headers=["X-Virus-Scanned: unscanned (too large)"],
                log=f"clamd: not scanned, {size} bytes > max_size {self.config.max_size}"))
        d = self._exchange(message_path)
        # One deadline for the whole exchange: connect, send, answer.
        d.addTimeout(self.config.timeout, self.reactor, onTimeoutCancel=timed_out)
        d.addCallback(interpret)
        d.addErrback(self._failed, tag)
        return d

    @defer.inlineCallbacks
    def _exchange(self, path: str) -> Any:
        proto = yield self.endpoint.connect(Factory.forProtocol(InstreamProtocol))
        f = None
        try:
            f = yield self.io.run(open, path, "rb")
            sent = 0
            while not proto.answered:
                data = yield self.io.run(f.read, self.chunk_size)
                if proto.answered:
                    break  # clamd answered early (an error): stop sending
                if not data:
                    proto.finish()
                    break
                sent += len(data)
                if sent > self.config.max_size:
                    raise ClamdFailure("too large", "message grew beyond max_size")
                yield proto.ready()
                if proto.answered:
                    break
                proto.send_chunk(data)
            answer = yield proto.answer
        finally:
            if f is not None:
                self.io.run(f.close).addErrback(lambda _: None)
            proto.close()
        return answer

    def _failed(self, failure: Any, tag: str) -> Verdict:
        exc = failure.value
        if isinstance(exc, (defer.TimeoutError, defer.CancelledError)):
            short, detail = "timeout", f"no answer within {self.config.timeout} s"
        elif isinstance(exc, ClamdFailure):
            short, detail = exc.short, printable(str(exc), 200)
        elif isinstance(exc, OSError):
            short, detail = "cannot read message", printable(str(exc), 200)
        else:
            short = "connection failed"
            detail = printable(f"{type(exc).__name__}: {exc}", 200)
        log.warn("clamd: scan of {tag} failed ({detail}); on_failure={policy}",
                 tag=tag, detail=detail, policy=self.config.on_failure)
        logline = f"clamd: unavailable ({detail})"
        if self.config.on_failure == "accept":
            return Verdict(ACCEPT, headers=[f"X-Virus-Scanned: unscanned ({short})"],
                           log=logline)
        return Verdict(TEMPFAIL, reply=UNAVAILABLE, log=logline)

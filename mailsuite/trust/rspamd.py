"""rspamd as a content engine: one POST to /checkv2 per message (docs/design/trust-engines.md).

The request carries the message as its body and the envelope in rspamd's request headers (IP,
Helo, From, Rcpt, User, Queue-Id, MTA-Name, Password); the JSON answer's `action` becomes our
Verdict. The message file is read in the io pool, never on the reactor. Any failure (refused,
timeout, HTTP status other than 200, an answer we cannot read) gives the [rspamd] on_failure
verdict and one log line; `scan` never errbacks.
"""
from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from mailsuite.config import RspamdSection
from mailsuite.pools import WorkPool
from mailsuite.smtp.replies import Reply
from mailsuite.trust import ACCEPT, JUNK, REJECT, TEMPFAIL, Envelope, Verdict

log = Logger(namespace="mailsuite.trust.rspamd")

UNAVAILABLE = Reply(451, "4.7.1", "content scanner unavailable, try again later",
                    reason="scanner_unavailable")
TRY_LATER = Reply(451, "4.7.1", "try again later", reason="spam")
SPAM = Reply(550, "5.7.1", "message refused as spam", reason="spam")
MAX_REPLY_TEXT = 200
MAX_ANSWER = 4 * 1024 * 1024  # an answer longer than this is not rspamd's


class ScannerFailure(Exception):
    """rspamd did not give a usable answer; the text says why (for the log)."""


def printable(text: Any, limit: int) -> str:
    """`text` as printable ASCII on one line (control characters and non-ASCII become spaces,
    runs of spaces collapse), cut to `limit` characters."""
    chars = (c if " " <= c <= "~" else " " for c in str(text))
    return " ".join("".join(chars).split())[:limit]


def header_value(text: str) -> bytes:
    """A request header value: UTF-8 (addresses may be internationalised, RFC 6531), with
    every control character (CR, LF, NUL...) removed so it cannot split the header."""
    return "".join(c for c in text if c >= " " and c != "\x7f").encode("utf-8")


@implementer(IBodyProducer)
class _BytesProducer:
    """The request body, already in memory: written at once (no cooperator, no file reads on
    the reactor)."""

    def __init__(self, body: bytes):
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred:
        consumer.write(self._body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def default_http_client(reactor: Any) -> tuple[Any, Any]:
    """(treq HTTPClient over a persistent connection pool, the pool)."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 4
    pool.cachedConnectionTimeout = 60
    agent = Agent(reactor, pool=pool)
    return HTTPClient(agent, data_to_body_producer=_BytesProducer), pool


def read_message(path: str, limit: int) -> bytes:
    """The message file's bytes, at most `limit` (runs in the io pool)."""
    with open(path, "rb") as f:
        return f.read(limit)


class RspamdScanner:
    """ContentScanner over rspamd's HTTP protocol.

    config: the [rspamd] section; reactor: for timeouts (and the default HTTP client);
    hostname: our host name (sent as MTA-Name); io: the pool file reads run in; http: a treq-like
    client (`post(url, data=, headers=, allow_redirects=)`), by default treq's HTTPClient over a
    persistent HTTPConnectionPool (tests pass treq.testing.StubTreq)."""

    name = "rspamd"

    def __init__(self, config: RspamdSection, reactor: Any, hostname: str, io: WorkPool,
                 http: Any = None):
        self.config = config
        self.reactor = reactor
        self.hostname = hostname
        self.io = io
        self._pool = None
        if http is None:
            http, self._pool = default_http_client(reactor)
        self.http = http
        self.url = config.url.rstrip("/") + "/checkv2"

    def wanted(self, envelope: Envelope) -> bool:
        if not self.config.url:
            return False
        return envelope.listener == "mx" or self.config.scan_submission

    def close(self) -> Deferred:
        """Close the pooled connections (at service shutdown)."""
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return defer.succeed(None)

    def request_headers(self, envelope: Envelope) -> Headers:
        """rspamd's request headers for `envelope` (docs/design/trust-engines.md)."""
        h = Headers()
        h.setRawHeaders(b"IP", [header_value(envelope.client_ip)])
        h.setRawHeaders(b"Helo", [header_value(envelope.helo)])
        h.setRawHeaders(b"From", [header_value(envelope.mail_from or "<>")])
        if envelope.recipients:
            h.setRawHeaders(b"Rcpt", [header_value(r) for r in envelope.recipients])
        if envelope.auth_user:
            h.setRawHeaders(b"User", [header_value(envelope.auth_user)])
        if envelope.queue_id:
            h.setRawHeaders(b"Queue-Id", [header_value(envelope.queue_id)])
        if self.hostname:
            h.setRawHeaders(b"MTA-Name", [header_value(self.hostname)])
        if self.config.password:
            h.setRawHeaders(b"Password", [header_value(self.config.password)])
        return h

    def scan(self, envelope: Envelope, message_path: str, size: int) -> Deferred:
        tag = envelope.queue_id or "-"
        if size > self.config.max_size:
            return defer.succeed(Verdict(
                ACCEPT, headers=["X-Spam-Status: Unknown, message too large to scan"],
                log=f"rspamd: not scanned, {size} bytes > max_size {self.config.max_size}"))
        d = self.io.run(read_message, message_path, self.config.max_size + 1)

        def send(body: bytes) -> Deferred:
            if len(body) > self.config.max_size:
                raise ScannerFailure("message grew beyond max_size while being read")
            posted = self.http.post(self.url, data=body, headers=self.request_headers(envelope),
                                    allow_redirects=False)
            posted.addCallback(self._read_answer)
            return posted

        d.addCallback(send)
        # One deadline for the whole exchange: connect, send, response and body.
        d.addTimeout(self.config.timeout, self.reactor, onTimeoutCancel=timed_out)
        d.addCallback(self.verdict_for)
        d.addErrback(self._failed, tag)
        return d

    @staticmethod
    def _read_answer(response: Any) -> Deferred:
        import treq

        code = response.code
        body = treq.content(response)

        def check(content: bytes) -> dict:
            if code != 200:
                raise ScannerFailure(f"HTTP status {code}")
            if len(content) > MAX_ANSWER:
                raise ScannerFailure("answer too long")
            try:
                answer = json.loads(content)
            except ValueError as e:
                raise ScannerFailure(f"answer is not JSON: {e}") from None
            if not isinstance(answer, dict):
                raise ScannerFailure("answer is not a JSON object")
            return answer

        return body.addCallback(check)

    def verdict_for(self, answer: dict) -> Verdict:
        """The Verdict for rspamd's JSON answer (raises ScannerFailure when it is unusable)."""
        action = answer.get("action")
        if not isinstance(action, str):
            raise ScannerFailure("answer has no action")
        try:
            score = float(answer.get("score", 0.0))
            required = float(answer.get("required_score", 0.0))
        except (TypeError, ValueError):
            raise ScannerFailure("answer has a non-numeric score") from None
        if score != score or required != required:  # NaN
            raise ScannerFailure("answer has a non-numeric score")
        shown = f"score={score:.2f} required={required:.2f}"
        logline = f"rspamd: {printable(action, 40)} {shown}"
        spam = [f"X-Spam-Status: Yes, {shown}", f"X-Spam-Score: {score:.2f}"]
        if action == "no action":
            return Verdict(ACCEPT, headers=[f"X-Spam-Status: No, {shown}",
                                            f"X-Spam-Score: {score:.2f}"], log=logline)
        if action in ("add header", "rewrite subject"):
            disposition = JUNK if self.config.add_header_action == "junk" else ACCEPT
            return Verdict(disposition, headers=spam, log=logline)
        if action in ("greylist", "soft reject"):
            return Verdict(TEMPFAIL, reply=self._try_later(answer), headers=spam, log=logline)
        if action in ("reject", "discard"):
            # We never drop mail silently: rspamd's "discard" is refused like "reject".
            if self.config.reject_action == "junk":
                return Verdict(JUNK, headers=spam, log=logline)
            return Verdict(REJECT, reply=SPAM, headers=spam, log=logline)
        if action == "quarantine":
            return Verdict(JUNK, headers=spam, log=logline)
        raise ScannerFailure(f"unknown action {printable(action, 40)!r}")

    @staticmethod
    def _try_later(answer: dict) -> Reply:
        messages = answer.get("messages")
        text = ""
        if isinstance(messages, dict) and isinstance(messages.get("smtp_message"), str):
            text = printable(messages["smtp_message"], MAX_REPLY_TEXT)
        return TRY_LATER.with_text(text) if text else TRY_LATER

    def _failed(self, failure: Any, tag: str) -> Verdict:
        reason = describe_failure(failure)
        log.warn("rspamd: scan of {tag} failed ({reason}); on_failure={policy}",
                 tag=tag, reason=reason, policy=self.config.on_failure)
        logline = f"rspamd: unavailable ({reason})"
        if self.config.on_failure == "accept":
            return Verdict(ACCEPT, headers=["X-Spam-Status: Unknown, scanner unavailable"],
                           log=logline)
        return Verdict(TEMPFAIL, reply=UNAVAILABLE, log=logline)


def timed_out(result: Any, timeout: float) -> Any:
    """addTimeout's hook: whatever the cancelled request failed with (the Agent wraps the
    cancellation in ResponseNeverReceived), the reason is the deadline."""
    return Failure(defer.TimeoutError(f"no answer within {timeout} s"))


def describe_failure(failure: Any) -> str:
    """One short printable line for a Failure: the exception type and its text."""
    from twisted.internet.defer import CancelledError, TimeoutError

    exc = failure.value
    if isinstance(exc, (TimeoutError, CancelledError)):
        return "timeout"
    text = printable(exc, 160)
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


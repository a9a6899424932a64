"""A compact ESMTP client for outbound delivery, on LineReceiver.

Not Twisted's ESMTPClient (docs/design/courier.md): its dot-stuffing is wrong at 16 KiB chunk
boundaries and on a first line starting with ".", it waits forever without a timeout, verifies
every certificate (so MX delivery to self-signed hosts fails instead of falling back), and knows
neither SIZE, 8BITMIME nor PIPELINING. This client: EHLO (HELO fallback), opportunistic or required
STARTTLS, AUTH PLAIN/LOGIN for a smarthost, MAIL FROM with SIZE/BODY/SMTPUTF8 when offered,
pipelined RCPTs (RFC 2920), per-recipient results, RSET for connection reuse, a timeout on every
reply.
"""
from __future__ import annotations

import base64
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, error as net_error
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from mailsuite.courier import status
from mailsuite.tls import describe_tls

log = Logger()

CRLF = b"\r\n"
# RFC 5321 §4.5.3.2: minimum client timeouts. The final reply to DATA may take long (content
# filters), so it gets its own generous limit.
DATA_END_TIMEOUT = 600
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass
class Reply:
    code: int
    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(line.strip() for line in self.lines if line.strip())

    @property
    def enhanced(self) -> str:
        """The RFC 3463 code of the reply, or a generic one derived from the basic code."""
        m = _ENHANCED.match(self.lines[0] if self.lines else "")
        if m and m.group(1) == str(self.code)[0]:
            return m.group(0)
        return f"{str(self.code)[0]}.0.0"

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()


class SMTPError(Exception):
    """The session cannot continue: a reply or condition that fails every recipient alike.

    `reply` is the remote reply when there is one; otherwise `failure` says what happened
    locally. `next_host` says whether another MX may be tried (RFC 5321 §5.1).
    """

    def __init__(self, failure: status.Failure, reply: Reply | None = None,
                 next_host: bool = True, tls_failed: bool = False):
        super().__init__(str(reply) if reply else f"{failure.status} {failure.text}")
        self.failure = failure
        self.reply = reply
        self.next_host = next_host
        self.tls_failed = tls_failed

    @property
    def permanent(self) -> bool:
        return self.reply.permanent if self.reply else self.failure.permanent

    @property
    def detail(self) -> str:
        return str(self.reply) if self.reply else f"{self.failure.status} {self.failure.text}"

    @property
    def enhanced(self) -> str:
        return self.reply.enhanced if self.reply else self.failure.status


class SMTPClientProtocol(LineReceiver):
    """Line-level mechanics: replies in order, each awaited with a timeout."""

    delimiter = CRLF
    MAX_LENGTH = 8192  # reply lines are at most 512 octets (RFC 5321 §4.5.3.1.5); be lenient

    def __init__(self, clock: IReactorTime, timeout: float):
        self.clock = clock
        self.timeout = timeout
        self._lines: list[str] = []
        self._replies: deque[Reply] = deque()
        self._waiters: deque[defer.Deferred] = deque()
        self._lost: Failure | None = None
        self.connected_d: defer.Deferred = defer.Deferred()
        self._closed: list[defer.Deferred] = []
        self.tls = False

    # -- Twisted callbacks ---------------------------------------------------------------------
    def connectionMade(self) -> None:
        self.connected_d.callback(self)

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        if len(text) < 3 or not text[:3].isdigit() or text[3:4] not in ("", " ", "-"):
            log.info("protocol error from {peer}: {line!r}", peer=self._peer(), line=text[:100])
            self._fail_all(SMTPError(status.PROTOCOL_ERROR))
            self.transport.abortConnection()
            return
        self._lines.append(text[4:])
        if text[3:4] == "-":
            return
        reply = Reply(int(text[:3]), self._lines)
        self._lines = []
        if self._waiters:
            self._waiters.popleft().callback(reply)
        else:
            self._replies.append(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail_all(SMTPError(status.PROTOCOL_ERROR))
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = Failure(net_error.ConnectionDone())) -> None:
        self._lost = reason
        self._fail_all(SMTPError(status.CONNECTION_LOST, tls_failed=self._tls_in_handshake()))
        closed, self._closed = self._closed, []
        for d in closed:
            d.callback(None)

    # -- API -----------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._lost is None and self.transport is not None

    def read_reply(self, timeout: float | None = None) -> defer.Deferred:
        if self._replies:
            return defer.succeed(self._replies.popleft())
        if self._lost is not None:
            return defer.fail(SMTPError(status.CONNECTION_LOST,
                                        tls_failed=self._tls_in_handshake()))
        d: defer.Deferred = defer.Deferred(lambda _: self._cancel(d))
        self._waiters.append(d)
        d.addTimeout(timeout or self.timeout, self.clock,
                     onTimeoutCancel=lambda *_: self._timed_out())
        return d

    def send(self, line: str) -> None:
        self.transport.write(line.encode("utf-8") + CRLF)

    def command(self, line: str, timeout: float | None = None) -> defer.Deferred:
        self.send(line)
        return self.read_reply(timeout)

    def start_tls(self, context: Any) -> None:
        # Anything the server sent after its 220 but before the handshake was injected in plain
        # text (the client side of CVE-2011-0411): drop it, never read it as a reply over TLS.
        # This runs from lineReceived's callback chain, so the rest of the buffer is still here.
        injected = self.clearLineBuffer()
        if injected:
            log.info("discarded {n} octets sent in plain text after STARTTLS by {peer}",
                     n=len(injected), peer=self._peer())
        self.transport.startTLS(context)
        self.tls = True

    def when_closed(self) -> defer.Deferred:
        if self._lost is not None or self.transport is None:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._closed.append(d)
        return d

    def abort(self) -> None:
        if self.transport is not None and self._lost is None:
            self.transport.abortConnection()

    # -- helpers -------------------------------------------------------------------------------
    def _cancel(self, d: defer.Deferred) -> None:
        try:
            self._waiters.remove(d)
        except ValueError:
            pass

    def _timed_out(self) -> Any:
        # The session is unusable after a missed reply (later replies would be misattributed).
        self.abort()
        raise SMTPError(status.TIMEOUT)

    def _fail_all(self, exc: SMTPError) -> None:
        waiters, self._waiters = self._waiters, deque()
        for d in waiters:
            d.errback(exc)

    def _tls_in_handshake(self) -> bool:
        # A connection that dies right after STARTTLS, before any reply over TLS, is a failed
        # handshake: opportunistic delivery then retries the host in plain text.
        return self.tls and not getattr(self, "_tls_confirmed", False)

    def confirm_tls(self) -> None:
        self._tls_confirmed = True

    def tls_failure_type(self) -> str:
        """Why the TLS handshake failed, as an RFC 8460 §4.3 result type for TLS reports: the
        certificate's problem when OpenSSL or service_identity named it, else
        "validation-failure"."""
        text = repr(self._lost.value) if self._lost is not None else ""
        if "VerificationError" in text or "hostname mismatch" in text.lower():
            return "certificate-host-mismatch"
        if "certificate has expired" in text:
            return "certificate-expired"
        if "certificate verify failed" in text or "self-signed" in text.lower() or \
                "unable to get local issuer" in text:
            return "certificate-not-trusted"
        return "validation-failure"

    def _peer(self) -> str:
        try:
            return str(self.transport.getPeer().host)
        except Exception:
            return "?"


@dataclass
class TLSPolicy:
    mode: str  # "opportunistic" | "required" | "none" | "implicit"
    context: Any = None  # client TLS context for STARTTLS (verifying one when required)


@dataclass
class Credentials:
    username: str
    password: str


class Session:
    """One SMTP session with one host: greeting, EHLO, TLS, AUTH, then transactions."""

    def __init__(self, protocol: SMTPClientProtocol, host: str, address: str, port: int):
        self.protocol = protocol
        self.host = host  # the MX (or relay) name: DSN Remote-MTA and the log's relay=
        self.address = address
        self.port = port
        self.capabilities: dict[str, str] = {}
        self.esmtp = True
        self.tls_info = ""
        self.transactions = 0

    @property
    def tls(self) -> bool:
        return self.protocol.tls

    @property
    def relay(self) -> str:
        return f"{self.host}[{self.address}]:{self.port}"

    @property
    def alive(self) -> bool:
        return self.protocol.alive

    # -- session start -------------------------------------------------------------------------
    @defer.inlineCallbacks
    def start(self, helo_name: str, tls: TLSPolicy, credentials: Credentials | None) -> Any:
        greeting = yield self.protocol.read_reply()
        if greeting.code != 220:
            # RFC 5321 §3.1: a 554 greeting means "no service here"; try the next MX either way.
            raise SMTPError(status.PROTOCOL_ERROR, greeting, next_host=True)
        if tls.mode == "implicit":
            self.protocol.confirm_tls()
            self.protocol.tls = True
        yield self._ehlo(helo_name)
        if tls.mode in ("opportunistic", "required") and not self.tls:
            if "STARTTLS" in self.capabilities:
                reply = yield self.protocol.command("STARTTLS")
                if reply.code != 220:
                    if tls.mode == "required":
                        raise SMTPError(status.TLS_REQUIRED, reply)
                else:
                    self.protocol.start_tls(tls.context)
                    # RFC 3207 §4.2: forget everything learnt before TLS and ask again.
                    yield self._ehlo(helo_name)
                    self.protocol.confirm_tls()
            elif tls.mode == "required":
                raise SMTPError(status.TLS_REQUIRED)
        if self.tls:
            self.tls_info = describe_tls(self.protocol.transport)
        if credentials is not None:
            yield self._auth(credentials)
        return self

    @defer.inlineCallbacks
    def _ehlo(self, helo_name: str) -> Any:
        reply = yield self.protocol.command(f"EHLO {helo_name}")
        if reply.code in (500, 502):  # RFC 5321 §3.2: an old server; HELO instead
            reply = yield self.protocol.command(f"HELO {helo_name}")
            self.esmtp = False
        if reply.code != 250:
            raise SMTPError(status.PROTOCOL_ERROR, reply)
        self.capabilities = {}
        if self.esmtp:
            for line in reply.lines[1:]:
                keyword, _, params = line.strip().partition(" ")
                self.capabilities[keyword.upper()] = params

    @defer.inlineCallbacks
    def _auth(self, credentials: Credentials) -> Any:
        mechanisms = self.capabilities.get("AUTH", "").upper().split()
        user = credentials.username.encode("utf-8")
        password = credentials.password.encode("utf-8")
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + password).decode()
            reply = yield self.protocol.command(f"AUTH PLAIN {token}")
        elif "LOGIN" in mechanisms:
            reply = yield self.protocol.command("AUTH LOGIN")
            if reply.code == 334:
                reply = yield self.protocol.command(base64.b64encode(user).decode())
            if reply.code == 334:
                reply = yield self.protocol.command(base64.b64encode(password).decode())
        else:
            raise SMTPError(status.AUTH_FAILED, next_host=False)
        if reply.code != 235:
            # A refused login is our configuration's fault, not the message's: defer, never
            # bounce, so nothing is lost while the operator fixes the password.
            raise SMTPError(status.AUTH_FAILED, Reply(451, [f"4.7.0 relay refused login: "
                                                           f"{reply}"]), next_host=False)

    # -- transactions --------------------------------------------------------------------------
    @defer.inlineCallbacks
    def transaction(self, sender: str, recipients: list[str], data: bytes, size: int,
                    eight_bit: bool) -> Any:
        """Deliver one message: {recipient: Reply} (2xx = delivered), or SMTPError for all.

        `data` is already dot-stuffed and ends with <CRLF>.<CRLF>; `size` is the message size
        before stuffing (the SIZE parameter, RFC 1870).
        """
        caps = self.capabilities
        limit = caps.get("SIZE", "").strip()
        if limit.isdigit() and int(limit) and size > int(limit):
            raise SMTPError(status.MESSAGE_TOO_BIG, Reply(552, [
                f"5.3.4 message size {size} exceeds {self.host}'s limit of {limit}"]),
                next_host=False)
        params = []
        if "SIZE" in caps:
            params.append(f"SIZE={size}")
        if eight_bit and "8BITMIME" in caps:
            params.append("BODY=8BITMIME")
        if not all(a.isascii() for a in [sender, *recipients]):
            if "SMTPUTF8" not in caps:
                # RFC 6531 §3.2: without SMTPUTF8 at the receiver, UTF-8 addresses cannot go.
                raise SMTPError(status.NO_SMTPUTF8, Reply(553, [
                    f"5.6.7 {self.host} does not support SMTPUTF8 (internationalized address)"]),
                    next_host=False)
            params.append("SMTPUTF8")
        mail = f"MAIL FROM:<{sender}>" + "".join(" " + p for p in params)
        self.transactions += 1
        if "PIPELINING" in caps:
            # RFC 2920: MAIL and every RCPT in one write, the replies read in order.
            self.protocol.transport.write(
                (mail + "\r\n" + "".join(f"RCPT TO:<{r}>\r\n" for r in recipients))
                .encode("utf-8"))
            waits = [self.protocol.read_reply() for _ in range(1 + len(recipients))]
            try:
                # All of them, so that a timeout (which fails every waiter) leaves no
                # unhandled failure behind.
                replies = yield defer.gatherResults(waits, consumeErrors=True)
            except defer.FirstError as e:
                raise e.subFailure.value
            mail_reply, rcpt_replies = replies[0], replies[1:]
        else:
            mail_reply = yield self.protocol.command(mail)
            rcpt_replies = []
            if mail_reply.code == 250:
                for r in recipients:
                    rcpt_replies.append((yield self.protocol.command(f"RCPT TO:<{r}>")))
        if mail_reply.code != 250:
            yield self._rset_quietly()
            # A 4xx to MAIL is about this server now: another MX may take it (RFC 5321 §5.1).
            raise SMTPError(status.PROTOCOL_ERROR, mail_reply,
                            next_host=not mail_reply.permanent)
        results = dict(zip(recipients, rcpt_replies))
        accepted = [r for r, reply in results.items() if reply.code in (250, 251, 252)]
        if not accepted:
            yield self._rset_quietly()
            return results
        reply = yield self.protocol.command("DATA")
        if reply.code != 354:
            if reply.code < 400:  # not a refusal, not an invitation: nothing was delivered
                reply = Reply(451, [f"4.5.0 unexpected reply to DATA: {reply}"])
            for r in accepted:
                results[r] = reply
            yield self._rset_quietly()
            return results
        self.protocol.transport.write(data)
        try:
            final = yield self.protocol.read_reply(timeout=max(DATA_END_TIMEOUT,
                                                               self.protocol.timeout))
        except SMTPError as e:
            # The message may have arrived (RFC 1047): retry later, never at once elsewhere.
            e.next_host = False
            raise
        for r in accepted:
            results[r] = final
        return results

    @defer.inlineCallbacks
    def reset(self) -> Any:
        """RSET before reusing a cached connection; also proves the peer is still there."""
        reply = yield self.protocol.command("RSET")
        return reply.code == 250

    @defer.inlineCallbacks
    def _rset_quietly(self) -> Any:
        try:
            yield self.protocol.command("RSET")
        except SMTPError:
            pass

    def quit(self) -> defer.Deferred:
        """Polite QUIT without waiting long for the answer; fires when the connection is closed."""
        if not self.alive:
            return defer.succeed(None)
        closed = self.protocol.when_closed()
        try:
            self.protocol.send("QUIT")
        except Exception:
            pass
        d = self.protocol.read_reply(timeout=5)
        d.addBoth(lambda _: self.protocol.transport.loseConnection()
                  if self.protocol.transport else None)
        return closed

"""The ESMTP server protocol shared by the MX and submission ports (mechanics only).

Our own line handling instead of `twisted.mail.smtp.ESMTP`, because the fixes would override most
of that class (docs/design/smtp.md lists its defects):
- Commands are processed strictly one at a time. While a Deferred (directory lookup, password
  check, queue fsync) is pending, further pipelined input stays in our (bounded) buffer, and the
  transport is paused if much piles up, so replies always go out in order (RFC 2920).
- STARTTLS throws away whatever was pipelined after it and forgets HELO/MAIL/RCPT/AUTH
  (RFC 3207 §4.2, CVE-2011-0411).
- Only CRLF ends a line. Command lines over the limit get 500 and are discarded without growing
  the buffer; a peer that never sends CRLF is disconnected. In DATA only CRLF.CRLF ends the message;
  a NUL, a bare CR or LF, a too-long line or a too-big message is consumed up to the terminator and
  then refused, so body text is never run as commands (SMTP smuggling, CVE-2023-51764 family).
  Bare CR/LF are refused (550 5.6.0) or, with `[smtp] bad_line_endings = "normalise"`, stored as
  CRLF; either way no downstream hop can read a different line structure into what we store.
- DATA streams to a file in the queue's incoming directory through a bounded buffer (staging.py);
  the client is paused while the disk is behind. The queue takes the file over before the 250.
- Before AUTH a connection may send `max_commands_per_second` commands (a token bucket over
  COMMAND_WINDOW seconds; an accepted message gives its commands back); on submission it must
  authenticate within `auth_timeout` seconds.
- Any unexpected exception is logged and answered 451 4.3.0; the session goes on. A directory
  outage or a failing disk is one log line and a temporary reply, no traceback.
Decisions (who may send, to whom, whether AUTH is offered) are made by a `Policy` (policy.py);
reply texts are in replies.py. Everything the protocol uses is passed to `server_factory`.
"""
from __future__ import annotations

import functools
import ipaddress
import re
from typing import Callable

from twisted.internet import defer, protocol
from twisted.internet.interfaces import (IAddress, IDelayedCall, IPushProducer, IReactorTime,
                                         IResolver, ITLSTransport)
from twisted.logger import Logger
from twisted.names import dns
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from mailsuite import unique
from mailsuite.config import Config, ConfigError
from mailsuite.directory.api import DirectoryService, DirectoryUnavailable
from mailsuite.listeners import ConnectionCounter, LimitedFactory, Refusal, client_ip
from mailsuite.metrics import Metrics
from mailsuite.pools import InlinePool, WorkPool
from mailsuite.queue.agents import MessageQueue
from mailsuite.smtp import replies
from mailsuite.smtp.reasons import reason_of
from mailsuite.smtp.address import ParamError, PathArgument, PathError, parse_path_argument
from mailsuite.smtp.auth import AuthExchange, encode_b64
from mailsuite.smtp.data import DataTransfer
from mailsuite.smtp.headers import HeaderScan
from mailsuite.smtp.policy import Policy, RecipientDecision, Session
from mailsuite.smtp.replies import Reply
from mailsuite.smtp.staging import StagedMessage
from mailsuite.tls import TLSMaterial
from mailsuite.trust.gate import Gate, GateSession

# Control characters other than TAB (and DEL): never in a command line.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
log = Logger()

# A command line longer than this without CRLF is not a client we want to talk to.
COMMAND_FLOOD_CAP = 64 * 1024
# Pipelined input kept while a reply is pending: over PAUSE_THRESHOLD we stop reading from the
# socket; PENDING_INPUT_CAP is the hard limit if the transport cannot be paused.
PAUSE_THRESHOLD = 64 * 1024
PENDING_INPUT_CAP = 1024 * 1024
# Postfix's smtpd_hard_error_limit: a peer that keeps sending garbage is not a mail client.
MAX_ERRORS = 20
# Seconds over which [smtp] max_commands_per_second is averaged (the burst a client may send).
COMMAND_WINDOW = 10.0
BAD_LINE_ENDINGS = ("reject", "normalise")


def server_factory(config: Config, policy: Policy, queue: MessageQueue,
                   directory: DirectoryService, tls: TLSMaterial | None, clock: IReactorTime,
                   resolver: IResolver | None = None, implicit_tls: bool = False,
                   io: WorkPool | None = None, gate: Gate | None = None,
                   metrics: Metrics | None = None,
                   on_refusal: Callable[[str, str], None] | None = None) -> "SMTPServerFactory":
    """The factory for one listener (MX or submission, by `policy`).

    `tls` is what STARTTLS uses (None: not offered); `implicit_tls` says the transport is already
    TLS (port 465, wrapped by service.py). `resolver` finds the client's host name for the
    Received: header (None: no reverse look-ups). `io` runs the writes of DATA to the staged file
    (None: inline, for unit tests only). `gate` holds the trust checks (mailsuite.trust.gate;
    None: none). `metrics` counts replies and logins (None: a registry of its own);
    `on_refusal(listener, reason)` hears of every refusal (mailsuite/events)."""
    if config.smtp.bad_line_endings not in BAD_LINE_ENDINGS:
        raise ConfigError(f"[smtp] bad_line_endings must be \"reject\" or \"normalise\", not "
                          f"{config.smtp.bad_line_endings!r}")
    return SMTPServerFactory(config, policy, queue, directory, tls, clock, resolver, implicit_tls,
                             io, gate, metrics, on_refusal)


class SMTPServerFactory(LimitedFactory):
    """Counts connections (421 over a limit) and holds what every session of a listener uses."""

    def __init__(self, config: Config, policy: Policy, queue: MessageQueue,
                 directory: DirectoryService, tls: TLSMaterial | None, clock: IReactorTime,
                 resolver: IResolver | None = None, implicit_tls: bool = False,
                 io: WorkPool | None = None, gate: Gate | None = None,
                 metrics: Metrics | None = None,
                 on_refusal: Callable[[str, str], None] | None = None):
        limits = config.limits
        super().__init__(
            "submissions" if implicit_tls else policy.name,
            ConnectionCounter(limits.max_connections, limits.max_connections_per_ip),
            Refusal(replies.TOO_MANY_CONNECTIONS.lines(), replies.TOO_MANY_FROM_IP.lines()),
            self._build)
        self.config = config
        self.policy = policy
        self.queue = queue
        self.directory = directory
        self.clock = clock
        self.resolver = resolver
        self.implicit_tls = implicit_tls
        self.io: WorkPool = io if io is not None else InlinePool()
        self.gate = gate
        self.metrics = metrics if metrics is not None else Metrics()
        self.on_refusal = on_refusal
        self._tls = tls
        self._tls_context: object | None = None
        if not implicit_tls and tls is not None:
            # Read the certificate now, at start-up, not on the reactor thread at first STARTTLS.
            self._tls_context = tls.server_context()

    def _build(self, addr: IAddress) -> "SMTPServer":
        return SMTPServer()

    def tls_context(self) -> object | None:
        """The context STARTTLS hands to the transport; None when we have no certificate."""
        if self._tls_context is None and self._tls is not None:
            self._tls_context = self._tls.server_context()
        return self._tls_context


class SMTPServer(AuthExchange, DataTransfer, protocol.Protocol, TimeoutMixin):
    factory: SMTPServerFactory
    # Set by LimitedFactory (mailsuite/listeners.py): give the slot back, report a complete
    # command, report a successful login.
    on_close: Callable[[], None] | None = None
    on_progress: Callable[[], None] | None = None
    on_authenticated: Callable[[], None] | None = None

    # -- connection life cycle ---------------------------------------------------------------
    def connectionMade(self) -> None:
        f = self.factory
        self.config = f.config
        self.limits = f.config.limits
        self.smtp = f.config.smtp
        self.policy = f.policy
        self.clock = f.clock
        self.callLater = f.clock.callLater  # TimeoutMixin's idle timer runs on our clock
        self.hostname = f.config.hostname
        self.client_ip = client_ip(self.transport)  # a PROXY listener's declared client
        self.client_name: str | None = None
        self.session = Session(self.client_ip, tls=f.implicit_tls)
        self._tls_text: str | None = None  # describe_tls, once the first message needs it
        self._buffer = bytearray()
        self._mode = "command"  # "command" | "data" | "auth"
        self._waiting = False  # a Deferred for the current command is pending
        self._paused = False  # we stopped reading from the transport
        self._pause_reasons: set[str] = set()  # "input" (pipelined pile-up), "disk" (DATA)
        self._staged: StagedMessage | None = None  # the message being received
        self._out = bytearray()  # stored message bytes not yet handed to _staged
        self._scan = HeaderScan()
        self._txid = ""
        # Token bucket of commands before AUTH; _tx_commands are given back when a message is
        # accepted (a busy MX peer sending many messages is not a flood).
        self._tokens = float(self._command_burst())
        self._tokens_at = self.clock.seconds()
        self._tx_commands = 0
        self._processing = False
        self._closed = False
        self._overlong = 0  # octets of a too-long command line discarded so far
        self._errors = 0
        self._auth_failures = 0
        self._auth_state: tuple = ()
        self._delayed_calls: list[IDelayedCall] = []
        self._command = ""  # for refusal log lines (never includes AUTH secrets)
        self._refusal_logged = False  # the next refusal has had its own, more telling log line
        self._reset_transaction()
        if self.policy.accepts_auth and self.smtp.auth_timeout > 0:
            self._delayed_calls.append(
                self.clock.callLater(self.smtp.auth_timeout, self._auth_deadline))
        self._lookup_client_name()
        self.trust: GateSession | None = f.gate.session(self.client_ip) if f.gate else None
        if self.trust is None:
            self.setTimeout(self.limits.smtp_timeout)
            self._send(replies.greeting(self.hostname))
            return
        # The connection rate is counted (in SQL) before we greet; what the client sends
        # meanwhile waits in the buffer like pipelined commands. The idle timer starts with
        # the greeting (_deferred_reply).
        self._waiting = True
        self.trust.connected().addCallback(self._connection_checked)

    def _connection_checked(self, refusal: Reply | None) -> None:
        if self._closed:
            return
        if refusal is not None:
            self._refusal_logged = True
            self._send(refusal)
            self._close(linger=0.5)
            return
        self._send(replies.greeting(self.hostname))
        self._deferred_reply(None)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._closed = True
        self.setTimeout(None)
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()
        if self._mode == "data":
            # Nothing was handed to the queue: the staged file is removed.
            log.info("client {client_ip} disconnected during DATA; message discarded",
                     client_ip=self.client_ip)
        self._discard_staged()
        for call in self._delayed_calls:
            if call.active():
                call.cancel()

    def _auth_deadline(self) -> None:
        if self._closed or self.session.auth_user is not None:
            return
        if self._waiting:  # a password check is in flight: let it answer first
            self._delayed_calls.append(self.clock.callLater(1.0, self._auth_deadline))
            return
        log.info("closing {client_ip}: not authenticated within {n} s", client_ip=self.client_ip,
                 n=self.smtp.auth_timeout)
        self._refusal_logged = True
        self._send(replies.AUTH_TIMEOUT)
        self._close(linger=0.5)

    def evict(self, reason: str) -> None:
        """The listener drops this session to serve another (docs/design/limits.md): RFC 5321
        §3.8 wants a 421 with our name before we close."""
        self._send(Reply(421, "4.7.0", f"{self.hostname} {reason}, closing connection", "evicted"))
        self._close()

    def timeoutConnection(self) -> None:
        if self._waiting:
            self.setTimeout(self.limits.smtp_timeout)  # counted again from our reply
            return
        log.info("idle timeout for {client_ip}", client_ip=self.client_ip)
        self._send(replies.IDLE_TIMEOUT)
        self._close()

    def _close(self, linger: float = 0.0) -> None:
        """Close after the pending replies are written.

        With `linger`, keep reading (and ignoring) input for a moment first: closing a socket
        with unread input sends a TCP RST, which can destroy the 421 before the client reads it.
        """
        self._closed = True
        self._buffer.clear()
        self._discard_staged()  # a message still being received will never be answered
        if linger:
            self._delayed_calls.append(
                self.clock.callLater(linger, self.transport.loseConnection))
        else:
            self.transport.loseConnection()

    # -- input ----------------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        # The idle timer is reset by complete lines only (_process), not by bytes: a client
        # trickling a byte at a time (slowloris) is idle by this measure.
        self._buffer += data
        if self._waiting:
            # Lines wait in our buffer until the pending reply is sent (pipelining order). Stop
            # reading only when a lot piles up: pausing on every lookup costs two epoll
            # syscalls per command, a noticeable share of the reactor's time under load.
            if len(self._buffer) > PENDING_INPUT_CAP:
                self._send(replies.LINE_FLOOD)
                self._close(linger=0.5)
                return
            if len(self._buffer) > PAUSE_THRESHOLD:
                self._hold("input", True)
            return
        self._process()

    def _process(self) -> None:
        """Handle complete lines until a command waits for a Deferred or input runs out."""
        if self._processing:
            return  # re-entered from a Deferred that fired synchronously; the loop goes on
        self._processing = True
        try:
            while not self._waiting and not self._closed:
                if self._mode == "data":
                    if not self._process_data():
                        break
                    continue
                line = self._next_command_line()
                if line is None:
                    break
                self.resetTimeout()
                self._handle_line(line)
        finally:
            self._processing = False

    def _next_command_line(self) -> bytes | Reply | None:
        limit = self.limits.max_line_length  # octets including CRLF (RFC 5321 §4.5.3.1.4)
        idx = self._buffer.find(b"\r\n")
        if idx < 0:
            if len(self._buffer) > limit:
                # Drop what we have (keeping a trailing CR that may start the CRLF).
                keep = 1 if self._buffer.endswith(b"\r") else 0
                self._overlong += len(self._buffer) - keep
                del self._buffer[: len(self._buffer) - keep]
                if self._overlong > COMMAND_FLOOD_CAP:
                    log.info("closing {client_ip}: command line without CRLF over {cap} octets",
                             client_ip=self.client_ip, cap=COMMAND_FLOOD_CAP)
                    self._send(replies.LINE_FLOOD)
                    self._close(linger=0.5)
            return None
        line = bytes(self._buffer[:idx])
        del self._buffer[: idx + 2]
        if self._overlong or idx + 2 > limit:
            self._overlong = 0
            return replies.LINE_TOO_LONG
        return line

    def _handle_line(self, line: bytes | Reply) -> None:
        if not self._take_token():
            return
        try:
            if isinstance(line, Reply):
                self._command = "(too long)"
                if self._mode == "auth":
                    self._mode, self._auth_state = "command", ()  # abandon the exchange
                self._respond(line)
            elif self._mode == "auth":
                self._respond(self._auth_continue(line))
            else:
                self._respond(self._dispatch(line))
        except Exception:
            log.failure("internal error handling a command from {client_ip}",
                        client_ip=self.client_ip)
            self._respond(replies.LOCAL_ERROR)
        self._progress()

    def _progress(self) -> None:
        if self.on_progress is not None and not self._closed:
            self.on_progress()

    def _command_burst(self) -> float:
        return max(1.0, self.smtp.max_commands_per_second * COMMAND_WINDOW)

    def _take_token(self) -> bool:
        """Count one command before AUTH; False (after 421 and a close) when flooded."""
        if self.session.auth_user is not None or self.smtp.max_commands_per_second <= 0:
            return True
        now = self.clock.seconds()
        burst = self._command_burst()
        self._tokens = min(burst, self._tokens
                           + (now - self._tokens_at) * self.smtp.max_commands_per_second)
        self._tokens_at = now
        self._tx_commands += 1
        self._tokens -= 1
        if self._tokens >= 0:
            return True
        log.info("closing {client_ip}: more than {n} commands per second before "
                 "authentication", client_ip=self.client_ip,
                 n=self.smtp.max_commands_per_second)
        self._refusal_logged = True
        self._send(replies.COMMAND_FLOOD)
        self._close(linger=0.5)
        return False

    def _give_back_commands(self) -> None:
        """An accepted message: its commands were mail, not a flood."""
        self._tokens = min(self._command_burst(), self._tokens + self._tx_commands)
        self._tx_commands = 0

    def _respond(self, result: Reply | defer.Deferred | None) -> None:
        """Send a reply now, or pause input until the Deferred gives one (pipelining order)."""
        if result is None:
            return
        if not isinstance(result, defer.Deferred):
            self._send(result)
            return
        # A Deferred that already has its answer (a policy that needed no look-up) is answered
        # at once, without the round of pausing and timers a pending one takes.
        now: list[Reply | None] = []
        pending = False

        def answer(reply: Reply | None) -> None:
            if pending:
                self._deferred_reply(reply)
            else:
                now.append(reply)

        result.addErrback(self._internal_error)
        result.addCallback(answer)
        if now:
            if now[0] is not None:
                self._send(now[0])
            return
        pending = True
        # Our own slowness (database, fsync, the AUTH failure delay) is not client idleness:
        # the idle timer goes on running (stopping and starting it for every look-up costs
        # more than the look-up's callbacks), and timeoutConnection lets it pass while we wait.
        self._waiting = True

    def _deferred_reply(self, reply: Reply | None) -> None:
        if self._closed:
            return
        if reply is not None:
            self._send(reply)
        self.setTimeout(self.limits.smtp_timeout)
        self._waiting = False
        self._hold("input", False)
        self._process()

    def _internal_error(self, failure: Failure) -> Reply:
        log.failure("internal error in {command} from {client_ip}", failure,
                    command=self._command, client_ip=self.client_ip)
        return replies.LOCAL_ERROR

    def _reader(self) -> IPushProducer | None:
        """What to pause: the TCP transport (under implicit TLS, the one below the TLS layer;
        TLSMemoryBIOProtocol itself is not a producer)."""
        reader = IPushProducer(self.transport, None)
        if reader is None:
            below = getattr(self.transport, "transport", None)  # TLSMemoryBIOProtocol's
            reader = IPushProducer(below, None)
        return reader

    def _hold(self, reason: str, on: bool) -> None:
        """Stop reading from the client while any reason holds, read again when none does."""
        if on:
            self._pause_reasons.add(reason)
        else:
            self._pause_reasons.discard(reason)
        want = bool(self._pause_reasons)
        if want == self._paused:
            return
        self._paused = want
        reader = self._reader()
        if reader is None:
            return
        if want:
            reader.pauseProducing()
        elif not self._closed:
            reader.resumeProducing()

    def _disk_backlog(self, over: bool) -> None:
        """The staged file is behind (or caught up): our slowness, not the client's idleness."""
        if self._closed:
            return
        self._hold("disk", over)
        if over:
            self.setTimeout(None)
        elif not self._waiting:
            self.setTimeout(self.limits.smtp_timeout)

    # -- output ---------------------------------------------------------------------------------
    def _send(self, reply: Reply) -> None:
        logged, self._refusal_logged = self._refusal_logged, False
        if reply.code >= 400 and not logged:
            log.info("refused {command} from {client_ip}: {code} {enhanced} {text}",
                     command=self._command or "-", client_ip=self.client_ip, code=reply.code,
                     enhanced=reply.enhanced, text=reply.text.split("\n")[0])
        if reply.code >= 400 and self.factory.on_refusal is not None:
            self.factory.on_refusal(self.policy.name, reason_of(reply))
        self._write(reply)
        if 500 <= reply.code <= 504 and not self._closed:
            # Only protocol errors count: refused recipients are normal on a busy MX.
            self._errors += 1
            if self._errors > MAX_ERRORS:
                log.info("closing {client_ip}: too many errors", client_ip=self.client_ip)
                self._write(replies.TOO_MANY_ERRORS)
                self._close(linger=0.5)

    def _write(self, reply: Reply) -> None:
        self.factory.metrics.smtp_reply(self.factory.name, reply.code, reply.reason)
        self.transport.write(reply.lines())

    # -- commands -------------------------------------------------------------------------------
    def _dispatch(self, raw: bytes) -> Reply | defer.Deferred | None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._command = "(undecodable)"
            return replies.BAD_CHARACTERS
        # A CR, LF, NUL or other control inside a command could forge header lines (HELO goes
        # into Received:) or confuse later hops.
        if _CONTROL.search(text):
            self._command = "(control characters)"
            return replies.BAD_CHARACTERS
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        self._command = verb if verb == "AUTH" else text[:200]
        if not verb.isascii() or not verb.isalpha():
            return replies.BAD_CHARACTERS if not verb.isascii() else replies.UNKNOWN_COMMAND
        handler: Callable[[str], Reply | defer.Deferred | None] | None = getattr(
            self, "do_" + verb, None)
        if handler is None:
            return replies.UNKNOWN_COMMAND
        if not text.isascii() and verb not in ("MAIL", "RCPT"):
            # Only envelope addresses may be UTF-8 (RFC 6531 §3.3).
            return replies.BAD_CHARACTERS
        return handler(arg)

    def do_EHLO(self, arg: str) -> Reply:
        return self._greet(arg, esmtp=True)

    def do_HELO(self, arg: str) -> Reply:
        return self._greet(arg, esmtp=False)

    def _greet(self, arg: str, esmtp: bool) -> Reply:
        domain = arg.strip()
        if not domain or " " in domain:
            return replies.SYNTAX_ERROR
        self._reset_transaction()
        self.session.helo = domain
        self.session.esmtp = esmtp
        if not esmtp:
            return Reply(250, "", f"{self.hostname}")
        lines = [f"{self.hostname} Hello {domain}", "PIPELINING",
                 f"SIZE {self.limits.max_message_size}", "8BITMIME", "ENHANCEDSTATUSCODES",
                 "SMTPUTF8"]
        if not self.session.tls:
            lines.append("STARTTLS")
        if self.policy.auth_offered(self.session):
            lines.append("AUTH PLAIN LOGIN")
        lines.append("HELP")
        return Reply(250, "", "\n".join(lines))

    def do_NOOP(self, arg: str) -> Reply:
        return replies.NOOP_OK

    def do_RSET(self, arg: str) -> Reply:
        if arg.strip():
            return replies.SYNTAX_ERROR
        self._reset_transaction()
        return replies.RESET_OK

    def do_VRFY(self, arg: str) -> Reply:
        # RFC 5321 §3.5.3: 252 when we will not confirm addresses (no user enumeration).
        if not arg.strip():
            return replies.SYNTAX_ERROR
        return replies.VRFY_CANNOT

    def do_EXPN(self, arg: str) -> Reply:
        return replies.NOT_IMPLEMENTED

    def do_HELP(self, arg: str) -> Reply:
        return replies.HELP

    def do_QUIT(self, arg: str) -> None:
        self._send(replies.closing(self.hostname))
        self._close()

    def do_STARTTLS(self, arg: str) -> Reply | None:
        if arg.strip():
            return replies.SYNTAX_ERROR
        if self.session.tls:
            return replies.TLS_ALREADY
        if self.session.helo is None:
            return replies.NEED_HELO
        transport = ITLSTransport(self.transport, None)
        try:
            context = self.factory.tls_context()
        except Exception:
            log.failure("cannot build the TLS context")
            context = None
        if context is None or transport is None:
            return replies.TLS_NOT_AVAILABLE
        self._send(replies.READY_FOR_TLS)
        if self._buffer:
            # CVE-2011-0411: anything sent before the handshake is plaintext injection.
            log.info("discarded {n} octets pipelined after STARTTLS from {client_ip}",
                     n=len(self._buffer), client_ip=self.client_ip)
        self._buffer.clear()
        transport.startTLS(context)
        # RFC 3207 §4.2: forget everything learnt from the client before TLS; EHLO again.
        self.session = Session(self.client_ip, tls=True)
        self._tls_text = None
        self._reset_transaction()
        return None

    def do_AUTH(self, arg: str) -> Reply | defer.Deferred:
        if not self.policy.accepts_auth:
            return replies.AUTH_NOT_OFFERED
        if self.session.helo is None or not self.session.esmtp:
            return replies.NEED_HELO
        if self.session.auth_user is not None:
            return replies.AUTH_ALREADY
        refusal = self.policy.auth_refusal(self.session)
        if refusal is not None:
            return refusal
        if self._mail is not None:
            return replies.AUTH_IN_TRANSACTION
        parts = arg.split()
        if not parts or len(parts) > 2:
            return replies.SYNTAX_ERROR
        mechanism = parts[0].upper()
        initial = parts[1] if len(parts) == 2 else None
        if mechanism == "PLAIN":
            if initial is None:
                self._mode, self._auth_state = "auth", ("plain",)
                return replies.auth_challenge("")
            return self._auth_plain(initial)
        if mechanism == "LOGIN":
            if initial is None:
                self._mode, self._auth_state = "auth", ("login-user",)
                return replies.auth_challenge(encode_b64(b"Username:"))
            return self._auth_login_user(initial)
        return replies.AUTH_UNKNOWN_MECHANISM

    def do_MAIL(self, arg: str) -> Reply | defer.Deferred:
        if self.session.helo is None:
            return replies.NEED_HELO
        if self._mail is not None:
            return replies.NESTED_MAIL
        self._tx_commands = 1  # this transaction's commands, given back if a message is accepted
        try:
            path = parse_path_argument(arg, "FROM:", allow_utf8=True, allow_null=True)
        except ParamError:
            return replies.TOO_MANY_PARAMETERS
        except PathError:
            return replies.BAD_SENDER_ADDRESS if arg[:5].upper() == "FROM:" else \
                replies.SYNTAX_ERROR
        error = self._check_mail_params(path)
        if error is not None:
            return error
        smtputf8 = "SMTPUTF8" in path.params
        if not path.address.isascii() and not smtputf8:
            return replies.NON_ASCII_ADDRESS

        def decided(reply: Reply) -> Reply | defer.Deferred:
            if not reply.success:
                return reply
            if self.trust is None:
                return accepted(None, reply)
            return self.trust.mail(self.session.helo or "", path.address,
                                   self.session.auth_user).addCallback(accepted, reply)

        def accepted(refusal: Reply | None, reply: Reply) -> Reply:
            if refusal is not None:
                return refusal
            self._mail = path
            self._smtputf8 = smtputf8
            return reply

        d = defer.maybeDeferred(self.policy.check_sender, self.session, path.address)
        return d.addCallbacks(decided, self._lookup_failed)

    def _lookup_failed(self, failure: Failure) -> Reply | Failure:
        """A directory outage is temporary: one log line and 451, never a traceback."""
        if failure.check(DirectoryUnavailable):
            log.warn("directory unavailable during {command} from {client_ip}: {error}",
                     command=self._command, client_ip=self.client_ip, error=str(failure.value))
            self._refusal_logged = True
            return replies.TEMP_LOOKUP_FAILURE
        return failure

    def _check_mail_params(self, path: PathArgument) -> Reply | None:
        if path.params and not self.session.esmtp:
            return replies.UNKNOWN_PARAMETER  # parameters are an ESMTP thing (RFC 5321 §4.1.2)
        for key, value in path.params.items():
            if key == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    return replies.BAD_PARAMETER
                if int(value) > self.limits.max_message_size:
                    return replies.MESSAGE_TOO_BIG  # RFC 1870 §6.2: refuse at MAIL
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return replies.BAD_PARAMETER
            elif key == "SMTPUTF8":
                if value is not None:
                    return replies.BAD_PARAMETER
            elif key == "AUTH":
                pass  # RFC 4954 §5: accepted; we record the authenticated user ourselves
            else:
                return replies.UNKNOWN_PARAMETER
        return None

    def do_RCPT(self, arg: str) -> Reply | defer.Deferred:
        if self._mail is None:
            return replies.NEED_MAIL
        try:
            path = parse_path_argument(arg, "TO:", allow_utf8=self._smtputf8)
        except ParamError:
            return replies.TOO_MANY_PARAMETERS
        except PathError as e:
            if e.non_ascii:
                return replies.NON_ASCII_ADDRESS
            return replies.BAD_ADDRESS if arg[:3].upper() == "TO:" else replies.SYNTAX_ERROR
        if path.params:
            return replies.UNKNOWN_PARAMETER  # no DSN (RFC 3461) support: NOTIFY/ORCPT unknown
        if len(self._rcpts) >= self.limits.max_recipients:
            return replies.TOO_MANY_RECIPIENTS

        def decided(decision: RecipientDecision) -> Reply | defer.Deferred:
            if decision.reply.success and self.trust is not None and self._mail is not None:
                d = self.trust.rcpt(self._mail.address, path.address, self.session.auth_user)
                return d.addCallback(trusted, decision)
            return trusted(None, decision)

        def trusted(refusal: Reply | None, decision: RecipientDecision) -> Reply:
            if refusal is not None:
                return refusal
            if decision.reply.success:
                self._rcpts.append((path.address, decision.route))
            elif decision.problem:
                log.warn("{command} from {client_ip}: {problem}; answered {code} {enhanced}",
                         command=self._command, client_ip=self.client_ip,
                         problem=decision.problem, code=decision.reply.code,
                         enhanced=decision.reply.enhanced)
                self._refusal_logged = True
            return decision.reply

        d = defer.maybeDeferred(self.policy.check_recipient, self.session, path.address)
        return d.addCallbacks(decided, self._lookup_failed)

    def do_DATA(self, arg: str) -> Reply:
        if arg.strip():
            return replies.SYNTAX_ERROR
        if self._mail is None:
            return replies.NEED_MAIL
        if not self._rcpts:
            return replies.NO_VALID_RECIPIENTS  # RFC 2920 §3.1
        self._mode = "data"
        self._size = 0
        self._data_error = None
        self._continuation = False
        self._scan = HeaderScan()
        self._txid = unique.token_hex(6)
        self._staged = StagedMessage(self.factory.io, self.factory.queue.incoming_dir,
                                     self._disk_backlog)
        # Our trace field goes first (RFC 5321 §4.4); the body streams after it.
        self._out = bytearray(self._received_header(self._txid, self._rcpts))
        return replies.START_DATA

    def do_BDAT(self, arg: str) -> Reply:
        return replies.NOT_IMPLEMENTED  # CHUNKING is not advertised

    # -- client name for Received: ------------------------------------------------------------
    def _lookup_client_name(self) -> None:
        pointer = _reverse_pointer(self.client_ip)
        if pointer is None:
            return
        if pointer == "":
            self.client_name = "localhost"
            return
        resolver = self.factory.resolver
        if resolver is None:
            return
        try:
            d = resolver.lookupPointer(pointer, timeout=(2,))
        except Exception:
            return

        def found(result: tuple[list[dns.RRHeader], list[dns.RRHeader],
                                list[dns.RRHeader]]) -> None:
            answers = result[0]
            for answer in answers:
                name = getattr(answer.payload, "name", None)
                if name is not None:
                    self.client_name = str(name)
                    return

        d.addCallbacks(found, lambda _: None)


@functools.lru_cache(maxsize=4096)
def _reverse_pointer(client_ip: str) -> str | None:
    """The PTR name to look up for `client_ip`; "" for a loopback address (named "localhost"
    without asking), None for no address at all. Cached: a peer sending one message per
    connection would parse its address again for each."""
    try:
        ip = ipaddress.ip_address(client_ip)
    except ValueError:
        return None
    return "" if ip.is_loopback else ip.reverse_pointer

"""The POP3 server protocol: RFC 1939 with CAPA/RESP-CODES/PIPELINING (RFC 2449), STLS
(RFC 2595) and SASL PLAIN (RFC 5034, RFC 4616), over the mailbox store's INBOX.

Our own protocol class rather than twisted.mail.pop3.POP3 (docs/design/pop3.md explains why).
Here:
- commands are handled one at a time in arrival order; pipelined lines wait in a bounded buffer
  and the transport stops reading while a command runs or the client does not read its replies
  (docs/design/pop3.md, "Limits");
- STLS discards whatever was pipelined after it (CVE-2011-0411 class injection);
- USER/PASS and AUTH work only under TLS; failures are logged with the client address and
  held back by the directory's throttle;
- RETR/TOP stream the file with a push producer (retrieval.py: 64 KiB at a time in the io
  pool, through the one dot-stuffer, correct across chunk boundaries);
- DELE marks; only QUIT (the UPDATE state) removes. A dropped connection removes nothing.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Generator

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, interfaces, protocol
from twisted.internet.interfaces import IAddress, IReactorTime, ITLSTransport
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsuite.config import Config
from mailsuite.directory.api import DirectoryService
from mailsuite.directory.records import DirectoryUnavailable
from mailsuite.listeners import ConnectionCounter, LimitedFactory, Refusal, client_ip
from mailsuite.mailbox import MailStoreAPI
from mailsuite.mailbox.errors import LockBusy
from mailsuite.mailbox.store import MessageInfo, NoSuchMessage
from mailsuite.metrics import Metrics
from mailsuite.notify import ChangeHub
from mailsuite.pools import WorkPool
from mailsuite.pop3 import replies
from mailsuite.pop3.retrieval import MessageSender, describe, open_for_sending
from mailsuite.tls import TLSMaterial

if TYPE_CHECKING:
    from mailsuite.mailbox.store import Folder, MaildropLock

log = Logger()


def server_factory(config: Config, directory: DirectoryService, mailstore: MailStoreAPI,
                   io: WorkPool, tls: TLSMaterial | None, clock: IReactorTime,
                   implicit_tls: bool = False, metrics: Metrics | None = None,
                   changes: ChangeHub | None = None) -> LimitedFactory:
    """The factory of one POP3 listener: pop3 (STLS offered when `tls` is given) or pop3s
    (`implicit_tls`: service.py wraps the factory in TLS). Over a connection limit the client
    gets a negative greeting (RFC 3206 [SYS/TEMP]) and is hung up on. `metrics` counts logins
    (None: a registry of its own)."""
    metrics = metrics if metrics is not None else Metrics()
    limits = config.limits
    counter = ConnectionCounter(limits.max_connections, limits.max_connections_per_ip)
    refusal = Refusal(replies.TOO_MANY_CONNECTIONS, replies.TOO_MANY_CONNECTIONS)

    def build(addr: IAddress) -> POP3Server:
        return POP3Server(config, directory, mailstore, io, tls, clock, implicit_tls, metrics,
                          changes)

    return LimitedFactory("pop3s" if implicit_tls else "pop3", counter, refusal, build)


# docs/design/pop3.md, "Limits", adds these up into the memory one connection may hold.
MAX_COMMAND_LINE = 512  # RFC 2449 §4 allows 255 octets; some clients send a little more
MAX_SASL_LINE = 8192  # an AUTH PLAIN response: base64 of two identities and a password
MAX_DISCARD = 64 * 1024  # octets of one over-long line skipped before the client is dropped
MAX_PENDING = 128 * 1024  # input held while a command runs: one transport read and a TLS record
MAX_ERRORS = 10


# -- the protocol ----------------------------------------------------------------------------
@dataclass
class _Drop:
    """The maildrop of one TRANSACTION state: a snapshot of INBOX taken at login."""

    folder: "Folder"
    lock: "MaildropLock"
    messages: list[MessageInfo]
    deleted: set[int]  # message numbers (1-based)
    retrieved: set[int]


@implementer(interfaces.IPushProducer)
class POP3Server(protocol.Protocol, TimeoutMixin):
    """One POP3 session. Everything it uses is passed in; LimitedFactory sets the hooks
    `on_close` (gives the connection's slot back), `on_progress` and `on_authenticated`.

    The session is the transport's streaming producer for its whole life: when the client does
    not read, the transport pauses it and no command runs and no message chunk is read until it
    resumes (docs/design/pop3.md, "Limits")."""

    on_close: Callable[[], None] | None = None

    def __init__(self, config: Config, directory: DirectoryService, mailstore: MailStoreAPI,
                 io: WorkPool, tls: TLSMaterial | None, clock: IReactorTime,
                 implicit_tls: bool = False, metrics: Metrics | None = None,
                 changes: ChangeHub | None = None):
        self.config = config
        self.changes = changes  # change notifications (mailsuite/notify.py)
        self.directory = directory
        self.metrics = metrics if metrics is not None else Metrics()
        self.mailstore = mailstore
        self.io_pool = io
        self.tls_material = tls
        self.clock = clock
        self.callLater = clock.callLater  # TimeoutMixin's idle timer runs on our clock
        self.tls = implicit_tls
        self.state = "AUTHORIZATION"
        self.user: str | None = None
        self.pending_user: str | None = None
        self.drop: _Drop | None = None
        self.client_ip = "-"
        self.output_paused = False  # the transport's buffer is full: the client is not reading
        self._buffer = bytearray()
        self._busy = False
        self._reading_paused = False
        self._discarding = 0  # octets of an over-long line skipped so far
        self._closed = False
        self._errors = 0
        self._auth_failures = 0
        self._sasl: Callable[[bytes], defer.Deferred | None] | None = None
        self._sender: MessageSender | None = None
        self._in_process = False  # _process's loop is running (it picks up the next line)
        self._process_call: Any = None  # a _process scheduled on the clock
        self._login_timer: Any = None
        rate = config.pop3.max_commands_per_second
        self._tokens = float(rate)
        self._tokens_at = clock.seconds()

    # The hooks LimitedFactory replaces (mailsuite/listeners.py); no-ops for a bare protocol.
    def on_progress(self) -> None:
        pass

    def on_authenticated(self) -> None:
        pass

    # -- connection life ---------------------------------------------------------------------
    def connectionMade(self) -> None:
        self.client_ip = client_ip(self.transport)  # a PROXY listener's declared client
        self.setTimeout(self.config.limits.pop3_timeout)
        if self.config.pop3.login_timeout > 0:
            self._login_timer = self.clock.callLater(self.config.pop3.login_timeout,
                                                     self._login_expired)
        self.transport.registerProducer(self, True)
        log.info("pop3 connection from {client_ip} tls={tls}", client_ip=self.client_ip,
                 tls=self.tls)
        self.transport.write(replies.greeting(self.config.hostname))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._closed = True
        self.setTimeout(None)
        self._cancel_login_timer()
        self._buffer = bytearray()  # a pending backlog is freed now, not when the object goes
        self._sasl = None
        call, self._process_call = self._process_call, None
        if call is not None and call.active():
            call.cancel()
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.stop()
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()
        if self.changes is not None and self.user:
            self.changes.sessions.remove(self.user, self)
        drop, self.drop = self.drop, None
        if drop is not None:
            # RFC 1939 §6: without QUIT there is no UPDATE state; nothing is removed.
            if drop.deleted:
                log.info("pop3 {user} dropped the connection: {n} messages marked for deletion "
                         "are kept", user=self.user, n=len(drop.deleted))
            self.io(drop.lock.release).addErrback(self._release_failed)

    def _release_failed(self, failure: Failure) -> None:
        log.error("pop3 {user}: releasing the maildrop lock failed: {error}", user=self.user,
                  error=describe(failure.value))

    def end_session(self, reason: str) -> None:
        """The account was disabled or removed (mailsuite/notify.py): close without UPDATE,
        so nothing marked for deletion is removed (RFC 1939 §6). POP3 has no unsolicited
        reply; the client sees the connection close."""
        log.info("pop3 ending the session of {user}: {reason}", user=self.user, reason=reason)
        self.abort()  # a TLS close would wait for the client, which is not reading

    def evict(self, reason: str) -> None:
        """The listener drops this session to serve another (docs/design/limits.md)."""
        self._close(replies.err(f"[SYS/TEMP] {reason}"))

    def timeoutConnection(self) -> None:
        log.info("pop3 idle timeout for {client_ip}", client_ip=self.client_ip)
        self._close(replies.TIMEOUT)

    def _login_expired(self) -> None:
        self._login_timer = None
        if self.state == "AUTHORIZATION" and not self._closed:
            log.info("pop3 {client_ip} did not log in within {n} s: closing",
                     client_ip=self.client_ip, n=self.config.pop3.login_timeout)
            self._close(replies.LOGIN_TIMEOUT)

    def _cancel_login_timer(self) -> None:
        timer, self._login_timer = self._login_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _close(self, reply: bytes | None = None) -> None:
        """Say why (if anything) and hang up; a client that does not read its replies is cut
        off at once rather than left holding the connection until it reads."""
        if self._closed:
            return
        if reply is not None:
            self.send(reply)
        self._closed = True
        self._buffer = bytearray()
        if self.output_paused:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self._buffer = bytearray()
            self.transport.abortConnection()

    def io(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        return self.io_pool.run(fn, *args)

    # -- output flow control (IPushProducer, registered with the transport) ------------------
    def pauseProducing(self) -> None:
        self.output_paused = True
        self._update_reading()

    def resumeProducing(self) -> None:
        if self._closed:
            return
        self.output_paused = False
        if self._sender is not None:
            self._sender.resume()
        elif not self._busy and self._buffer:
            self._schedule_process()
        self._update_reading()

    def stopProducing(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.stop()

    # -- input -------------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        self._buffer += data
        self._process()
        if len(self._buffer) > MAX_PENDING and not self._closed:
            # Only a client ignoring flow control gets here: reading stops while a command runs.
            log.info("pop3 {client_ip} sent {n} octets ahead of the replies: closing",
                     client_ip=self.client_ip, n=len(self._buffer))
            self._close(replies.INPUT_OVERFLOW)

    def _schedule_process(self) -> None:
        if self._process_call is None:
            self._process_call = self.clock.callLater(0, self._scheduled_process)

    def _scheduled_process(self) -> None:
        self._process_call = None
        self._process()

    def _process(self) -> None:
        self._in_process = True
        try:
            self._process_lines()
        finally:
            self._in_process = False
        self._update_reading()

    def _process_lines(self) -> None:
        while not self._busy and not self._closed and not self.output_paused:
            limit = MAX_SASL_LINE if self._sasl is not None else MAX_COMMAND_LINE
            idx = self._buffer.find(b"\n")
            if idx < 0:
                if len(self._buffer) > limit + 1:
                    # An over-long line: skip it up to its end, then say so (once).
                    self._discarding += len(self._buffer)
                    self._buffer.clear()
                    if self._discarding > MAX_DISCARD:
                        log.info("pop3 {client_ip} sent a line of more than {n} octets: "
                                 "closing", client_ip=self.client_ip, n=MAX_DISCARD)
                        self._close(replies.LINE_TOO_LONG_CLOSING)
                break
            line = bytes(self._buffer[:idx]).rstrip(b"\r")
            del self._buffer[: idx + 1]
            if self._discarding or len(line) > limit:
                self._discarding = 0
                # An over-long SASL response ends the exchange, so replies stay in step.
                self._sasl = None
                self._error(replies.LINE_TOO_LONG)
                continue
            if not self._within_rate():
                log.info("pop3 {client_ip} sent more than {n} commands a second before login: "
                         "closing", client_ip=self.client_ip,
                         n=self.config.pop3.max_commands_per_second)
                self._close(replies.TOO_FAST)
                break
            self.resetTimeout()
            self._busy = True
            d = defer.maybeDeferred(self._line, line)
            d.addErrback(self._internal_error)
            d.addBoth(self._done)

    def _within_rate(self) -> bool:
        """A token bucket of max_commands_per_second before login (a burst of that many)."""
        rate = self.config.pop3.max_commands_per_second
        if self.state != "AUTHORIZATION" or rate <= 0:
            return True
        now = self.clock.seconds()
        self._tokens = min(float(rate), self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _update_reading(self) -> None:
        """Read from the client only while nothing waits: no command running and no complete
        line left to handle (a paused output leaves lines waiting). TCP's window then holds the
        client back. A paused output alone does not stop reading: TLS may need to read before
        it can write (the greeting is written before the handshake of pop3s)."""
        if self._closed or getattr(self.transport, "disconnecting", False):
            return
        pause = self._busy or b"\n" in self._buffer
        if pause != self._reading_paused:
            self._reading_paused = pause
            if pause:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _done(self, _: None) -> None:
        self._busy = False
        if self._closed:
            return
        self.on_progress()
        if self._in_process:
            return  # finished at once: the loop in _process takes the next line
        if self._buffer:
            self._schedule_process()
        else:
            self._update_reading()

    def _internal_error(self, failure: Failure) -> None:
        log.failure("pop3 command failed for {client_ip}", failure, client_ip=self.client_ip)
        self.send(replies.INTERNAL_ERROR)

    def send(self, data: bytes) -> None:
        if not self._closed:
            self.transport.write(data)

    def _error(self, reply: bytes) -> None:
        self._errors += 1
        if self._errors >= MAX_ERRORS:
            self._close(replies.TOO_MANY_ERRORS)
            return
        self.send(reply)

    def _line(self, line: bytes) -> defer.Deferred | None:
        if self._sasl is not None:
            handler, self._sasl = self._sasl, None
            return handler(line)
        text = line.decode("utf-8", "replace")
        command, _, arg = text.partition(" ")
        command = command.upper()
        handler = getattr(self, "do_" + command, None) if command.isalpha() else None
        if handler is None:
            log.info("pop3 unknown command {command!r} from {client_ip}",
                     command=command[:20], client_ip=self.client_ip)
            return self._error(replies.UNKNOWN_COMMAND)
        allowed = _STATES.get(command, ())
        if self.state not in allowed:
            return self._error(replies.NOT_IN_THIS_STATE)
        return handler(arg)

    # -- any state ---------------------------------------------------------------------------
    def do_CAPA(self, arg: str) -> None:
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING",
                "EXPIRE NEVER", "IMPLEMENTATION mailsuite"]
        if self.state == "AUTHORIZATION":
            if self.tls:
                # RFC 2595 §4 / RFC 8314: plaintext mechanisms only inside TLS.
                caps += ["USER", "SASL PLAIN"]
            elif self.tls_material is not None:
                caps.append("STLS")
        self.send(replies.CAPA_FOLLOWS + "".join(c + "\r\n" for c in caps).encode() + b".\r\n")

    def do_NOOP(self, arg: str) -> None:
        self.send(replies.ok())

    def do_QUIT(self, arg: str) -> defer.Deferred | None:
        if self.state != "TRANSACTION" or self.drop is None:
            self._close(replies.ok(replies.SIGNING_OFF))
            return None
        drop, self.drop = self.drop, None
        self.state = "UPDATE"
        return self._update(drop)

    @defer.inlineCallbacks
    def _update(self, drop: _Drop) -> Generator[defer.Deferred, Any, None]:
        uids = [drop.messages[n - 1].uid for n in sorted(drop.deleted)]
        seen = [drop.messages[n - 1].uid for n in sorted(drop.retrieved - drop.deleted)]
        ok = True
        try:
            removed = yield self.io(_apply_update, drop.folder, uids, seen)
            log.info("pop3 {user} quit: removed {n} messages", user=self.user, n=len(removed))
            if self.changes is not None and (removed or seen):
                self.changes.mailbox_changed(self.user, "INBOX")
        except Exception as e:
            log.error("pop3 update for {user} failed: {error}", user=self.user,
                      error=describe(e))
            ok = False
        try:
            yield self.io(drop.lock.release)
        except Exception as e:
            log.error("pop3 {user}: releasing the maildrop lock failed: {error}",
                      user=self.user, error=describe(e))
        self._close(replies.ok(replies.SIGNING_OFF) if ok else replies.UPDATE_FAILED)

    # -- AUTHORIZATION -----------------------------------------------------------------------
    def do_STLS(self, arg: str) -> None:
        if self.tls:
            return self._error(replies.TLS_ACTIVE)
        transport = ITLSTransport(self.transport, None)
        if transport is None or self.tls_material is None:
            return self._error(replies.TLS_UNAVAILABLE)
        self.send(replies.BEGIN_TLS)
        if self._buffer:
            # Anything the client sent before the handshake was not protected by it.
            log.info("discarded {n} octets pipelined after STLS from {client_ip}",
                     n=len(self._buffer), client_ip=self.client_ip)
            self._buffer.clear()
        self._discarding = 0
        transport.startTLS(self.tls_material.server_context())
        self.tls = True
        self.pending_user = None

    def do_USER(self, arg: str) -> None:
        if not self.tls:
            log.info("pop3 USER before TLS refused from {client_ip}", client_ip=self.client_ip)
            return self._error(replies.TLS_REQUIRED)
        if not arg.strip():
            return self._error(replies.BAD_SYNTAX)
        self.pending_user = arg.strip()
        self.send(replies.ok("Send your password"))

    def do_PASS(self, arg: str) -> defer.Deferred | None:
        if not self.tls:
            return self._error(replies.TLS_REQUIRED)
        if self.pending_user is None:
            return self._error(replies.USER_FIRST)
        user, self.pending_user = self.pending_user, None
        # RFC 1939 §7: the password may contain spaces; it is the rest of the line.
        return self._login(user, arg)

    def do_AUTH(self, arg: str) -> defer.Deferred | None:
        if not arg.strip():
            # RFC 5034 allows no argument as "list mechanisms" (what older clients send).
            mechs = b"PLAIN\r\n" if self.tls else b""
            self.send(replies.ok("Supported mechanisms follow") + mechs + b".\r\n")
            return None
        if not self.tls:
            return self._error(replies.TLS_REQUIRED)
        mechanism, _, initial = arg.strip().partition(" ")
        if mechanism.upper() != "PLAIN":
            return self._error(replies.UNSUPPORTED_MECHANISM)
        if initial:
            return self._auth_plain(initial.encode("ascii", "replace"))
        self.send(b"+ \r\n")
        self._sasl = self._auth_plain
        return None

    def _auth_plain(self, response: bytes) -> defer.Deferred | None:
        response = response.strip()
        if response == b"*":
            return self._error(replies.AUTH_CANCELLED)
        if response == b"=":
            response = b""
        try:
            decoded = base64.b64decode(response, validate=True)
            authzid, authcid, password = decoded.split(b"\0")
        except (binascii.Error, ValueError):
            return self._error(replies.BAD_BASE64)
        if authzid and authzid != authcid:
            log.info("pop3 AUTH PLAIN with a different authorization identity from "
                     "{client_ip} refused", client_ip=self.client_ip)
            return self._failed_login()
        return self._login(authcid.decode("utf-8", "replace"),
                           password.decode("utf-8", "replace"))

    @defer.inlineCallbacks
    def _login(self, user: str, password: str) -> Generator[defer.Deferred, Any, None]:
        try:
            address = yield self.directory.authenticate(user, password, client_ip=self.client_ip)
        except UnauthorizedLogin:
            log.info("pop3 login failed for {user!r} from {client_ip}", user=user[:100],
                     client_ip=self.client_ip)
            self._failed_login()
            return
        except DirectoryUnavailable as e:
            self.metrics.auth("pop3", "tempfail")
            log.warn("pop3 login for {user!r} from {client_ip}: directory unavailable: {error}",
                     user=user[:100], client_ip=self.client_ip, error=str(e)[:200])
            self.send(replies.DIRECTORY_DOWN)
            return
        self.metrics.auth("pop3", "success")
        if self._closed:
            return
        try:
            drop = yield self.io(_open_maildrop, self.mailstore, address)
        except LockBusy as e:
            log.warn("pop3 {user} from {client_ip}: maildrop still locked by {owner} ({lock})",
                     user=address, client_ip=self.client_ip, owner=e.owner or "-", lock=e.lock)
            self.send(replies.MAILDROP_BUSY)
            return
        except Exception as e:
            # A mailbox that cannot be read (I/O error, permissions, full disk for the index)
            # is the environment's fault: one line, and the client may try later.
            log.error("pop3 could not open the maildrop of {user}: {error}", user=address,
                      error=describe(e))
            self.send(replies.MAILDROP_ERROR)
            return
        if drop is None:
            log.info("pop3 {user} from {client_ip}: maildrop in use", user=address,
                     client_ip=self.client_ip)
            self.send(replies.MAILDROP_LOCKED)
            return
        if self._closed:
            self.io(drop.lock.release)
            return
        self.drop = drop
        self.user = address
        self.state = "TRANSACTION"
        self._cancel_login_timer()
        self.on_authenticated()
        if self.changes is not None:
            self.changes.sessions.add(address, self)
        total = sum(m.size for m in drop.messages)
        log.info("pop3 login {user} from {client_ip}: {n} messages", user=address,
                 client_ip=self.client_ip, n=len(drop.messages))
        self.send(replies.ok(f"Logged in, {len(drop.messages)} messages ({total} octets)"))

    def _failed_login(self) -> None:
        self._auth_failures += 1
        self.metrics.auth("pop3", "failure")
        if self._auth_failures >= self.config.limits.max_auth_failures:
            self._close(replies.TOO_MANY_FAILURES)
            return
        self.send(replies.AUTH_FAILED)

    # -- TRANSACTION -------------------------------------------------------------------------
    def _message(self, arg: str, allow_deleted: bool = False) -> tuple[int, MessageInfo] | None:
        drop = self.drop
        token = arg.split()[0] if arg.split() else ""
        if not token.isdigit():
            self._error(replies.BAD_SYNTAX)
            return None
        n = int(token)
        if n < 1 or n > len(drop.messages):
            self._error(replies.NO_SUCH_MESSAGE)
            return None
        if n in drop.deleted and not allow_deleted:
            self._error(replies.MESSAGE_DELETED)
            return None
        return n, drop.messages[n - 1]

    def _live(self) -> list[tuple[int, MessageInfo]]:
        deleted = self.drop.deleted
        return [(n, m) for n, m in enumerate(self.drop.messages, 1) if n not in deleted]

    def do_STAT(self, arg: str) -> None:
        live = self._live()
        self.send(replies.ok(f"{len(live)} {sum(m.size for _, m in live)}"))

    def do_LIST(self, arg: str) -> None:
        if arg.strip():
            found = self._message(arg)
            if found:
                self.send(replies.ok(f"{found[0]} {found[1].size}"))
            return
        live = self._live()
        body = "".join(f"{n} {m.size}\r\n" for n, m in live).encode()
        self.send(replies.ok(f"{len(live)} messages") + body + b".\r\n")

    def do_UIDL(self, arg: str) -> None:
        if arg.strip():
            found = self._message(arg)
            if found:
                self.send(replies.ok(f"{found[0]} {uidl(found[1].key)}"))
            return
        body = "".join(f"{n} {uidl(m.key)}\r\n" for n, m in self._live()).encode()
        self.send(replies.ok() + body + b".\r\n")

    def do_DELE(self, arg: str) -> None:
        found = self._message(arg)
        if found:
            self.drop.deleted.add(found[0])
            self.send(replies.ok(f"Message {found[0]} marked for deletion"))

    def do_RSET(self, arg: str) -> None:
        self.drop.deleted.clear()
        self.send(replies.ok(f"{len(self.drop.messages)} messages"))

    def do_RETR(self, arg: str) -> defer.Deferred | None:
        found = self._message(arg)
        if not found:
            return None
        n, info = found
        return self._send_message(info, None, n)

    def do_TOP(self, arg: str) -> defer.Deferred | None:
        parts = arg.split()
        if len(parts) != 2 or not parts[1].isdigit():
            return self._error(replies.BAD_SYNTAX)
        found = self._message(parts[0])
        if not found:
            return None
        return self._send_message(found[1], int(parts[1]), None)

    @defer.inlineCallbacks
    def _send_message(self, info: MessageInfo, top_lines: int | None,
                      retr_n: int | None) -> Generator[defer.Deferred, Any, None]:
        try:
            f = yield self.io(open_for_sending, self.drop.folder, info, top_lines)
        except NoSuchMessage:
            log.info("pop3 {user}: message {uid} was removed meanwhile", user=self.user,
                     uid=info.uid)
            self.send(replies.MESSAGE_GONE)
            return
        except Exception as e:
            log.error("pop3 {user}: cannot open message {uid}: {error}", user=self.user,
                      uid=info.uid, error=describe(e))
            self.send(replies.READ_ERROR)
            return
        if self._closed:
            self.io(f.close)
            return
        self.send(replies.ok(f"{info.size} octets") if top_lines is None else replies.ok())
        self._sender = sender = MessageSender(self, f)
        yield sender.start()
        if self._sender is sender:
            self._sender = None
        if retr_n is not None and self.drop is not None and not self._closed:
            self.drop.retrieved.add(retr_n)


# Which states each command is valid in (RFC 1939 §§4-6, RFC 2449, RFC 2595, RFC 5034).
_STATES: dict[str, tuple[str, ...]] = {
    "CAPA": ("AUTHORIZATION", "TRANSACTION"),
    "NOOP": ("TRANSACTION",),
    "QUIT": ("AUTHORIZATION", "TRANSACTION"),
    "STLS": ("AUTHORIZATION",),
    "USER": ("AUTHORIZATION",),
    "PASS": ("AUTHORIZATION",),
    "AUTH": ("AUTHORIZATION",),
    "STAT": ("TRANSACTION",),
    "LIST": ("TRANSACTION",),
    "UIDL": ("TRANSACTION",),
    "DELE": ("TRANSACTION",),
    "RSET": ("TRANSACTION",),
    "RETR": ("TRANSACTION",),
    "TOP": ("TRANSACTION",),
}


def uidl(key: str) -> str:
    """The Maildir key is the UIDL (the identity IMAP sees too). RFC 1939 §7 limits a unique-id
    to 70 characters 0x21-0x7E: a longer key (long host name) is replaced by a stable digest."""
    if len(key) <= 70 and all(33 <= ord(c) <= 126 for c in key):
        return key
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:40]


# -- blocking helpers (run in the io pool) -----------------------------------------------------
def _open_maildrop(store: MailStoreAPI, address: str) -> _Drop | None:
    account = store.account(address)
    account.ensure_layout()
    lock = account.lock_maildrop()
    if lock is None:
        return None
    try:
        folder = account.folder("INBOX")
        messages = list(folder.sync())
    except BaseException:
        lock.release()
        raise
    return _Drop(folder=folder, lock=lock, messages=messages, deleted=set(), retrieved=set())


def _apply_update(folder: "Folder", delete: list[int], seen: list[int]) -> list[int]:
    """The UPDATE state: mark retrieved messages \\Seen (as Dovecot does), remove deleted."""
    for uid in seen:
        try:
            folder.add_flags(uid, ["\\Seen"])
        except LockBusy:
            raise  # the whole update runs again once the folder is free (mailbox/waits.py)
        except Exception:
            pass  # removed or renamed meanwhile by another client: not worth failing QUIT
    return folder.expunge(delete) if delete else []

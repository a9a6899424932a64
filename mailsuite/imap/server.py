"""The IMAP4rev1 connection (RFC 3501 and the extensions Thunderbird and phones use).

This module keeps what every state shares: reading lines and literals, the serialized dispatch
and its state table, and the commands of any state: CAPABILITY, NOOP, LOGOUT, ID, ENABLE. The
other commands live beside it, one module per group (login.py, selection.py, folders.py,
messages.py, fetch.py, idle.py), mixed into `IMAPServer`.

Why our own protocol class rather than Twisted's IMAP4Server, and how literals, pipelining and
STARTTLS are handled: docs/design/imap.md.
"""
from __future__ import annotations

import errno
import os
from typing import Any, Callable, Optional, Union

from twisted.internet import defer, error as ierror
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from mailsuite.config import Config
from mailsuite.directory.api import DirectoryService, DirectoryUnavailable
from mailsuite.imap import responses as R
from mailsuite.imap.append import AppendCommands
from mailsuite.imap.compress import CompressCommand
from mailsuite.imap.condstore import CondstoreCommands
from mailsuite.imap.fetch import FetchCommands, WriteGate
from mailsuite.imap.folders import FolderCommands
from mailsuite.imap.idle import IdleCommand
from mailsuite.imap.login import LoginCommands
from mailsuite.imap.messages import MessageCommands
from mailsuite.imap.ordering import OrderingCommands
from mailsuite.imap.parser import LITERAL_MARKER, Atom, FileLiteral, ParseError, Token, astring, \
    tokenize
from mailsuite.imap.responses import CommandError, bad
from mailsuite.imap.selection import Selection, SelectionCommands
from mailsuite.imap.session import MAX_LINE
from mailsuite.imap.spool import LiteralSpool
from mailsuite.listeners import client_ip
from mailsuite.mailbox import MailStoreAPI
from mailsuite.mailbox.errors import LockBusy
from mailsuite.metrics import Metrics
from mailsuite.notify import ChangeHub
from mailsuite.pools import WorkPool
from mailsuite.tls import TLSMaterial

log = Logger()

MAX_LITERAL = 1024 * 1024  # literals of commands other than APPEND
ABORT_AFTER = 10  # seconds a hung-up client gets to answer the TLS close
MAX_LITERALS = 256  # literals in one command (each costs a line and a segment)
PREAUTH_DISCARD = 1024 * 1024  # octets of an over-long AUTHENTICATE line skipped before BYE

Segments = list[tuple[bytes, Optional[bytes]]]  # command line pieces, each with its literal


def parse_command(segments: Segments) -> tuple[bytes, bytes, list[Token], bool]:
    """(tag, command name, arguments, UID prefix?) of one command; ParseError if malformed."""
    tokens = tokenize(segments)
    if not tokens or not isinstance(tokens[0], Atom):
        raise ParseError("missing tag")
    tag = bytes(tokens[0])
    if tag in (b"*", b"+") or len(tag) > 64:
        raise ParseError("invalid tag")
    if len(tokens) < 2 or not isinstance(tokens[1], Atom):
        raise ParseError("missing command")
    name = tokens[1].upper()
    args = tokens[2:]
    if name != b"UID":
        return tag, name, args, False
    if not args or not isinstance(args[0], Atom):
        raise ParseError("UID needs a command")
    name = args[0].upper()
    if name not in UID_COMMANDS:
        raise ParseError("unknown UID command")
    return tag, name, args[1:], True


def _sound_tag(segments: Segments) -> bytes:
    """The tag to answer a malformed command with: its own when the tag itself is sound."""
    first = segments[0][0].split(b" ", 1)[0] if segments else b""
    if first and first not in (b"*", b"+") and len(first) <= 64 and all(
            0x21 <= c < 0x7F and c not in b'(){%*"\\+' for c in first):
        return first
    return b"*"


class IMAPServer(CompressCommand, LineReceiver, TimeoutMixin, SelectionCommands, FolderCommands,
                 MessageCommands, AppendCommands, FetchCommands, IdleCommand, OrderingCommands,
                 CondstoreCommands, LoginCommands):
    """One IMAP connection. Its dependencies are explicit: the configuration (limits), the
    directory (LOGIN/AUTHENTICATE), the mailbox store, the io pool for every blocking store
    call, the TLS material for STARTTLS (None: STARTTLS is refused) and the clock for every
    timer (timeouts, IDLE polls, the abort after hanging up); `changes` (optional) carries
    change notifications between sessions and instances (mailsuite/notify.py)."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, config: Config, directory: DirectoryService, mailstore: MailStoreAPI,
                 io: WorkPool, tls: Optional[TLSMaterial], clock: IReactorTime,
                 implicit_tls: bool = False, metrics: Optional[Metrics] = None,
                 changes: Optional[ChangeHub] = None):
        self.config = config
        self.changes = changes
        self.directory = directory
        self.metrics = metrics if metrics is not None else Metrics()
        self.mailstore = mailstore
        self.pool = io
        self.tls_material = tls
        self.clock = clock
        self.callLater = clock.callLater  # TimeoutMixin's timer
        self.tls = implicit_tls
        self.state = "notauth"
        self.user = None
        self.account = None
        self.sel: Optional[Selection] = None
        self.segments: Segments = []
        self.literal_left = 0
        self.literal_buf = bytearray()
        self.literal_discard = False
        self.overlong = False
        self.skip_command = False
        self.continuation: Optional[defer.Deferred] = None
        self.idling: Optional[defer.Deferred] = None
        self.auth_failures = 0
        self.gate = WriteGate()
        self.closed = False
        self.peer = "?"
        self.tag = b"*"
        self.busy = False
        # Before login: short lines, small literals, few commands a second, limited time
        # (docs/design/imap.md, "Limits").
        self.MAX_LENGTH = config.imap.preauth_max_line
        self.spools: list[LiteralSpool] = []  # APPEND literals of the command being read
        self.spool: Optional[LiteralSpool] = None  # the one being written now
        self.running_spools: list[LiteralSpool] = []  # those of the command running now
        self.overlong_continuation = False
        self.discarded = 0
        self._window_start = -1.0
        self._window_count = 0
        self._login_call: Optional[IDelayedCall] = None
        self._resume_call: Optional[IDelayedCall] = None
        self._resumes_seen = -1  # the gate's resume count at the last timeout

    # -- connection ---------------------------------------------------------------------------
    def connectionMade(self) -> None:
        self.peer = client_ip(self.transport)  # a PROXY listener's declared client
        self.setTimeout(self.config.limits.imap_timeout)
        # Output backpressure for every command: the transport pauses the gate when its buffer
        # is full, and no further command is read until it drains (docs/design/imap.md, "Limits").
        self.transport.registerProducer(self.gate, True)
        self._login_call = self.clock.callLater(self.config.imap.login_timeout, self._login_expired)
        self.send(b"* OK [CAPABILITY " + self.capabilities() + b"] mailsuite IMAP4rev1 ready")

    on_close: Optional[Callable[[], None]] = None  # set by LimitedFactory: gives the per-IP slot back

    def on_progress(self) -> None:
        """Called after each complete command; LimitedFactory replaces it (listeners.py)."""

    def on_authenticated(self) -> None:
        """Called once after a successful login; LimitedFactory replaces it."""

    _abort_call: Optional[IDelayedCall] = None

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        if self.on_close is not None:
            self.on_close()
            self.on_close = None
        for call in (self._login_call, self._resume_call):
            if call is not None and call.active():
                call.cancel()
        self._discard_spools()
        self.closed = True
        self.setTimeout(None)
        self.gate.stopProducing()
        d, self.continuation = self.continuation, None
        if d is not None and not d.called:
            d.errback(ierror.ConnectionDone())
        self.idle_wakeup()
        if self.changes is not None and self.user:
            self.changes.sessions.remove(self.user, self)
        if not self.busy:
            self._let_go()

    def _let_go(self) -> None:
        """A closed session drops its selection at once, so the store can release the folder's
        state (docs/design/maildir.md, "Folder states in memory") without waiting for this
        object to be collected; a command still running lets go when it is done."""
        self.sel = None

    def timeoutConnection(self) -> None:
        if self.busy and self.idling is None and (
                not self.gate.paused or self.gate.resumes != self._resumes_seen):
            # A long FETCH is streaming to a slow client: that is activity, not idleness. A
            # client that has read nothing for a whole timeout period is idle, though.
            self._resumes_seen = self.gate.resumes
            self.setTimeout(self.timeOut)  # re-arm: resetTimeout does nothing once it fired
            return
        self.send(b"* BYE autologout; idle for too long")
        self.hangup()

    _end_after_command: Optional[str] = None  # the reason, while a command is running

    def end_session(self, reason: str) -> None:
        """The account was disabled or removed (mailsuite/notify.py): BYE, between two
        responses so that no literal being streamed is cut (RFC 3501 §7.1.5)."""
        if self.busy and self.idling is None:
            self._end_after_command = reason
            return
        log.info("imap: ending the session of {user} from {peer}: {reason}", user=self.user,
                 peer=self.peer, reason=reason)
        self.send(b"* BYE " + reason.encode("ascii", "replace"))
        self.hangup()

    def evict(self, reason: str) -> None:
        """The listener drops this session to serve another (docs/design/limits.md)."""
        self.send(b"* BYE [UNAVAILABLE] " + reason.encode("ascii", "replace"))
        self.hangup()

    def hangup(self) -> None:
        """Close after what was written. The transport must read again first: a TLS close
        waits for the client's close_notify (or its FIN), which a paused transport would never
        see, leaving the connection (and its per-IP slot) open forever."""
        if self.transport is None:
            return
        self.closed = True
        self._discard_spools()
        self.transport.resumeProducing()  # LineReceiver stays paused: no more commands run
        # A TLS close waits for the producer to go away (twisted.protocols.tls).
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        # A client that never answers the TLS close: drop it after a grace period.
        self._abort_call = self.clock.callLater(ABORT_AFTER, self._abort)

    def _abort(self) -> None:
        if self.transport is not None and self.on_close is not None:
            self.transport.abortConnection()

    # -- reading: a soft pause (docs/design/imap.md, "Serialized dispatch") --------------------
    _transport_paused = False

    def pauseProducing(self) -> None:
        """Run no further command until resumeProducing. The transport keeps reading into the
        line buffer until that holds more than one line's worth, and only then is paused too:
        one command at a time costs no epoll change per command."""
        self.paused = True
        self._bound_buffer()

    def resumeProducing(self) -> None:
        self.paused = False
        if self._transport_paused:
            self._transport_paused = False
            self.transport.resumeProducing()
        self.dataReceived(b"")

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return  # hanging up: nothing more is read into memory
        super().dataReceived(data)
        if self.paused:
            self._bound_buffer()

    def _bound_buffer(self) -> None:
        if self._transport_paused or self.closed or self.transport is None:
            return
        held = len(self._buffer)
        if self.inflater is not None:
            held += len(self.inflater.pending)
        if held > self.MAX_LENGTH:
            self._transport_paused = True
            self.transport.pauseProducing()

    def send(self, line: bytes) -> None:
        if not self.closed:
            self.transport.write(line + b"\r\n")

    def capabilities(self) -> bytes:
        caps = [b"IMAP4rev1", b"LITERAL+", b"SASL-IR", b"IDLE", b"UIDPLUS", b"MOVE", b"SPECIAL-USE",
                b"NAMESPACE", b"ID", b"ENABLE", b"UNSELECT", b"CHILDREN", b"LIST-EXTENDED",
                b"APPENDLIMIT=%d" % self.config.limits.max_message_size,
                b"CONDSTORE", b"QRESYNC"]
        # IMAP4rev2 beside IMAP4rev1, switched on per session by ENABLE (docs/design/imap.md,
        # "IMAP4rev2").
        caps.insert(1, b"IMAP4rev2")
        caps += EXTENSION_CAPS  # binary.py, append.py, compress.py, status.py
        # Search extensions (docs/design/imap.md, "SORT and THREAD", "ESEARCH and SEARCHRES").
        caps += [b"ESEARCH", b"SEARCHRES", b"WITHIN", b"SORT", b"SORT=DISPLAY",
                 b"THREAD=ORDEREDSUBJECT", b"THREAD=REFERENCES"]
        if self.state == "notauth":
            if self.tls:
                caps.append(b"AUTH=PLAIN")
            else:
                # RFC 3501 §6.2.3 / RFC 2595: no plaintext passwords before TLS.
                caps += [b"STARTTLS", b"LOGINDISABLED"] if self.tls_material else [b"LOGINDISABLED"]
        return b" ".join(caps)

    # -- input: lines, literals, continuations ---------------------------------------------------
    def lineReceived(self, line: bytes) -> None:
        if self.closed:
            return  # hanging up: ignore whatever the client still sends
        self.resetTimeout()
        if line.endswith(b"\r"):
            line = line[:-1]
        if self.idling is not None:
            # Stop reading at once: a command pipelined after DONE must wait until IDLE has
            # finished (its refresh may still be running).
            self.pauseProducing()
            if not self.idling.called:
                self.idling.callback(line)
            return
        if self.continuation is not None:
            self.pauseProducing()
            d, self.continuation = self.continuation, None
            d.callback(line)
            return
        m = LITERAL_MARKER.search(line)
        if m is None:
            if self.skip_command:
                self.skip_command = False
                return
            self.segments.append((line, None))
            segments, self.segments = self.segments, []
            self.dispatch(segments)
            return
        size, plus = int(m.group(1)), bool(m.group(2))
        self.segments.append((line[:m.start()], None))
        self._start_literal(size, plus)

    def _start_literal(self, size: int, plus: bool) -> None:
        """A line ended in {size} or {size+}: read the literal, or refuse it when it is over
        the limits (docs/design/imap.md, "Lines and literals")."""
        first = self.segments[0][0].split(None, 3)
        tag = first[0] if first else b"*"
        name = first[1].upper() if len(first) > 1 else b""
        if name == b"UID" and len(first) > 2:
            name = first[2].upper()
        if self.skip_command:
            self._refuse_literal(tag, name, size, plus, MAX_LITERAL, b"")
            return
        if len(self.segments) > MAX_LITERALS:
            self._refuse_literal(tag, name, size, plus, MAX_LITERAL, b"too many literals")
            return
        in_memory = sum(len(line) + len(lit or b"") for line, lit in self.segments
                        if not isinstance(lit, FileLiteral))
        if self.state == "notauth":
            # Only LOGIN/AUTHENTICATE (and ID) carry literals before login, and they are small.
            limit = self.config.imap.preauth_max_literal
            if name.decode("ascii", "replace") not in COMMANDS["notauth"]:
                self._refuse_literal(tag, name, size, plus, limit, b"log in first")
            elif in_memory + size > limit + self.config.imap.preauth_max_line:
                self._refuse_literal(tag, name, size, plus, limit, b"literal too large")
            else:
                self._read_literal(size, plus)
            return
        if name == b"APPEND":
            limit = self.config.limits.max_message_size
            spooled = sum(lit.size for _, lit in self.segments if isinstance(lit, FileLiteral))
            if size > limit or spooled + size > limit:
                self._refuse_literal(tag, name, size, plus, limit, b"")
            elif size > self.config.imap.append_spool_threshold:
                self._read_literal(size, plus, spool=True)
            elif in_memory + size > MAX_LITERAL + MAX_LINE:
                self._refuse_literal(tag, name, size, plus, MAX_LITERAL, b"literal too large")
            else:
                self._read_literal(size, plus)
            return
        if size > MAX_LITERAL or in_memory + size > MAX_LITERAL + MAX_LINE:
            self._refuse_literal(tag, name, size, plus, MAX_LITERAL, b"literal too large")
            return
        self._read_literal(size, plus)

    def _read_literal(self, size: int, plus: bool, spool: bool = False) -> None:
        self.literal_left = size
        self.literal_buf = bytearray()
        self.literal_discard = False
        if spool:
            assert self.account is not None
            self.spool = LiteralSpool(self.pool, os.path.join(self.account.path, "tmp"), size)
            self.spool.on_drained = self._spool_drained
            self.spools.append(self.spool)
        if not plus:
            self.send(b"+ Ready for literal data")
        self.setRawMode()
        if size == 0:
            self.rawDataReceived(b"")

    def _refuse_literal(self, tag: bytes, name: bytes, size: int, plus: bool, limit: int,
                        text: bytes) -> None:
        """Refuse a literal without asking for it: NO [TOOBIG] for an APPEND over the size
        limit, else BAD with `text`."""
        if not self.skip_command:
            if not text:
                self.send(tag + b" NO " + R.code(R.TOOBIG) + b"message exceeds the size limit of %d "
                          b"octets" % self.config.limits.max_message_size)
            else:
                self.send(tag + b" BAD " + text)
            log.info("imap: refused a literal of {size} octets from {peer} ({user})", size=size,
                     peer=self.peer, user=self.user or "-")
        self._discard_spools()
        self.segments = []
        if not plus:
            self.skip_command = False
            return
        # A non-synchronizing literal is coming anyway (RFC 7888 §4). Before login nothing is
        # read that was not asked for: close. After it, read and drop it unless it is absurd.
        if self.state == "notauth" or size > 2 * limit + MAX_LINE:
            self.send(b"* BYE literal too large")
            self.hangup()
            return
        self.skip_command = True
        self.literal_discard = True
        self.literal_left = size
        self.setRawMode()

    def rawDataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        self.resetTimeout()
        if self.overlong:
            self._skip_overlong(data)
            return
        take = data[:self.literal_left]
        rest = data[self.literal_left:]
        self.literal_left -= len(take)
        if self.spool is not None:
            self.spool.write(take)
        elif not self.literal_discard:
            self.literal_buf += take
        if self.literal_left > 0:
            if self.spool is not None and self.spool.wants_pause:
                self.pauseProducing()  # the disk is behind: read again once it catches up
            return
        if self.spool is not None:
            spool, self.spool = self.spool, None
            line, _ = self.segments[-1]
            lit = FileLiteral(b"")
            lit.spool, lit.size = spool, spool.size
            self.segments[-1] = (line, lit)
        elif not self.literal_discard:
            line, _ = self.segments[-1]
            self.segments[-1] = (line, bytes(self.literal_buf))
            self.literal_buf = bytearray()
        self.literal_discard = False
        self.setLineMode(rest)

    def _spool_drained(self) -> None:
        if not self.closed and self.paused and not self.busy and self.spool is not None:
            self.resumeProducing()

    def _discard_spools(self) -> None:
        spools, self.spools, self.spool = self.spools, [], None
        for sp in spools:
            sp.discard()

    def lineLengthExceeded(self, line: bytes) -> None:
        if self.closed:
            return
        self.segments = []
        self._discard_spools()
        if self.continuation is not None:
            # An AUTHENTICATE response too long: skip to its end, then answer the command BAD,
            # so the next line is read as the next command (docs/design/imap.md, "Limits").
            self.overlong_continuation = True
        elif self.state == "notauth":
            log.info("imap: command line over {n} octets before login from {peer}: closing",
                     n=self.MAX_LENGTH, peer=self.peer)
            self.send(b"* BAD command line too long")
            self.send(b"* BYE command line too long")
            self.hangup()
            return
        # After login: answer BAD and go on with the next line instead of dropping the
        # connection (docs/design/imap.md, "Lines and literals").
        self._overlong_tag = (line.split(None, 1) or [b"*"])[0][:64]
        self.overlong = True
        self.discarded = 0
        self.setRawMode()
        self.rawDataReceived(line)
        self.clock.callLater(0, self._kick)

    def _skip_overlong(self, data: bytes) -> None:
        nl = data.find(b"\n")
        if nl < 0:
            self.discarded += len(data)
            if self.state == "notauth" and self.discarded > PREAUTH_DISCARD:
                self.send(b"* BYE line too long")
                self.hangup()
            return
        self.overlong = False
        if self.overlong_continuation:
            self.overlong_continuation = False
            d, self.continuation = self.continuation, None
            self.pauseProducing()
            self.setLineMode(data[nl + 1:])
            if d is not None:
                d.errback(CommandError(R.BAD, "response line too long"))
            return
        self.send(self._overlong_tag + b" BAD command line too long")
        self.setLineMode(data[nl + 1:])

    def _kick(self) -> None:
        if not self.closed and not self.paused:
            self.dataReceived(b"")

    def read_continuation(self) -> defer.Deferred:
        """The next line from the client, read while the current command is running."""
        d: defer.Deferred = defer.Deferred()
        self.continuation = d
        self.resumeProducing()
        return d

    # -- dispatch -------------------------------------------------------------------------------
    def dispatch(self, segments: Segments) -> None:
        # Strictly one command at a time (docs/design/imap.md, "Serialized dispatch").
        self.pauseProducing()
        self.busy = True
        self.running_spools, self.spools = self.spools, []
        tag = _sound_tag(segments)
        try:
            tag, name, args, uid = parse_command(segments)
            handler = self._handler(name)
        except CommandError as e:
            self.finish(tag, e)
            self.done()
            return
        except ParseError as e:
            log.info("imap: BAD command from {peer} ({user}): {error}", peer=self.peer,
                     user=self.user or "-", error=str(e))
            self.send(tag + b" BAD " + str(e).encode("ascii", "replace"))
            self.done()
            return
        self.tag = tag
        started = self.clock.seconds()
        kwargs = {"uid": uid} if name in UID_COMMANDS else {}
        changed = self.changed_folders(name, args)  # idle.py: told to the IDLE sessions
        d = defer.maybeDeferred(handler, tag, args, **kwargs)
        if changed:
            d.addCallback(self.tell_changed, changed)
        if name in REFRESH_AFTER:
            d.addCallback(self._refresh_then)
        d.addBoth(self._completed, tag, name, started)

    def _completed(self, result: Any, tag: bytes, name: bytes, started: float) -> None:
        """The tagged reply, the command's metrics, and on to the next command: one callback
        at the end of every command's chain."""
        try:
            if isinstance(result, Failure):
                self.failed(tag, result, name)
            else:
                self.finish(tag, result)
        finally:
            try:
                self.metrics.imap_command(name, self.clock.seconds() - started)
            finally:
                self.done()

    def _handler(self, name: bytes) -> Callable[..., Any]:
        """The do_ method for a command, if the state table allows it now."""
        text = name.decode("ascii", "replace")
        handler = getattr(self, "do_" + text.replace(".", "_"), None)
        if handler is None or text not in COMMANDS.get(self.state, ()):
            if handler is not None and self.state == "notauth":
                raise CommandError(R.BAD, "log in first")
            if handler is not None and self.state == "auth" and text in COMMANDS["selected"]:
                raise CommandError(R.BAD, "no mailbox selected")
            raise ParseError("unknown command")
        return handler

    @defer.inlineCallbacks
    def _refresh_then(self, result: Optional[bytes]):
        # Report other sessions' changes after any command that may send EXPUNGE (RFC 3501 §5.5).
        if self.sel is not None and not self.closed:
            yield self.refresh()
        return result

    def finish(self, tag: bytes, result: Union[bytes, CommandError, None]) -> None:
        if isinstance(result, CommandError):
            self.send(tag + b" " + result.condition + b" " + (R.code(result.code) if result.code else b"")
                      + result.text.encode("utf-8", "replace"))
        elif isinstance(result, bytes):
            self.send(tag + b" OK " + result)
        elif result is None:
            pass  # the handler answered (LOGOUT, or a connection that went away)

    def failed(self, tag: bytes, failure: Failure, name: bytes) -> None:
        if failure.check(CommandError):
            self.finish(tag, failure.value)
        elif failure.check(ParseError):
            log.info("imap: BAD {command} from {peer} ({user}): {error}", peer=self.peer,
                     user=self.user or "-", command=name.decode("ascii", "replace"),
                     error=str(failure.value))
            self.send(tag + b" BAD " + str(failure.value).encode("ascii", "replace"))
        elif failure.check(ierror.ConnectionDone, ierror.ConnectionLost, defer.CancelledError):
            pass
        elif failure.check(DirectoryUnavailable):
            # An environment fault, not a bug: one line, a temporary error (RFC 5530).
            log.warn("imap: {command} from {peer}: directory unavailable: {error}",
                     command=name.decode("ascii", "replace"), peer=self.peer,
                     error=str(failure.value)[:200])
            self.send(tag + b" NO " + R.code(R.UNAVAILABLE) + b"temporary failure, try again later")
        elif failure.check(OSError):
            self.send(tag + b" NO " + _os_error_reply(failure.value, name, self.user, self.peer))
        else:
            log.failure("imap: {command} failed for {user} from {peer}", failure,
                        command=name.decode("ascii", "replace"), user=self.user, peer=self.peer)
            self.send(tag + b" NO " + R.code(R.SERVERBUG) + b"internal error, see the server log")

    def done(self) -> None:
        self.busy = False
        reason, self._end_after_command = self._end_after_command, None
        if reason is not None and not self.closed:
            self.end_session(reason)
        if self.closed:
            self._let_go()
        self.resetTimeout()
        spools, self.running_spools = self.running_spools, []
        for sp in spools:
            sp.discard()
        self.on_progress()
        self._resume_reading(self._pace())

    def _resume_reading(self, delay: float = 0.0) -> None:
        """Read the next command, once the client has read our output (the gate) and, before
        login, no sooner than the command rate allows (docs/design/imap.md, "Limits")."""
        self._resume_call = None
        if self.closed or self.idling is not None or self.continuation is not None or self.busy:
            return
        if delay > 0:
            self._resume_call = self.clock.callLater(delay, self._resume_reading)
        elif self.gate.paused:
            self.gate.wait().addCallback(lambda _: self._resume_reading())
        else:
            self.resumeProducing()

    def _pace(self) -> float:
        """Seconds to wait before reading the next command: before login, at most
        `[imap] max_commands_per_second`."""
        if self.state != "notauth":
            return 0.0
        now = self.clock.seconds()
        if now - self._window_start >= 1.0:
            self._window_start, self._window_count = now, 0
        self._window_count += 1
        if self._window_count >= self.config.imap.max_commands_per_second:
            return max(0.0, self._window_start + 1.0 - now)
        return 0.0

    # -- any state ------------------------------------------------------------------------------
    def do_CAPABILITY(self, tag: bytes, args: list[Token]) -> bytes:
        self.send(b"* CAPABILITY " + self.capabilities())
        return b"CAPABILITY completed"

    @defer.inlineCallbacks
    def do_NOOP(self, tag: bytes, args: list[Token]):
        yield self.refresh()
        return b"NOOP completed"

    def do_LOGOUT(self, tag: bytes, args: list[Token]) -> None:
        self.send(b"* BYE logging out")
        self.send(tag + b" OK LOGOUT completed")
        self.hangup()
        self.closed = True

    def do_ID(self, tag: bytes, args: list[Token]) -> bytes:
        # RFC 2971: the client's parameters are only informative; log them for support.
        if args and isinstance(args[0], list):
            log.info("imap: client id {id} from {peer}", peer=self.peer,
                     id=" ".join(bytes(a).decode("utf-8", "replace") for a in args[0]
                                 if isinstance(a, bytes))[:300])
        self.send(b'* ID ("name" "mailsuite" "vendor" "mailsuite")')
        return b"ID completed"

    def do_ENABLE(self, tag: bytes, args: list[Token]) -> Union[bytes, defer.Deferred]:
        if not args:
            raise bad("ENABLE needs a capability")
        # RFC 5161 §3.1: ENABLED lists what this command enabled; unknown names are ignored.
        was = self.condstore
        asked = [astring(a).upper() for a in args]
        enabled = self.enable_extensions([n for n in asked if n != b"IMAP4REV2"])
        if b"IMAP4REV2" in asked and not self.rev2:
            # RFC 9051 §6.3.1 (docs/design/imap.md, "IMAP4rev2").
            self.rev2 = True
            if self.sel is not None:
                self.sel.recent_flag = False
            enabled.insert(len([n for n in asked[:asked.index(b"IMAP4REV2")] if n in enabled]),
                           b"IMAP4rev2")
        self.send(b"* ENABLED" + b"".join(b" " + n for n in enabled))
        if self.condstore and not was and self.sel is not None:
            return self.send_highest().addCallback(lambda _: b"ENABLE completed")
        return b"ENABLE completed"


def _os_error_reply(e: OSError, name: bytes, user: Optional[str], peer: str) -> bytes:
    """The store failed with an environment fault (full disk, quota, I/O error, a folder
    locked for longer than [mailbox] lock_wait): a temporary NO with one log line, no
    traceback (RFC 5530 codes)."""
    if isinstance(e, LockBusy):
        log.warn("imap: {command} for {user} from {peer}: {lock} still locked by {owner}",
                 command=name.decode("ascii", "replace"), user=user or "-", peer=peer,
                 lock=e.lock, owner=e.owner or "-")
        return R.code(R.INUSE) + b"mailbox is in use by another session, try again later"
    log.warn("imap: {command} for {user} from {peer} failed: {error}",
             command=name.decode("ascii", "replace"), user=user or "-", peer=peer,
             error=f"{type(e).__name__}: {e}"[:300])
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return R.code(R.OVERQUOTA) + b"no space left for the message, try again later"
    if e.errno == errno.ENAMETOOLONG:
        return R.code(R.CANNOT) + b"name too long"
    return R.code(R.UNAVAILABLE) + b"temporary failure of the mail store, try again later"


# Commands after which other sessions' changes are reported (LIST, LSUB: in their own io job),
# because the client may not expect untagged EXPUNGE after them otherwise: docs/design/imap.md.
REFRESH_AFTER = {b"CAPABILITY", b"CREATE", b"DELETE", b"RENAME", b"SUBSCRIBE",
                 b"UNSUBSCRIBE", b"NAMESPACE", b"ID", b"ENABLE"}

# The state table: the commands each state accepts (RFC 3501 §3).
COMMANDS = {
    "notauth": {"CAPABILITY", "NOOP", "LOGOUT", "ID", "STARTTLS", "LOGIN", "AUTHENTICATE"},
}
COMMANDS["auth"] = COMMANDS["notauth"] - {"STARTTLS", "LOGIN", "AUTHENTICATE"} | {
    "ENABLE", "NAMESPACE", "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE",
    "UNSUBSCRIBE", "LIST", "LSUB", "STATUS", "APPEND", "IDLE", "CHECK", "COMPRESS"}
COMMANDS["selected"] = COMMANDS["auth"] | {
    "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE"}
COMMANDS["selected"] |= {"SORT", "THREAD"}  # RFC 5256

# Extensions advertised once complete (docs/design/imap.md, "BINARY" and the sections after it).
EXTENSION_CAPS = [b"BINARY", b"MULTIAPPEND", b"CATENATE", b"LIST-STATUS", b"STATUS=SIZE",
                  b"COMPRESS=DEFLATE"]

UID_COMMANDS = (b"FETCH", b"STORE", b"SEARCH", b"COPY", b"MOVE", b"EXPUNGE", b"SORT", b"THREAD")

"""The IMAP4rev1 server protocol (RFC 3501 and the extensions Thunderbird and phones use).

Our own protocol class on LineReceiver rather than a subclass of Twisted's IMAP4Server: the
defects in TWISTED-NOTES §4.4 (partial FETCH, header rebuilding, 8-bit headers, SEARCH,
literals, APPEND/COPY error paths, reply order, STARTTLS injection, IDLE) touch nearly every
handler, so a subclass would have overridden most of the class. We reuse Twisted's
LineReceiver, TimeoutMixin and its modified UTF-7 codec.

Command processing is strictly serial (#9282): while a command runs, the transport is paused
and pipelined input waits in LineReceiver's buffer; STARTTLS discards that buffer (the
CVE-2011-0411 class of injection, TWISTED-NOTES §4.4 #9).
"""
from __future__ import annotations

import base64
import dataclasses
import bisect
import functools
import mmap
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Optional

import twisted.mail.imap4  # noqa: F401  registers the "imap4-utf-7" codec (RFC 3501 §5.1.3)
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, error as ierror
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from mailsuite.imap import message as mime
from mailsuite.imap import responses as R
from mailsuite.imap import search as searchmod
from mailsuite.imap.parser import (Atom, FetchAtt, LITERAL_MARKER, ParseError, SequenceSet, Str,
                                   astring, date_time, fetch_atts, format_internaldate,
                                   format_set, sequence_set, tokenize)

log = Logger()

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
MAX_LINE = 64 * 1024  # Dovecot allows 64k lines; long UID sets are legal (TWISTED-NOTES §4.4 #11)
MAX_LITERAL = 1024 * 1024  # literals of commands other than APPEND
STREAM_THRESHOLD = 256 * 1024  # sections larger than this are streamed from the file
CHUNK = 64 * 1024
IDLE_POLL = 0.5  # seconds between checks of the folder's state token while idling
BATCH = 200  # messages per thread-pool call in FETCH/SEARCH
BATCH_BYTES = 4 * 1024 * 1024  # message octets per FETCH batch (see _batches)


class CommandError(Exception):
    """Refuse the current command: `tag <condition> [code] text`."""

    def __init__(self, condition: bytes, text: str, code: bytes = b""):
        super().__init__(text)
        self.condition = condition
        self.text = text
        self.code = code


def no(text: str, code: bytes = b"") -> CommandError:
    return CommandError(R.NO, text, code)


def bad(text: str) -> CommandError:
    return CommandError(R.BAD, text)


def encode_name(name: str) -> bytes:
    return name.encode("imap4-utf-7")


def decode_name(raw: bytes) -> str:
    try:
        name = raw.decode("imap4-utf-7")
    except (UnicodeError, ValueError):
        raise bad("mailbox name is not valid modified UTF-7")
    if name.upper() == "INBOX":
        return "INBOX"
    return name


def quote(b: bytes) -> bytes:
    return mime.string(b)


_FLAG_ORDER = {f: i for i, f in enumerate(SYSTEM_FLAGS + ("\\Recent",))}


def flag_list(flags: Any) -> bytes:
    if isinstance(flags, frozenset):
        return _flag_list_cached(flags)
    return _flag_list(flags)


def _flag_list(flags: Any) -> bytes:
    return b"(" + b" ".join(f.encode("utf-8") for f in sorted(
        flags, key=lambda f: (_FLAG_ORDER.get(f, 99), f))) + b")"


@functools.lru_cache(maxsize=4096)
def _flag_list_cached(flags: frozenset) -> bytes:
    # A folder has few distinct flag combinations: FETCH 1:* FLAGS formats each once.
    return _flag_list(flags)


class FileRange:
    """A large section to stream from a message file."""

    def __init__(self, uid: int, offset: int, length: int):
        self.uid, self.offset, self.length = uid, offset, length


@implementer(IPushProducer)
class _WriteGate:
    """Learns from the transport when its buffer is full, so FETCH can wait (backpressure)."""

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False
        self._waiters: list[defer.Deferred] = []

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def stopProducing(self) -> None:
        self.stopped = True
        self.resumeProducing()

    def wait(self) -> defer.Deferred:
        if not self.paused or self.stopped:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append(d)
        return d


def _uid(info: Any) -> int:
    return info.uid


class Selection:
    """The selected folder as this session's client knows it.

    `view` is the store's shared snapshot list (MessageInfo in UID order) as of the last
    refresh, so 200 sessions on one 100k folder share one list instead of holding 200 copies;
    `own` holds the flag changes this session made since (reported to its client already).
    Sequence number n is view[n - 1]."""

    def __init__(self, folder: Any, readonly: bool):
        self.folder = folder
        self.readonly = readonly
        self.view: list = []
        self.own: dict[int, Any] = {}
        self.token: Any = None
        # folder.recent copies a set on every access: keep our own copy, renewed at refresh.
        self.recent: frozenset = frozenset()

    def __len__(self) -> int:
        return len(self.view)

    def index(self, uid: int) -> int:
        i = bisect.bisect_left(self.view, uid, key=_uid)
        return i if i < len(self.view) and self.view[i].uid == uid else -1

    def seq_of(self, uid: int) -> int:
        return self.index(uid) + 1

    def has(self, uid: int) -> bool:
        return self.index(uid) >= 0

    def info(self, uid: int) -> Any:
        own = self.own.get(uid)
        if own is not None:
            return own
        i = self.index(uid)
        return self.view[i] if i >= 0 else None

    def infos(self) -> Any:
        """(seq, info) for every message, with this session's own flag changes."""
        own = self.own
        for seq, info in enumerate(self.view, 1):
            yield seq, own.get(info.uid, info)

    @property
    def last_uid(self) -> int:
        return self.view[-1].uid if self.view else 0

    def select_uids(self, s: SequenceSet) -> list[int]:
        """UIDs of the messages a UID set names, ascending."""
        picked: set[int] = set()
        view = self.view
        for lo, hi in s.resolve(self.last_uid):
            i = bisect.bisect_left(view, lo, key=_uid)
            j = bisect.bisect_right(view, hi, key=_uid)
            picked.update(view[k].uid for k in range(i, j))
        return sorted(picked)

    def select_seqs(self, s: SequenceSet) -> list[int]:
        """UIDs of the messages a sequence set names; BAD for numbers beyond the count."""
        n = len(self.view)
        picked: set[int] = set()
        if n == 0 and any(lo is None or hi is None for lo, hi in s.ranges):
            return []  # `1:*` in an empty mailbox names nothing (clients send it blindly)
        for lo, hi in s.resolve(n):
            if hi > n or lo < 1:
                # RFC 3501 §9: sequence numbers beyond the message count are invalid.
                raise bad("invalid message sequence number")
            picked.update(self.view[k].uid for k in range(lo - 1, hi))
        return sorted(picked)

    def remove(self, uids: Any) -> list[int]:
        """Drop messages from the view; returns their old sequence numbers, descending."""
        gone = set(uids)
        seqs = [seq for seq, info in enumerate(self.view, 1) if info.uid in gone]
        if seqs:
            self.view = [info for info in self.view if info.uid not in gone]
            for u in gone:
                self.own.pop(u, None)
        return sorted(seqs, reverse=True)

    def set_flags(self, uid: int, flags: frozenset) -> None:
        info = self.info(uid)
        if info is not None:
            self.own[uid] = _with_flags(info, flags)

    def flags(self, uid: int, info: Any = None) -> frozenset:
        if info is None:
            info = self.info(uid)
        f = info.flags if info else frozenset()
        return f | {"\\Recent"} if uid in self.recent else f

    def locate(self, uids: list[int]) -> list[tuple[int, int, Any]]:
        """(uid, seq, info) for the ascending `uids` still in the view, in one merge walk."""
        out: list[tuple[int, int, Any]] = []
        view, own = self.view, self.own
        if not uids:
            return out
        k = bisect.bisect_left(view, uids[0], key=_uid)
        n = len(view)
        for u in uids:
            while k < n and view[k].uid < u:
                k += 1
            if k < n and view[k].uid == u:
                out.append((u, k + 1, own.get(u, view[k])))
        return out


class IMAPServer(LineReceiver, TimeoutMixin):
    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, suite: Any, implicit_tls: bool = False):
        self.suite = suite
        self.config = suite.config
        self.tls = implicit_tls
        self.state = "notauth"
        self.user: Optional[str] = None
        self.account: Any = None
        self.sel: Optional[Selection] = None
        self.segments: list[tuple[bytes, Optional[bytes]]] = []
        self.literal_left = 0
        self.literal_buf = bytearray()
        self.literal_discard = False
        self.overlong = False
        self.skip_command = False
        self.continuation: Optional[defer.Deferred] = None
        self.idling: Optional[defer.Deferred] = None
        self.auth_failures = 0
        self.gate = _WriteGate()
        self.closed = False
        self.peer = "?"
        self.tag = b"*"
        self.busy = False

    # -- connection ---------------------------------------------------------------------------
    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", str(peer))
        self.setTimeout(self.config.limits.imap_timeout)
        self.send(b"* OK [CAPABILITY " + self.capabilities() + b"] mailsuite IMAP4rev1 ready")

    on_close: Any = None  # set by the factory: connection accounting per client IP

    _abort_call: Any = None

    def connectionLost(self, reason: Any = None) -> None:
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        if self.on_close is not None:
            self.on_close()
            self.on_close = None
        self.closed = True
        self.setTimeout(None)
        self.gate.stopProducing()
        d, self.continuation = self.continuation, None
        if d is not None and not d.called:
            d.errback(ierror.ConnectionDone())
        self._idle_wakeup()

    def timeoutConnection(self) -> None:
        if self.busy and self.idling is None:
            # A long FETCH is streaming to a slow client: that is activity, not idleness.
            self.resetTimeout()
            return
        self.send(b"* BYE autologout; idle for too long")
        self.hangup()

    def hangup(self) -> None:
        """Close after what was written. The transport must read again first: a TLS close
        waits for the client's close_notify (or its FIN), which a paused transport would never
        see, leaving the connection (and its per-IP slot) open forever."""
        if self.transport is None:
            return
        self.closed = True
        from twisted.internet import reactor

        self.transport.resumeProducing()  # LineReceiver stays paused: no more commands run
        self.transport.loseConnection()
        # A client that never answers the TLS close: drop it after a grace period.
        self._abort_call = reactor.callLater(10, self._abort)

    def _abort(self) -> None:
        if self.transport is not None and self.on_close is not None:
            self.transport.abortConnection()

    def send(self, line: bytes) -> None:
        if not self.closed:
            self.transport.write(line + b"\r\n")

    def capabilities(self) -> bytes:
        caps = [b"IMAP4rev1", b"LITERAL+", b"SASL-IR", b"IDLE", b"UIDPLUS", b"MOVE", b"SPECIAL-USE",
                b"NAMESPACE", b"ID", b"ENABLE", b"UNSELECT", b"CHILDREN", b"LIST-EXTENDED",
                b"APPENDLIMIT=%d" % self.config.limits.max_message_size]
        if self.state == "notauth":
            if self.tls:
                caps.append(b"AUTH=PLAIN")
            else:
                # RFC 3501 §6.2.3 / RFC 2595: no plaintext passwords before TLS.
                caps += [b"STARTTLS", b"LOGINDISABLED"]
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
        head = line[:m.start()]
        self.segments.append((head, None))
        first = self.segments[0][0].split(None, 3)
        tag = first[0] if first else b"*"
        name = first[1].upper() if len(first) > 1 else b""
        if name == b"UID" and len(first) > 2:
            name = first[2].upper()
        limit = self.config.limits.max_message_size if name == b"APPEND" else MAX_LITERAL
        total = sum(len(s) + len(lit or b"") for s, lit in self.segments)
        if self.skip_command or size > limit or total + size > limit + MAX_LINE:
            if not self.skip_command:
                if name == b"APPEND":
                    self.send(tag + b" NO " + R.code(R.TOOBIG) + b"message exceeds the size limit of %d "
                              b"octets" % self.config.limits.max_message_size)
                else:
                    self.send(tag + b" BAD literal too large")
                log.info("imap: refused a literal of {size} octets from {peer}", size=size, peer=self.peer)
            self.segments = []
            if plus:
                # A non-synchronizing literal is coming anyway (RFC 7888 §4): read and drop it.
                if size > 2 * limit + MAX_LINE:
                    self.send(b"* BYE literal too large")
                    self.hangup()
                    return
                self.skip_command = True
                self.literal_discard = True
                self.literal_left = size
                self.setRawMode()
            else:
                self.skip_command = False
            return
        self.literal_left = size
        self.literal_buf = bytearray()
        self.literal_discard = False
        if not plus:
            self.send(b"+ Ready for literal data")
        self.setRawMode()
        if size == 0:
            self.rawDataReceived(b"")

    def rawDataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        self.resetTimeout()
        if self.overlong:
            nl = data.find(b"\n")
            if nl < 0:
                return
            self.overlong = False
            self.send(self._overlong_tag + b" BAD command line too long")
            self.setLineMode(data[nl + 1:])
            return
        take = data[:self.literal_left]
        rest = data[self.literal_left:]
        self.literal_left -= len(take)
        if not self.literal_discard:
            self.literal_buf += take
        if self.literal_left > 0:
            return
        if not self.literal_discard:
            line, _ = self.segments[-1]
            self.segments[-1] = (line, bytes(self.literal_buf))
            self.literal_buf = bytearray()
        self.literal_discard = False
        self.setLineMode(rest)

    def lineLengthExceeded(self, line: bytes) -> None:
        # Answer BAD and go on with the next line instead of dropping the connection (§4.4 #11).
        self.segments = []
        self._overlong_tag = (line.split(None, 1) or [b"*"])[0][:64]
        self.overlong = True
        self.setRawMode()
        self.rawDataReceived(line)
        from twisted.internet import reactor

        reactor.callLater(0, self._kick)

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
    def dispatch(self, segments: list[tuple[bytes, Optional[bytes]]]) -> None:
        self.pauseProducing()  # strictly one command at a time (#9282)
        self.busy = True
        first = segments[0][0].split(b" ", 1)[0] if segments else b""
        # Answer a malformed command with its own tag when the tag itself is sound.
        tag = first if first and first not in (b"*", b"+") and len(first) <= 64 and all(
            0x21 <= c < 0x7F and c not in b'(){%*"\\+' for c in first) else b"*"
        try:
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
            uid = False
            if name == b"UID":
                if not args or not isinstance(args[0], Atom):
                    raise ParseError("UID needs a command")
                uid = True
                name = args[0].upper()
                args = args[1:]
                if name not in (b"FETCH", b"STORE", b"SEARCH", b"COPY", b"MOVE", b"EXPUNGE"):
                    raise ParseError("unknown UID command")
            handler = getattr(self, "do_" + name.decode("ascii", "replace").replace(".", "_"), None)
            if handler is None or name.decode("ascii", "replace") not in COMMANDS.get(self.state, ()):
                if handler is not None and self.state == "notauth":
                    raise CommandError(R.BAD, "log in first")
                if handler is not None and self.state == "auth" and name.decode() in COMMANDS["selected"]:
                    raise CommandError(R.BAD, "no mailbox selected")
                raise ParseError("unknown command")
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
        kwargs = {"uid": uid} if name in (b"FETCH", b"STORE", b"SEARCH", b"COPY", b"MOVE", b"EXPUNGE") else {}
        d = defer.maybeDeferred(handler, tag, args, **kwargs)
        if name in REFRESH_AFTER:
            d.addCallback(self._refresh_then)
        d.addCallbacks(lambda result: self.finish(tag, result), lambda f: self.failed(tag, f, name))
        d.addBoth(lambda _: self.done())

    @defer.inlineCallbacks
    def _refresh_then(self, result: Any) -> Any:
        # Report other sessions' changes after any command that may send EXPUNGE (RFC 3501 §5.5).
        if self.sel is not None and not self.closed:
            yield self.refresh()
        return result

    def finish(self, tag: bytes, result: Any) -> None:
        if isinstance(result, CommandError):
            self.send(tag + b" " + result.condition + b" " + (R.code(result.code) if result.code else b"")
                      + result.text.encode("utf-8", "replace"))
        elif isinstance(result, bytes):
            self.send(tag + b" OK " + result)
        elif result is None:
            pass  # the handler answered (LOGOUT, or a connection that went away)

    def failed(self, tag: bytes, failure: Any, name: bytes) -> None:
        if failure.check(CommandError):
            self.finish(tag, failure.value)
        elif failure.check(ParseError):
            log.info("imap: BAD {command} from {peer} ({user}): {error}", peer=self.peer,
                     user=self.user or "-", command=name.decode("ascii", "replace"),
                     error=str(failure.value))
            self.send(tag + b" BAD " + str(failure.value).encode("ascii", "replace"))
        elif failure.check(ierror.ConnectionDone, ierror.ConnectionLost, defer.CancelledError):
            pass
        else:
            log.failure("imap: {command} failed for {user} from {peer}", failure,
                        command=name.decode("ascii", "replace"), user=self.user, peer=self.peer)
            self.send(tag + b" NO " + R.code(R.SERVERBUG) + b"internal error, see the server log")

    def done(self) -> None:
        self.busy = False
        self.resetTimeout()
        if not self.closed and self.idling is None and self.continuation is None:
            self.resumeProducing()

    def io(self, fn: Any, *args: Any, **kwargs: Any) -> defer.Deferred:
        return self.suite.pools.io.run(fn, *args, **kwargs)

    # -- any state ------------------------------------------------------------------------------
    def do_CAPABILITY(self, tag: bytes, args: list) -> bytes:
        self.send(b"* CAPABILITY " + self.capabilities())
        return b"CAPABILITY completed"

    @defer.inlineCallbacks
    def do_NOOP(self, tag: bytes, args: list) -> Any:
        yield self.refresh()
        return b"NOOP completed"

    @defer.inlineCallbacks
    def do_CHECK(self, tag: bytes, args: list) -> Any:
        yield self.refresh()
        return b"CHECK completed"

    def do_LOGOUT(self, tag: bytes, args: list) -> None:
        self.send(b"* BYE logging out")
        self.send(tag + b" OK LOGOUT completed")
        self.hangup()
        self.closed = True

    def do_ID(self, tag: bytes, args: list) -> bytes:
        # RFC 2971: the client's parameters are only informative; log them for support.
        if args and isinstance(args[0], list):
            log.info("imap: client id {id} from {peer}", peer=self.peer,
                     id=" ".join(bytes(a).decode("utf-8", "replace") for a in args[0]
                                 if isinstance(a, bytes))[:300])
        self.send(b'* ID ("name" "mailsuite" "vendor" "mailsuite")')
        return b"ID completed"

    def do_ENABLE(self, tag: bytes, args: list) -> bytes:
        if not args:
            raise bad("ENABLE needs a capability")
        # We implement no ENABLE-able extension (RFC 5161 §3.1): an empty ENABLED list.
        self.send(b"* ENABLED")
        return b"ENABLE completed"

    # -- not authenticated ----------------------------------------------------------------------
    def do_STARTTLS(self, tag: bytes, args: list) -> bytes:
        if self.tls:
            raise bad("TLS is already active")
        # Anything the client pipelined after STARTTLS was sent in plaintext: discard it.
        self.clearLineBuffer()
        self.segments = []
        self.send(tag + b" OK Begin TLS negotiation now")
        self.transport.startTLS(self.suite.tls.server_context())
        self.tls = True
        return None  # already answered

    @defer.inlineCallbacks
    def do_LOGIN(self, tag: bytes, args: list) -> Any:
        if not self.tls:
            raise no("LOGIN is disabled before STARTTLS", R.PRIVACYREQUIRED)
        if len(args) != 2:
            raise bad("LOGIN needs a user name and a password")
        user, password = astring(args[0]), astring(args[1])
        result = yield self.login(user, password)
        return result

    @defer.inlineCallbacks
    def do_AUTHENTICATE(self, tag: bytes, args: list) -> Any:
        if not args:
            raise bad("AUTHENTICATE needs a mechanism")
        mech = astring(args[0]).upper()
        if mech != b"PLAIN":
            raise no("unsupported authentication mechanism")
        if not self.tls:
            raise no("authentication is disabled before STARTTLS", R.PRIVACYREQUIRED)
        if len(args) > 1:  # SASL-IR (RFC 4959)
            response = astring(args[1])
        else:
            self.send(b"+ ")
            response = yield self.read_continuation()
            self.pauseProducing()
        if response.strip() == b"*":
            raise bad("AUTHENTICATE cancelled")
        if response == b"=":
            response = b""
        try:
            decoded = base64.b64decode(response.strip(), validate=True)
            authzid, user, password = decoded.split(b"\0")
        except (ValueError, TypeError):
            raise bad("malformed PLAIN response")
        if authzid and authzid.lower() != user.lower():
            # RFC 4616 §2: acting as another user is not supported.
            raise no("authorization identity not permitted", R.AUTHENTICATIONFAILED)
        result = yield self.login(user, password)
        return result

    @defer.inlineCallbacks
    def login(self, user_raw: bytes, password_raw: bytes) -> Any:
        user = user_raw.decode("utf-8", "replace").strip()
        password = password_raw.decode("utf-8", "replace")
        try:
            # The directory slows repeated failures from one address down (its LoginThrottle).
            canonical = yield self.suite.directory.authenticate(user, password, client_ip=self.peer)
        except UnauthorizedLogin:
            self.auth_failures += 1
            log.warn("imap: authentication failed for {user} from {peer} (failure {n})",
                     user=user[:100], peer=self.peer, n=self.auth_failures)
            if self.auth_failures >= self.config.limits.max_auth_failures:
                self.send(self.tag + b" NO " + R.code(R.AUTHENTICATIONFAILED) + b"authentication failed")
                self.send(b"* BYE too many authentication failures")
                self.hangup()
                self.closed = True
                return None
            raise no("authentication failed", R.AUTHENTICATIONFAILED)
        self.user = canonical
        self.account = self.suite.mailstore.account(canonical)
        yield self.io(self.account.ensure_layout)  # first login creates Sent, Drafts, ...
        self.state = "auth"
        log.info("imap: {user} logged in from {peer}", user=canonical, peer=self.peer)
        return R.code(b"CAPABILITY", self.capabilities()) + b"logged in"

    # -- authenticated --------------------------------------------------------------------------
    def do_NAMESPACE(self, tag: bytes, args: list) -> bytes:
        self.send(b'* NAMESPACE (("" "/")) NIL NIL')
        return b"NAMESPACE completed"

    @defer.inlineCallbacks
    def do_SELECT(self, tag: bytes, args: list, readonly: bool = False) -> Any:
        if len(args) < 1:
            raise bad("SELECT needs a mailbox name")
        name = decode_name(astring(args[0]))
        # Selecting (even a failing SELECT) deselects the current folder (RFC 3501 §6.3.1).
        self.sel = None
        self.state = "auth"
        try:
            folder = yield self.io(self.account.folder, name)
        except self.store_errors() as e:
            raise no(str(e) or "no such mailbox", R.NONEXISTENT)
        sel = Selection(folder, readonly)
        st = yield self.io(_sync_folder, folder)
        infos, keywords, token = st.infos, st.keywords, st.token
        sel.view = infos
        sel.recent = st.recent
        sel.token = token
        flags = list(SYSTEM_FLAGS) + [k for k in keywords if k not in SYSTEM_FLAGS]
        self.send(b"* FLAGS " + flag_list(flags))
        self.send(b"* OK [PERMANENTFLAGS " + flag_list(flags + ["\\*"]) + b"] flags permitted")
        self.send(b"* %d EXISTS" % len(sel))
        self.send(b"* %d RECENT" % len(sel.recent))
        for seq, info in sel.infos():
            if "\\Seen" not in info.flags:
                self.send(b"* OK [UNSEEN %d] first unseen message" % seq)
                break
        self.send(b"* OK [UIDVALIDITY %d] UIDs valid" % st.uidvalidity)
        self.send(b"* OK [UIDNEXT %d] predicted next UID" % st.uidnext)
        self.sel = sel
        self.state = "selected"
        mode = R.READ_ONLY if readonly else R.READ_WRITE
        return R.code(mode) + (b"EXAMINE" if readonly else b"SELECT") + b" completed"

    def do_EXAMINE(self, tag: bytes, args: list) -> defer.Deferred:
        return self.do_SELECT(tag, args, readonly=True)

    @defer.inlineCallbacks
    def do_CREATE(self, tag: bytes, args: list) -> Any:
        if len(args) != 1:
            raise bad("CREATE needs a mailbox name")
        name = decode_name(astring(args[0])).rstrip("/")
        if name.upper() == "INBOX":
            raise no("INBOX always exists", R.ALREADYEXISTS)
        try:
            yield self.io(self.account.create_folder, name)
        except self.store_errors() as e:
            code = R.ALREADYEXISTS if type(e).__name__ == "FolderExists" else R.CANNOT
            raise no(str(e) or "cannot create that mailbox", code)
        return b"CREATE completed"

    @defer.inlineCallbacks
    def do_DELETE(self, tag: bytes, args: list) -> Any:
        if len(args) != 1:
            raise bad("DELETE needs a mailbox name")
        name = decode_name(astring(args[0]))
        if name == "INBOX":
            raise no("INBOX cannot be deleted", R.CANNOT)
        if self.sel is not None and self.sel.folder.name == name:
            self.sel = None
            self.state = "auth"
        try:
            yield self.io(self.account.delete_folder, name)
        except self.store_errors() as e:
            raise no(str(e) or "cannot delete that mailbox", R.NONEXISTENT)
        # A deleted folder must not stay subscribed (Thunderbird would APPEND to it, THUNDERBIRD.md).
        try:
            yield self.io(self.account.unsubscribe, name)
        except self.store_errors():
            pass
        return b"DELETE completed"

    @defer.inlineCallbacks
    def do_RENAME(self, tag: bytes, args: list) -> Any:
        if len(args) != 2:
            raise bad("RENAME needs two mailbox names")
        old, new = decode_name(astring(args[0])), decode_name(astring(args[1])).rstrip("/")
        try:
            yield self.io(self.account.rename_folder, old, new)
        except self.store_errors() as e:
            raise no(str(e) or "cannot rename that mailbox", R.CANNOT)
        return b"RENAME completed"

    @defer.inlineCallbacks
    def do_SUBSCRIBE(self, tag: bytes, args: list) -> Any:
        if len(args) != 1:
            raise bad("SUBSCRIBE needs a mailbox name")
        try:
            yield self.io(self.account.subscribe, decode_name(astring(args[0])))
        except self.store_errors() as e:
            raise no(str(e) or "cannot subscribe")
        return b"SUBSCRIBE completed"

    @defer.inlineCallbacks
    def do_UNSUBSCRIBE(self, tag: bytes, args: list) -> Any:
        if len(args) != 1:
            raise bad("UNSUBSCRIBE needs a mailbox name")
        try:
            yield self.io(self.account.unsubscribe, decode_name(astring(args[0])))
        except self.store_errors() as e:
            raise no(str(e) or "cannot unsubscribe")
        return b"UNSUBSCRIBE completed"

    @defer.inlineCallbacks
    def do_LIST(self, tag: bytes, args: list, lsub: bool = False) -> Any:
        args = list(args)
        select_opts: set = set()
        return_opts: set = set()
        if not lsub and args and isinstance(args[0], list):  # LIST-EXTENDED selection options
            select_opts = {astring(a).upper() for a in args.pop(0)}
        if len(args) < 2:
            raise bad("LIST needs a reference and a pattern")
        ref = astring(args[0])
        patterns_tok = args[1]
        patterns = [astring(p) for p in patterns_tok] if isinstance(patterns_tok, list) else [astring(patterns_tok)]
        rest = args[2:]
        if rest:
            if len(rest) != 2 or not isinstance(rest[0], Atom) or rest[0].upper() != b"RETURN" \
                    or not isinstance(rest[1], list):
                raise bad("invalid LIST return options")
            return_opts = {astring(a).upper() for a in rest[1]}
        if select_opts - {b"SUBSCRIBED", b"REMOTE", b"RECURSIVEMATCH", b"SPECIAL-USE"}:
            raise bad("unsupported LIST selection option")
        verb = b"LSUB" if lsub else b"LIST"
        if not lsub and patterns == [b""]:
            # RFC 3501 §6.3.8: the hierarchy delimiter and root name.
            self.send(b'* LIST (\\Noselect) "/" ""')
            return b"LIST completed"
        existing, subscribed = yield self.io(_folders_and_subs, self.account)
        special = {n: self.account.special_use(n) for n in existing}
        ref_s = decode_name(ref) if ref else ""
        matchers = []
        for p in patterns:
            pat = ref_s + decode_name(p) if p else ref_s
            # RFC 3501 §6.3.8: `*` matches across the delimiter, `%` does not.
            rx = "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in pat)
            matchers.append(re.compile("^" + rx + "$", re.I if pat.upper().startswith("INBOX") else 0))

        def matches(n: str) -> bool:
            for m in matchers:
                if m.match(n) or (n == "INBOX" and m.match("inbox")):
                    return True
            return False

        exist_set = set(existing)
        sub_set = set(subscribed)
        only_subscribed = lsub or b"SUBSCRIBED" in select_opts
        names = sorted(sub_set if only_subscribed else exist_set | set(), key=lambda n: (n != "INBOX", n))
        lines = []
        emitted = set()
        for n in names:
            if not matches(n):
                continue
            attrs = []
            if n not in exist_set:
                # Never report a subscribed but missing folder as selectable (THUNDERBIRD.md).
                attrs.append("\\NonExistent" if b"SUBSCRIBED" in select_opts else "\\Noselect")
            children = any(o.startswith(n + "/") for o in exist_set)
            if n in exist_set:
                attrs.append("\\HasChildren" if children else "\\HasNoChildren")
            use = special.get(n)
            if use:  # RFC 6154 §3: attributes may always be returned, not only on request
                attrs.append(use)
            if b"SUBSCRIBED" in select_opts or b"SUBSCRIBED" in return_opts:
                if n in sub_set:
                    attrs.append("\\Subscribed")
            lines.append((n, attrs))
            emitted.add(n)
        # `%` stops at the delimiter: a matching parent that exists only as a path is \Noselect.
        if not only_subscribed:
            for n in exist_set:
                parts = n.split("/")
                for i in range(1, len(parts)):
                    parent = "/".join(parts[:i])
                    if parent not in exist_set and parent not in emitted and matches(parent):
                        lines.append((parent, ["\\Noselect", "\\HasChildren"]))
                        emitted.add(parent)
        for n, attrs in lines:
            self.send(b"* " + verb + b" (" + " ".join(attrs).encode() + b') "/" ' + quote(encode_name(n)))
        return verb + b" completed"

    def do_LSUB(self, tag: bytes, args: list) -> defer.Deferred:
        return self.do_LIST(tag, args, lsub=True)

    @defer.inlineCallbacks
    def do_STATUS(self, tag: bytes, args: list) -> Any:
        if len(args) != 2 or not isinstance(args[1], list):
            raise bad("STATUS needs a mailbox name and a list of items")
        name = decode_name(astring(args[0]))
        items = [astring(a).upper() for a in args[1]]
        known = {b"MESSAGES", b"RECENT", b"UIDNEXT", b"UIDVALIDITY", b"UNSEEN", b"SIZE"}
        if not items or set(items) - known:
            raise bad("unknown STATUS item")
        if self.sel is not None and self.sel.folder.name == name:
            folder = self.sel.folder
        else:
            try:
                folder = yield self.io(self.account.folder, name)
            except self.store_errors() as e:
                raise no(str(e) or "no such mailbox", R.NONEXISTENT)
        st = yield self.io(_sync_folder, folder)
        infos, recent = st.infos, st.recent
        values = {
            b"MESSAGES": len(infos),
            b"RECENT": len(recent & {i.uid for i in infos}),
            b"UIDNEXT": st.uidnext,
            b"UIDVALIDITY": st.uidvalidity,
            b"UNSEEN": len([i for i in infos if "\\Seen" not in i.flags]),
            b"SIZE": sum(i.size for i in infos),
        }
        self.send(b"* STATUS " + quote(encode_name(name)) + b" (" +
                  b" ".join(b"%s %d" % (k, values[k]) for k in items) + b")")
        yield self.refresh()
        return b"STATUS completed"

    @defer.inlineCallbacks
    def do_APPEND(self, tag: bytes, args: list) -> Any:
        args = list(args)
        if len(args) < 2:
            raise bad("APPEND needs a mailbox and a message")
        name = decode_name(astring(args.pop(0)))
        flags: list[str] = []
        date: Optional[float] = None
        if args and isinstance(args[0], list):  # optional flag list (TWISTED-NOTES §4.4 #4)
            flags = parse_flags(args.pop(0))
        if len(args) == 2:
            date = date_time(args.pop(0))
        if len(args) != 1 or not isinstance(args[0], Str):
            raise bad("APPEND needs the message as a literal")
        data = args[0]  # the literal as read (no further copy of a message of up to the limit)
        if len(data) > self.config.limits.max_message_size:
            raise no("message too large", R.TOOBIG)
        flags = [f for f in flags if f != "\\Recent"]
        if self.sel is not None and self.sel.folder.name == name:
            folder = self.sel.folder
        else:
            try:
                folder = yield self.io(self.account.folder, name)
            except self.store_errors() as e:
                # TWISTED-NOTES §4.4 #3: the client may CREATE and retry.
                raise no(str(e) or "no such mailbox", R.TRYCREATE)
        uid = yield self.io(folder.append, data, flags, date)
        validity = yield self.io(_uidvalidity, folder)
        # Untagged EXISTS only for the selected folder, via refresh (TWISTED-NOTES §4.4 #2).
        yield self.refresh()
        return R.code(b"APPENDUID", b"%d" % validity, b"%d" % uid) + b"APPEND completed"

    # -- selected -------------------------------------------------------------------------------
    def do_CLOSE(self, tag: bytes, args: list) -> Any:
        sel = self.sel
        self.sel = None
        self.state = "auth"
        if sel is not None and not sel.readonly:
            # RFC 3501 §6.4.2: remove \Deleted messages silently.
            d = self.io(sel.folder.expunge, None)
            d.addCallback(lambda _: b"CLOSE completed")
            return d
        return b"CLOSE completed"

    def do_UNSELECT(self, tag: bytes, args: list) -> bytes:
        self.sel = None
        self.state = "auth"
        return b"UNSELECT completed"

    @defer.inlineCallbacks
    def do_EXPUNGE(self, tag: bytes, args: list, uid: bool = False) -> Any:
        sel = self.sel
        if sel.readonly:
            raise no("mailbox is read-only", R.READ_ONLY)
        uids = None
        if uid:
            if len(args) != 1:
                raise bad("UID EXPUNGE needs a UID set")
            wanted = sel.select_uids(sequence_set(args[0]))
            uids = [u for u in wanted if "\\Deleted" in sel.info(u).flags]
            # The flags may have changed in another session: check on disk, in the store.
            if not uids:
                yield self.refresh()
                return b"UID EXPUNGE completed"
        removed = yield self.io(sel.folder.expunge, uids)
        self.report_expunged(removed)
        yield self.refresh()
        return b"EXPUNGE completed"

    def report_expunged(self, removed: list[int]) -> None:
        """`* n EXPUNGE`, highest sequence number first so earlier numbers stay valid."""
        for seq in self.sel.remove(removed):
            self.send(b"* %d EXPUNGE" % seq)

    def resolve(self, args_set: Any, uid: bool) -> list[int]:
        """UIDs a sequence set or UID set names, ascending."""
        s = sequence_set(args_set)
        return self.sel.select_uids(s) if uid else self.sel.select_seqs(s)

    @defer.inlineCallbacks
    def do_STORE(self, tag: bytes, args: list, uid: bool = False) -> Any:
        if len(args) < 3:
            raise bad("STORE needs a set, an item and flags")
        sel = self.sel
        uids = self.resolve(args[0], uid)
        item = astring(args[1]).upper()
        silent = item.endswith(b".SILENT")
        if silent:
            item = item[:-7]
        if item not in (b"FLAGS", b"+FLAGS", b"-FLAGS"):
            raise bad("unknown STORE item")
        flags = parse_flags(args[2] if isinstance(args[2], list) else args[2:])
        if "\\Recent" in flags:
            flags.remove("\\Recent")
        if sel.readonly:
            raise no("mailbox is read-only", R.READ_ONLY)
        mode = item[:1] if item[:1] in (b"+", b"-") else b"="
        results = yield self.io(_store_flags, sel.folder, uids, flags, mode)
        for u, new in results:
            if not sel.has(u):
                continue
            sel.set_flags(u, new)
            if not silent:
                seq = sel.seq_of(u)
                self.send(b"* %d FETCH (FLAGS %s%s)" % (seq, flag_list(sel.flags(u)),
                                                        b" UID %d" % u if uid else b""))
        if uid:
            yield self.refresh()
        return b"STORE completed"

    @defer.inlineCallbacks
    def do_COPY(self, tag: bytes, args: list, uid: bool = False, move: bool = False) -> Any:
        if len(args) != 2:
            raise bad("COPY needs a set and a mailbox")
        sel = self.sel
        uids = self.resolve(args[0], uid)
        name = decode_name(astring(args[1]))
        verb = b"MOVE" if move else b"COPY"
        if move and sel.readonly:
            raise no("mailbox is read-only", R.READ_ONLY)
        try:
            dest = yield self.io(self.account.folder, name)
        except self.store_errors() as e:
            raise no(str(e) or "no such mailbox", R.TRYCREATE)  # TWISTED-NOTES §4.4 #3
        if not uids:
            return verb + b" completed (nothing to do)"
        pairs = yield self.io(sel.folder.move if move else sel.folder.copy, uids, dest)
        pairs = sorted(pairs)
        validity = yield self.io(_uidvalidity, dest)
        copyuid = R.code(b"COPYUID", b"%d" % validity, format_set([a for a, _ in pairs]),
                         format_set([b for _, b in pairs])) if pairs else b""
        if move:
            # RFC 6851 §4.3: COPYUID comes in an untagged OK before the EXPUNGEs.
            if copyuid:
                self.send(b"* OK " + copyuid + b"moved")
            self.report_expunged([a for a, _ in pairs])
            yield self.refresh()
            return verb + b" completed"
        if uid:
            yield self.refresh()
        return copyuid + verb + b" completed"

    def do_MOVE(self, tag: bytes, args: list, uid: bool = False) -> defer.Deferred:
        return self.do_COPY(tag, args, uid=uid, move=True)

    @defer.inlineCallbacks
    def do_SEARCH(self, tag: bytes, args: list, uid: bool = False) -> Any:
        sel = self.sel
        try:
            program = searchmod.parse(args)
        except searchmod.BadCharset:
            raise no("unsupported charset", R.BADCHARSET + b" (UTF-8 US-ASCII)")
        found: list[int] = []
        everything = list(sel.infos())
        count, max_uid = len(sel), sel.last_uid
        recent = sel.recent
        needs = searchmod.needs_file(program)
        step = BATCH if needs else BATCH * 50
        for start in range(0, len(everything), step):
            cands = [searchmod.Candidate(seq, i.uid, i.flags, i.uid in recent, i.size, i.internaldate,
                                         _loader(sel.folder, i.uid))
                     for seq, i in everything[start:start + step]]
            if needs:
                hits = yield self.io(_search_batch, program, cands, count, max_uid)
            else:
                hits = _search_batch(program, cands, count, max_uid)
            found.extend(hits)
        numbers = [c_uid if uid else sel.seq_of(c_uid) for c_uid in found]
        self.send(b"* SEARCH" + b"".join(b" %d" % n for n in numbers))
        if uid:
            yield self.refresh()
        return b"SEARCH completed"

    @defer.inlineCallbacks
    def do_FETCH(self, tag: bytes, args: list, uid: bool = False) -> Any:
        if len(args) < 2:
            raise bad("FETCH needs a set and items")
        sel = self.sel
        uids = self.resolve(args[0], uid)
        atts = fetch_atts(args[1] if len(args) == 2 else list(args[1:]))
        names = {a.name for a in atts}
        if uid and b"UID" not in names:
            atts.insert(0, FetchAtt(b"UID"))
        needs_file = any(a.name not in (b"FLAGS", b"UID", b"INTERNALDATE", b"RFC822.SIZE") for a in atts)
        sets_seen = not sel.readonly and any(
            a.name in (b"BODY", b"RFC822", b"RFC822.TEXT") and (a.section is not None or a.name != b"BODY")
            for a in atts)
        self.transport.registerProducer(self.gate, True)
        try:
            chunks = _batches(sel, uids, needs_file)
            pending = self.io(_compute_batch, sel.folder, chunks[0], atts) if needs_file and chunks else None
            for ci, chunk in enumerate(chunks):
                if needs_file:
                    computed = yield pending
                    # Read the next batch in the io pool while this one is written out.
                    if ci + 1 < len(chunks):
                        pending = self.io(_compute_batch, sel.folder, chunks[ci + 1], atts)
                else:
                    computed = None
                if sets_seen:
                    need = [u for u, _, info in sel.locate(chunk) if "\\Seen" not in info.flags
                            and (computed is None or u in computed)]
                    if need:
                        results = yield self.io(_store_flags, sel.folder, need, ["\\Seen"], b"+")
                        for u, new in results:
                            sel.set_flags(u, new)
                out = bytearray()
                for u, seq, info in sel.locate(chunk):
                    pieces = computed.get(u) if computed is not None else None
                    if pieces is None and computed is not None:
                        continue  # its file vanished (expunged elsewhere): nothing to send
                    items: list = []
                    flags_sent = False
                    for a in atts:
                        if a.name == b"FLAGS":
                            items.append(b"FLAGS " + flag_list(sel.flags(u, info)))
                            flags_sent = True
                        elif a.name == b"UID":
                            items.append(b"UID %d" % u)
                        elif a.name == b"INTERNALDATE":
                            items.append(b"INTERNALDATE " + format_internaldate(info.internaldate))
                        elif a.name == b"RFC822.SIZE":
                            items.append(b"RFC822.SIZE %d" % info.size)
                        else:
                            items.append(a.response_name() + b" ")
                            items.append(pieces[id(a)])
                    if sets_seen and not flags_sent:
                        items.append(b"FLAGS " + flag_list(sel.flags(u)))
                    out += b"* %d FETCH (" % seq
                    first = True
                    for it in items:
                        if isinstance(it, FileRange):
                            self.transport.write(bytes(out))
                            out = bytearray()
                            yield self.stream(sel.folder, it)
                            continue
                        if not first and not out.endswith(b" "):
                            out += b" "
                        out += it
                        first = False
                    out += b")\r\n"
                    if len(out) > CHUNK:
                        self.transport.write(bytes(out))
                        out = bytearray()
                        yield self.gate.wait()
                if out and not self.closed:
                    self.transport.write(bytes(out))
                yield self.gate.wait()
                if self.closed:
                    return None
        finally:
            if not self.closed:
                self.transport.unregisterProducer()
        if uid:
            yield self.refresh()
        return b"FETCH completed"

    @defer.inlineCallbacks
    def stream(self, folder: Any, fr: FileRange) -> Any:
        """Send a literal of fr.length octets read from the file in chunks (no whole copy)."""
        self.transport.write(b"{%d}\r\n" % fr.length)
        f = yield self.io(folder.open_message, fr.uid)
        try:
            yield self.io(f.seek, fr.offset)
            left = fr.length
            while left > 0 and not self.closed:
                data = yield self.io(f.read, min(CHUNK, left))
                if not data:
                    # The file shrank under us: pad so the literal length stays true.
                    data = b" " * min(CHUNK, left)
                left -= len(data)
                self.transport.write(data)
                yield self.gate.wait()
        finally:
            self.io(f.close)

    @defer.inlineCallbacks
    def do_IDLE(self, tag: bytes, args: list) -> Any:
        from twisted.internet import reactor

        self.send(b"+ idling")
        self.setTimeout(max(self.config.limits.imap_timeout, 1800))
        self.idle_line = None
        self.idling = defer.Deferred()  # lineReceived fires it with the client's line
        self.idling.addCallback(self._idle_line_received)
        self.resumeProducing()  # read DONE while the command runs
        try:
            while self.idle_line is None:
                if self.sel is not None:
                    yield self.refresh(shared=True)
                if self.idle_line is not None or self.closed:
                    break
                # Poll the store's cheap state token: a delivery by the queue (another thread,
                # or another process) shows up as EXISTS within IDLE_POLL seconds.
                self.idle_wake = defer.Deferred()
                call = reactor.callLater(IDLE_POLL, self._idle_wakeup)
                try:
                    yield self.idle_wake
                finally:
                    if call.active():
                        call.cancel()
        finally:
            self.idling = None
            self.idle_wake = None
        if self.closed:
            return None
        self.pauseProducing()
        self.setTimeout(self.config.limits.imap_timeout)
        if self.idle_line.strip().upper() != b"DONE":
            # RFC 2177: only DONE ends IDLE (Twisted accepted any line, TWISTED-NOTES §4.1).
            raise bad("expected DONE")
        yield self.refresh()
        return b"IDLE terminated"

    idle_wake: Optional[defer.Deferred] = None

    def _idle_line_received(self, line: bytes) -> None:
        self.idle_line = line
        self._idle_wakeup()

    def _idle_wakeup(self) -> None:
        d, self.idle_wake = self.idle_wake, None
        if d is not None and not d.called:
            d.callback(None)

    # -- folder state -------------------------------------------------------------------------
    def store_errors(self) -> tuple:
        from mailsuite.mailbox import store

        return (store.MailboxError,)

    @defer.inlineCallbacks
    def refresh(self, shared: bool = False) -> Any:
        """Tell the client what changed in the selected folder: EXPUNGE, FETCH FLAGS, EXISTS.

        shared: IDLE polling; sessions idling on one folder share one state_token check per
        poll interval (200 idle Thunderbird connections cost one stat round, not 200)."""
        sel = self.sel
        if sel is None or self.closed:
            return
        if shared:
            token = yield _shared_token(self, sel.folder)
        else:
            token = yield self.io(sel.folder.state_token)
        if token == sel.token:
            return
        from mailsuite.mailbox.store import NoSuchFolder

        try:
            st = yield self.io(_sync_folder, sel.folder)
            infos, token = st.infos, st.token
        except NoSuchFolder:
            # Deleted or renamed by another session: RFC 3501 §7.1.5 allows BYE here, and
            # sequence numbers could no longer be kept consistent.
            log.info("imap: selected folder {folder} of {user} vanished", folder=sel.folder.name,
                     user=self.user)
            self.send(b"* BYE the selected mailbox was deleted or renamed")
            self.hangup()
            self.closed = True
            return
        if self.sel is not sel:
            return
        sel.token = token
        old = sel.view
        if infos is old and not sel.own:
            return  # the very list we already reported: nothing changed
        m = len(old)
        if not sel.own and len(infos) == m and infos == old:
            sel.view = infos
            return  # a new list with the same messages and flags
        if not sel.own and len(infos) > m and (m == 0 or infos[m - 1] is old[-1]) and infos[:m] == old:
            # Only new messages (the common case while idling): the store reuses the info
            # objects of unchanged messages, so this comparison runs at C speed on 100k.
            sel.view = infos
            sel.recent = st.recent
            self.send(b"* %d EXISTS" % len(sel))
            self.send(b"* %d RECENT" % len(sel.recent))
            return
        # Merge the old and new lists (both in UID order): gone, flag changes, new messages.
        gone: list[int] = []
        changed: list[int] = []
        j, n = 0, len(infos)
        own = sel.own
        for o in old:
            while j < n and infos[j].uid < o.uid:
                j += 1
            if j < n and infos[j].uid == o.uid:
                if infos[j].flags != own.get(o.uid, o).flags:
                    changed.append(o.uid)
                j += 1
            else:
                gone.append(o.uid)
        self.report_expunged(gone)
        before = len(sel)
        sel.view = infos
        sel.own = {}
        sel.recent = st.recent
        for u in changed:
            self.send(b"* %d FETCH (UID %d FLAGS %s)" % (sel.seq_of(u), u, flag_list(sel.flags(u))))
        if len(sel) != before:
            self.send(b"* %d EXISTS" % len(sel))
            self.send(b"* %d RECENT" % len(sel.recent))


REFRESH_AFTER = {b"CAPABILITY", b"LIST", b"LSUB", b"CREATE", b"DELETE", b"RENAME", b"SUBSCRIBE",
                 b"UNSUBSCRIBE", b"NAMESPACE", b"ID", b"ENABLE"}

COMMANDS = {
    "notauth": {"CAPABILITY", "NOOP", "LOGOUT", "ID", "STARTTLS", "LOGIN", "AUTHENTICATE"},
}
COMMANDS["auth"] = COMMANDS["notauth"] - {"STARTTLS", "LOGIN", "AUTHENTICATE"} | {
    "ENABLE", "NAMESPACE", "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE",
    "UNSUBSCRIBE", "LIST", "LSUB", "STATUS", "APPEND", "IDLE", "CHECK"}
COMMANDS["selected"] = COMMANDS["auth"] | {
    "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE"}


# -- helpers run in the io pool ------------------------------------------------------------------

_token_checks: dict[str, tuple] = {}  # folder path -> (time, Deferred, [token])


def _shared_token(proto: IMAPServer, folder: Any) -> defer.Deferred:
    """folder.state_token(), computed at most once per IDLE_POLL*0.8 s per folder path."""
    now = time.monotonic()
    entry = _token_checks.get(folder.path)
    if entry is None or now - entry[0] > IDLE_POLL * 0.8:
        d = proto.io(folder.state_token)
        holder: list = []

        def keep(token: Any) -> Any:
            holder.append(token)
            return token
        d.addCallback(keep)
        entry = (now, d, holder)
        _token_checks[folder.path] = entry
        if len(_token_checks) > 10000:  # forget folders nobody idles on any more
            for k in [k for k, v in _token_checks.items() if now - v[0] > 60]:
                del _token_checks[k]
    _, d, holder = entry
    if holder:
        # The generation part is per process, so a token computed a moment ago is still valid.
        return defer.succeed(holder[0])
    result: defer.Deferred = defer.Deferred()

    def share(token: Any) -> Any:
        result.callback(token)
        return token

    def fail(f: Any) -> Any:
        result.errback(f)
        return None
    d.addCallbacks(share, fail)
    return result


def _batches(sel: Selection, uids: list[int], needs_file: bool) -> list[list[int]]:
    """FETCH work units: BATCH messages per io call, and (bodies) at most BATCH_BYTES of
    message files, so a batch and its prefetched successor stay small in memory."""
    if not needs_file:
        step = BATCH * 25
        return [uids[i:i + step] for i in range(0, len(uids), step)]
    out: list[list[int]] = []
    current: list[int] = []
    size = 0
    for u, _seq, info in sel.locate(uids):
        if current and (len(current) >= BATCH or size + info.size > BATCH_BYTES):
            out.append(current)
            current, size = [], 0
        current.append(u)
        size += info.size
    if current:
        out.append(current)
    return out


@dataclass
class FolderState:
    """Everything SELECT/STATUS/refresh need, read in one io-pool call: the store's
    properties take its folder lock, which must never be waited for on the reactor."""

    infos: list
    keywords: list
    token: Any
    uidvalidity: int
    uidnext: int
    recent: frozenset


def _sync_folder(folder: Any) -> FolderState:
    token = folder.state_token()
    infos = folder.sync()
    return FolderState(infos, list(folder.keywords), token, folder.uidvalidity, folder.uidnext,
                       folder.recent)


def _uidvalidity(folder: Any) -> int:
    return folder.uidvalidity


def _folders_and_subs(account: Any) -> tuple[list[str], list[str]]:
    return account.list_folders(), account.subscriptions()


def _with_flags(info: Any, flags: frozenset) -> Any:
    return dataclasses.replace(info, flags=frozenset(flags))


def _store_flags(folder: Any, uids: list[int], flags: list[str], mode: bytes) -> list[tuple[int, frozenset]]:
    from mailsuite.mailbox import store

    out = []
    for u in uids:
        try:
            if mode == b"+":
                new = folder.add_flags(u, flags)
            elif mode == b"-":
                new = folder.remove_flags(u, flags)
            else:
                new = folder.set_flags(u, flags)
        except store.NoSuchMessage:
            continue
        out.append((u, frozenset(new)))
    return out


def parse_flags(tokens: Any) -> list[str]:
    flags = []
    for t in tokens:
        if not isinstance(t, Atom):
            raise bad("flags must be atoms")
        f = bytes(t).decode("ascii", "replace")
        if f.startswith("\\"):
            canonical = {s.lower(): s for s in SYSTEM_FLAGS + ("\\Recent",)}.get(f.lower())
            if canonical is None:
                raise bad(f"unknown system flag {f[:40]}")
            f = canonical
        elif not f or any(c in f for c in '(){%*"\\]') or not f.isascii():
            raise bad("invalid keyword")
        flags.append(f)
    return flags


def _loader(folder: Any, uid: int) -> Any:
    def load() -> bytes:
        with folder.open_message(uid) as f:
            return f.read()
    return load


def _search_batch(program: Any, cands: list, max_seq: int, max_uid: int) -> list[int]:
    from mailsuite.mailbox import store

    hits = []
    for c in cands:
        try:
            if searchmod.matches(program, c, max_seq, max_uid):
                hits.append(c.uid)
        except (store.NoSuchMessage, OSError):
            continue
    return hits


def _compute_batch(folder: Any, uids: list[int], atts: list[FetchAtt]) -> dict[int, dict]:
    """For each message: {id(att): bytes | FileRange} for the items that need the file."""
    from mailsuite.mailbox import store

    out: dict[int, dict] = {}
    for u in uids:
        try:
            f = folder.open_message(u)
        except (store.NoSuchMessage, OSError):
            continue
        with f:
            try:
                out[u] = _compute_one(f, u, atts)
            except (OSError, ValueError):
                continue
    return out


HEADER_TEXTS = (b"HEADER", b"HEADER.FIELDS", b"HEADER.FIELDS.NOT")


def _compute_one(f: Any, uid: int, atts: list[FetchAtt]) -> dict:
    size = os.fstat(f.fileno()).st_size
    wanted = [a for a in atts if a.name not in (b"FLAGS", b"UID", b"INTERNALDATE", b"RFC822.SIZE")]
    # Thunderbird's new-mail fetch is HEADER.FIELDS: read only the header block for that.
    only_header = all(a.name == b"RFC822.HEADER" or (a.section is not None and not a.path
                                                     and a.text in HEADER_TEXTS) for a in wanted)
    need_tree = any(a.name in (b"ENVELOPE", b"BODY", b"BODYSTRUCTURE", b"RFC822.TEXT") and a.section is None
                    or (a.section is not None and a.path) for a in wanted)
    mapped = None
    if only_header:
        buf: Any = _read_header(f)
    elif size > 4 * 1024 * 1024:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = mapped
    else:
        buf = f.read()
    try:
        if need_tree:
            root = mime.parse(buf)
        else:
            hend = mime.header_end(buf)
            root = mime.Part(0, hend, len(buf), mime.parse_headers(buf, 0, hend))
        result: dict = {}
        for a in wanted:
            if a.name == b"ENVELOPE":
                piece: Any = mime.serialize(mime.envelope(buf, root))
            elif a.name == b"BODYSTRUCTURE" or (a.name == b"BODY" and a.section is None):
                piece = mime.serialize(mime.bodystructure(buf, root, a.name == b"BODYSTRUCTURE"))
            else:
                if a.name == b"RFC822" or (a.section is not None and not a.path and a.text is None):
                    rng: Any = (0, size)
                elif a.name == b"RFC822.HEADER":
                    rng = (0, root.body_start)
                elif a.name == b"RFC822.TEXT":
                    rng = (root.body_start, size - root.body_start)
                else:
                    try:
                        rng = mime.section(buf, root, a.path, a.text, a.fields)
                    except mime.NoSuchPart:
                        rng = b""  # RFC 3501: a part that does not exist is an empty string
                    if a.text == b"TEXT" and not a.path:
                        rng = (root.body_start, size - root.body_start)
                piece = _literal(buf, uid, rng, a.partial)
            result[id(a)] = piece
        return result
    finally:
        if mapped is not None:
            mapped.close()


def _literal(buf: Any, uid: int, rng: Any, partial: Optional[tuple[int, int]]) -> Any:
    """The literal for a section, sliced to <origin.octets> (TWISTED-NOTES §4.4 #1)."""
    if isinstance(rng, bytes):
        data = rng
        if partial:
            o, n = partial
            data = data[o:o + n]
        return b"{%d}\r\n" % len(data) + data
    offset, length = rng
    if partial:
        o, n = partial
        if o >= length:
            return b'""'  # RFC 3501 §6.4.5: origin past the end gives an empty string
        offset, length = offset + o, min(n, length - o)
    if length > STREAM_THRESHOLD:
        return FileRange(uid, offset, length)
    data = bytes(buf[offset:offset + length])
    if len(data) < length:  # only the header block was read: fall back to streaming
        return FileRange(uid, offset, length)
    return b"{%d}\r\n" % len(data) + data


def _read_header(f: Any) -> bytes:
    """Read up to and including the blank line that ends the header block."""
    buf = b""
    while True:
        chunk = f.read(16384)
        if not chunk:
            return buf
        start = max(0, len(buf) - 3)
        buf += chunk
        if mime._HEADER_END.search(buf, start) or buf.startswith(b"\r\n") or buf.startswith(b"\n"):
            return buf
        if len(buf) > 8 * 1024 * 1024:
            return buf

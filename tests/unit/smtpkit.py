"""In-memory SMTP test kit: fakes for the directory and the queue, an SMTP client over a
StringTransport driven by a task.Clock, and the runner of the tests/dialogs/*.txt conversations.

Nothing here opens a socket or sleeps: time passes only when the clock is advanced.
"""
from __future__ import annotations

import base64
import errno
import os
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mailsuite.config import Config
from mailsuite.directory.api import DirectoryUnavailable, Route
from mailsuite.directory.records import GreylistOutcome, RateOutcome
from mailsuite.queue.agents import StagedFile
from mailsuite.directory.throttle import LoginThrottle
from mailsuite.smtp import server_factory
from mailsuite.smtp.policy import MXPolicy, SubmissionPolicy

HOSTNAME = "mx.unit.example"
PASSWORD = "secret-pw-1"
USERS = ("alice@example.org", "bob@example.org")
DIALOG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "dialogs")
DIALOGS = sorted(n[:-4] for n in os.listdir(DIALOG_DIR) if n.endswith(".txt"))
# The limits every dialog was written for.
DIALOG_LIMITS = {"max_recipients": 5, "max_message_size": 10000, "max_auth_failures": 3,
                 "auth_failure_delay": 0.05, "smtp_timeout": 3}


def unit_config(**limits: Any) -> Config:
    config = Config()
    config.server.hostname = HOSTNAME
    config.server.admin_address = "postmaster@example.org"
    for key, value in limits.items():
        setattr(config.limits, key, value)
    return config


# -- fakes --------------------------------------------------------------------------------------
class _Later:
    """Answers now, or `latency` clock seconds later (like SQL in a thread pool)."""

    def __init__(self, clock: task.Clock, latency: float):
        self.clock = clock
        self.latency = latency

    def succeed(self, value: Any) -> defer.Deferred:
        if not self.latency:
            return defer.succeed(value)
        return task.deferLater(self.clock, self.latency, lambda: value)

    def fail(self, exc: Exception) -> defer.Deferred:
        if not self.latency:
            return defer.fail(exc)

        def raise_it() -> None:
            raise exc

        return task.deferLater(self.clock, self.latency, raise_it)


class FakeDirectory:
    """A DirectoryService over a dict: users of example.org, +tags and case folded, bare
    postmaster via the configured admin address. Never fails (unless `unavailable`), remembers
    every call, and delays failed logins by its LoginThrottle exactly as Directory does."""

    def __init__(self, clock: task.Clock, users: Sequence[str] = USERS, password: str = PASSWORD,
                 auth_failure_delay: float = 0.0, latency: float = 0.0):
        self.clock = clock
        self.passwords = {u: password for u in users}
        self.passwords["postmaster@example.org"] = password
        self.throttle = LoginThrottle(delay=auth_failure_delay, clock=clock)
        self.calls: list[tuple[str, Any]] = []
        self.unavailable = False
        self.forwards: dict[str, tuple[str, ...]] = {}  # alias -> remote targets
        self._later = _Later(clock, latency)

    def _canonical(self, address: str) -> tuple[str, str]:
        local, _, domain = address.lower().rpartition("@")
        return local.split("+", 1)[0], domain

    def route(self, address: str) -> defer.Deferred:
        self.calls.append(("route", address))
        if self.unavailable:
            return self._later.fail(DirectoryUnavailable("database is down"))
        local, domain = self._canonical(address)
        if domain != "example.org":
            return self._later.succeed(Route(address, hosted=False))
        canonical = f"{local}@{domain}"
        found = (canonical,) if canonical in self.passwords else ()
        return self._later.succeed(Route(address.lower(), hosted=True, mailboxes=found,
                                         remote=self.forwards.get(canonical, ())))

    def sender_addresses(self, user: str, fresh: bool = False) -> defer.Deferred:
        self.calls.append(("sender_addresses", user))
        return self._later.succeed(frozenset({user}))

    def is_hosted(self, domain: str) -> defer.Deferred:
        return self._later.succeed(domain.lower() == "example.org")

    def user_exists(self, address: str) -> defer.Deferred:
        return self._later.succeed(address.lower() in self.passwords)

    def authenticate(self, address: str | bytes, password: str | bytes,
                     client_ip: str | None = None) -> defer.Deferred:
        address = address.decode() if isinstance(address, bytes) else address
        password = password.decode() if isinstance(password, bytes) else password
        self.calls.append(("authenticate", (address, client_ip)))
        if self.unavailable:
            return self._later.fail(DirectoryUnavailable("database is down"))
        if self.passwords.get(address.lower()) == password:
            if client_ip is not None:
                self.throttle.succeeded(client_ip)
            return self._later.succeed(address.lower())
        delay = self.throttle.failed(client_ip) if client_ip is not None else 0.0

        def refuse() -> None:
            raise UnauthorizedLogin("authentication failed")

        return task.deferLater(self.clock, delay + self._later.latency, refuse)

    # Inbound trust state: everything passes, nothing is counted (the trust classes have their
    # own tests on a real store: tests/unit/test_trust_*.py).
    def greylist_check(self, network: str, sender: str, recipient: str, now: float, delay: int,
                       retry_window: int, pass_ttl: int) -> defer.Deferred:
        return self._later.succeed(GreylistOutcome(True, "whitelisted"))

    def rate_hit(self, key: str, window_seconds: int, limit: int, now: float,
                 cost: int = 1) -> defer.Deferred:
        return self._later.succeed(RateOutcome(True, cost, limit))

    def rate_counters(self, now: float) -> defer.Deferred:
        return self._later.succeed([])

    def purge_trust(self, now: float) -> defer.Deferred:
        return self._later.succeed((0, 0, 0))


@dataclass
class Queued:
    queue_id: str
    sender: str
    recipients: list[tuple[str, Route]]
    data: bytes
    meta: dict[str, Any]

    @property
    def mailboxes(self) -> list[str]:
        return [m for _, route in self.recipients for m in route.mailboxes]


class FakeQueue:
    """A MessageQueue that keeps every message in memory. `fail_marker` in the data makes the
    submission fail like a broken disk (EIO; `fail_with` for any other error). Staged messages
    (`submit_file`) are read back and the file removed, as the real queue's rename would;
    `incoming_dir` is a private temporary directory."""

    fail_marker = b"FAIL-THE-QUEUE"

    def __init__(self, clock: task.Clock, latency: float = 0.0, incoming_dir: str | None = None):
        self.messages: list[Queued] = []
        self._later = _Later(clock, latency)
        if incoming_dir is None:
            incoming_dir = tempfile.mkdtemp(prefix="smtpkit-incoming-")
            weakref.finalize(self, shutil.rmtree, incoming_dir, True)
        self.incoming_dir = incoming_dir
        self.fail_with: OSError | None = None  # every submission fails with this

    def staged(self) -> list[str]:
        """Staged files still in the incoming directory."""
        try:
            return sorted(os.listdir(self.incoming_dir))
        except FileNotFoundError:
            return []

    def submit_file(self, sender: str, recipients: Sequence[tuple[str, Any]],
                    path: str | StagedFile, size: int, meta: Mapping[str, Any]
                    ) -> defer.Deferred:
        if not isinstance(path, str):  # taken over once complete, as the real queue does
            return path.finish(lambda p: p).addCallback(
                lambda p: self.submit_file(sender, recipients, p, size, meta))
        with open(path, "rb") as f:
            data = f.read()
        assert len(data) == size, (len(data), size)
        d = self.submit(sender, recipients, data, meta)
        if not (self.fail_marker in data or self.fail_with is not None):
            os.unlink(path)  # taken over, like the spool's rename
        return d

    def submit(self, sender: str, recipients: Sequence[tuple[str, Any]], data: bytes,
               meta: Mapping[str, Any]) -> defer.Deferred:
        if self.fail_with is not None:
            return self._later.fail(self.fail_with)
        if self.fail_marker in data:
            return self._later.fail(OSError(errno.EIO, "Input/output error"))
        queued = Queued(f"Q{len(self.messages) + 1}", sender, list(recipients), data, dict(meta))
        self.messages.append(queued)
        return self._later.succeed(queued.queue_id)

    def count_for(self, address: str) -> int:
        return sum(m.mailboxes.count(address) for m in self.messages)


class FakeTLS:
    """TLSMaterial's one method; the context is only handed to transport.startTLS."""

    context = object()

    def server_context(self) -> object:
        return self.context


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that can start TLS: it records the context and marks itself secure."""

    tls_context: object | None = None

    def startTLS(self, contextFactory: object) -> None:
        self.tls_context = contextFactory


# -- our server in memory -----------------------------------------------------------------------
@dataclass
class World:
    """One set of SMTP listeners and the fakes behind them."""

    clock: task.Clock = field(default_factory=task.Clock)
    limits: dict[str, Any] = field(default_factory=dict)
    latency: float = 0.0
    tls: bool = True
    smtp: dict[str, Any] = field(default_factory=dict)  # [smtp] settings
    io: Any = None  # the WorkPool for staged DATA writes (None: InlinePool)
    queue_dir: str | None = None  # FakeQueue's incoming directory (None: a temporary one)
    # Trust gates by listener name: {"mx": make_gate(config) -> Gate} (mailsuite.trust.gate)
    gates: dict[str, Any] = field(default_factory=dict)
    srs: Any = None  # the MX policy's SRS (mailsuite.trust.srs), None: no SRS addresses
    # (listener, reason) of every refusal the servers reported (on_refusal, mailsuite/events)
    refusals: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.config = unit_config(**self.limits)
        for key, value in self.smtp.items():
            setattr(self.config.smtp, key, value)
        self.directory = FakeDirectory(self.clock, latency=self.latency,
                                       auth_failure_delay=self.config.limits.auth_failure_delay)
        self.queue = FakeQueue(self.clock, latency=self.latency, incoming_dir=self.queue_dir)
        self.factories = {
            "mx": self._factory(MXPolicy, False, "mx"),
            "submission": self._factory(SubmissionPolicy, False, "submission"),
            "submissions": self._factory(SubmissionPolicy, True, "submission"),
        }

    def _factory(self, policy: type, implicit_tls: bool, listener: str) -> ServerFactory:
        make_gate = self.gates.get(listener)
        return server_factory(self.config, policy(self.directory, self.config, srs=self.srs),
                              self.queue,
                              self.directory, FakeTLS() if self.tls else None, self.clock,
                              implicit_tls=implicit_tls, io=self.io,
                              gate=make_gate(self.config) if make_gate else None,
                              on_refusal=lambda *refusal: self.refusals.append(refusal))

    def connect(self, port: str = "mx", ip: str = "127.0.0.1") -> "Client":
        return Client(self.factories[port], self.clock, ip, secure=port == "submissions")


class Client:
    """Drives one server protocol over a StringTransport; `reply()` lets clock time pass (up to
    `wait` virtual seconds) until a complete reply has been written."""

    step = 0.05

    def __init__(self, factory: ServerFactory, clock: task.Clock, ip: str = "127.0.0.1",
                 secure: bool = False):
        self.clock = clock
        self.transport = TLSStringTransport(peerAddress=IPv4Address("TCP", ip, 40000))
        self.proto: Protocol = factory.buildProtocol(self.transport.getPeer())
        self.proto.makeConnection(self.transport)
        self.secure = secure
        self.buf = b""
        self.transcript: list[str] = []
        self.last: list[bytes] = []
        self.lost = False
        self.dropped = ""  # the exception that escaped the protocol, if one did

    # client side
    def send(self, data: bytes) -> None:
        self.transcript.append(f"C: {data[:200]!r}")
        if self.dropped:
            return
        try:
            self.proto.dataReceived(data)
        except Exception as e:
            # Under a reactor an exception out of dataReceived drops the connection.
            self.dropped = f"{type(e).__name__}: {e}"
            self.transport.loseConnection()

    def start_tls(self) -> None:
        assert self.transport.tls_context is not None, "the server did not start TLS"
        self.secure = True

    def disconnect(self) -> None:
        if not self.lost:
            self.lost = True
            self.proto.connectionLost(connectionDone)

    # server side
    def _take(self) -> None:
        self.buf += self.transport.value()
        self.transport.clear()

    def _complete_reply(self) -> list[bytes] | None:
        end = 0
        while True:
            nl = self.buf.find(b"\r\n", end)
            if nl < 0:
                return None
            last = self.buf[end + 3:end + 4] != b"-"
            end = nl + 2
            if last:
                lines = self.buf[:end - 2].split(b"\r\n")
                self.buf = self.buf[end:]
                return lines

    def wait(self, seconds: float) -> None:
        """Let `seconds` of clock time pass, in small steps (timers fire in order)."""
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end - 1e-9:
            self.clock.advance(min(self.step, end - self.clock.seconds()))

    def reply(self, wait: float = 30.0) -> list[bytes]:
        deadline = self.clock.seconds() + wait
        while True:
            self._take()
            lines = self._complete_reply()
            if lines is not None:
                break
            if self.dropped:
                raise EOFError(f"the connection dropped ({self.dropped})")
            if self.clock.seconds() >= deadline:
                raise EOFError(f"no reply within {wait} s (unread: {self.buf!r})")
            self.clock.advance(self.step)
        for line in lines:
            self.transcript.append(f"S: {line[:200]!r}")
            assert re.match(rb"^[2-5]\d\d[ -]", line), f"not an SMTP reply line: {line!r}"
        self.last = lines
        return lines

    def code(self) -> int:
        return int(self.reply()[0][:3])

    def replies(self, n: int) -> list[list[bytes]]:
        return [self.reply() for _ in range(n)]

    def ehlo(self, name: str = "client.example") -> list[bytes]:
        assert self.reply()[-1].startswith(b"220 ")
        self.send(f"EHLO {name}\r\n".encode())
        lines = self.reply()
        assert lines[-1].startswith(b"250 ")
        return lines

    def nothing_within(self, seconds: float) -> None:
        self._take()
        if self.buf:
            raise AssertionError(f"expected no reply, got {self.buf!r}")
        self.wait(seconds)
        self._take()
        if self.buf:
            raise AssertionError(f"expected no reply within {seconds} s, got {self.buf!r}")
        if self.transport.disconnecting:
            raise AssertionError("connection closed instead of staying silent")

    def closed(self) -> bool:
        """The server hung up (after its lingering, if any) with nothing left unread."""
        self.wait(1.0)
        self._take()
        return not self.buf and self.transport.disconnecting


# -- dialogs ------------------------------------------------------------------------------------
def expand(text: str) -> str:
    text = re.sub(r"\{(.)\*(\d+)\}", lambda m: m.group(1) * int(m.group(2)), text)
    text = re.sub(r"\{plain:([^:}]*):([^}]*)\}", lambda m: base64.b64encode(
        f"\0{m.group(1)}\0{m.group(2)}".encode()).decode(), text)
    return re.sub(r"\{b64:([^}]*)\}", lambda m: base64.b64encode(m.group(1).encode()).decode(),
                  text)


def unescape(text: str) -> bytes:
    out, i = bytearray(), 0
    simple = {"r": b"\r", "n": b"\n", "t": b"\t", "0": b"\0", "\\": b"\\"}
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "x":
                out.append(int(text[i + 2:i + 4], 16))
                i += 4
                continue
            out += simple[nxt]
            i += 2
            continue
        out += c.encode("utf-8")
        i += 1
    return bytes(out)


def run_dialog(connect: Callable[[str], Client], delivered: Callable[[str], int],
               path: str, enhanced_codes: bool = True, advertised: bool = True) -> None:
    """Play one tests/dialogs/*.txt file (its format is described in tests/dialogs/README).

    `connect(port_name)` opens the conversation; `delivered(address)` counts the messages
    accepted for a mailbox so far (START_COUNT / DELIVERED). With `enhanced_codes=False` only
    the three-digit code of an `S:` line is compared (for a server without RFC 2034); with
    `advertised=False` the `S~` checks (what a reply must contain) are skipped, so that a server
    that does not advertise an extension is still tested on how it behaves."""
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    directives = [d for d in lines if d.strip() and not d.startswith("#")]
    port = "mx"
    if directives and directives[0].startswith("PORT:"):
        port = directives.pop(0).split(":", 1)[1].strip()
    before: dict[str, int] = {}
    conv = connect(port)
    try:
        greeting = conv.reply()
        assert greeting[-1].startswith(b"220 "), f"bad greeting {greeting!r}"
        for d in directives:
            verb, _, arg = d.partition(" ")
            if verb == "C:":
                conv.send(expand(arg).encode("utf-8") + b"\r\n")
            elif verb == "C!":
                conv.send(unescape(expand(arg)))
            elif verb == "S:":
                try:
                    reply = conv.reply()
                except EOFError as e:
                    raise AssertionError(f"expected {arg}, got {e}") from None
                want = arg.split()
                got = reply[-1].decode("utf-8", "replace")
                assert got[:3] == want[0], f"expected {arg}, got {reply!r}"
                if len(want) > 1 and enhanced_codes:
                    assert got[4:].startswith(want[1]), f"expected {arg}, got {reply!r}"
            elif verb == "S~":
                if advertised:
                    assert any(arg.encode() in l for l in conv.last), \
                        f"{arg!r} not in {conv.last!r}"
            elif verb == "S!~":
                assert not any(arg.encode() in l for l in conv.last), \
                    f"{arg!r} must not be in {conv.last!r}"
            elif verb == "TLS":
                conv.start_tls()
            elif verb == "NOREPLY":
                conv.nothing_within(float(arg or 0.5))
            elif verb == "CLOSED":
                assert conv.closed(), "the server kept the connection open"
            elif verb == "SLEEP":
                conv.wait(float(arg))
            elif verb == "DELIVERED":
                address, count = arg.split()
                if address not in before:
                    raise AssertionError("DELIVERED needs a START_COUNT earlier in the dialog")
                got_n = delivered(address) - before[address]
                assert got_n == int(count), f"{address}: {got_n} messages, expected {count}"
            elif verb == "START_COUNT":
                before[arg] = delivered(arg)
            else:
                raise ValueError(f"unknown directive {d!r}")
    except Exception as e:
        raise AssertionError(f"{e}\ntranscript:\n" + "\n".join(conv.transcript)) from e
    finally:
        conv.disconnect()


def dialog_path(name: str) -> str:
    return os.path.join(DIALOG_DIR, name + ".txt")

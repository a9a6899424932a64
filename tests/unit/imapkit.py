"""Driving IMAPServer in memory: a StringTransport, task.Clock, InlinePool, a real MailStore on a
temporary directory and a fake directory. `Client` reads and writes like a raw socket client
(line(), response(tag), cmd(line)), so tests read like the conversations they check."""
from __future__ import annotations

import os
import re
import time
from typing import Optional

import pytest

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, error, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailsuite.config import Config
from mailsuite.directory.throttle import LoginThrottle
from mailsuite.imap.server import IMAPServer
from mailsuite.mailbox.store import MailStore
from mailsuite.pools import InlinePool
from tests.harness import maildir_messages
from tests.imapwire import ResponseReader

PASSWORD = "secret-pw-1"
USERS = ("alice@example.org", "bob@example.org", "carol@example.org")


class FakeDirectory:
    """A DirectoryService with fixed users that never fails and remembers every login."""

    def __init__(self, users: tuple[str, ...] = USERS, password: str = PASSWORD):
        self.users = {u.lower(): u for u in users}
        self.password = password
        self.logins: list[tuple[str, Optional[str], bool]] = []
        self.throttle = LoginThrottle(delay=0, clock=task.Clock())

    def authenticate(self, address: str | bytes, password: str | bytes,
                     client_ip: str | None = None) -> defer.Deferred:
        if isinstance(address, bytes):
            address = address.decode("utf-8", "replace")
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        canonical = self.users.get(address.lower())
        ok = canonical is not None and password == self.password
        self.logins.append((address, client_ip, ok))
        if not ok:
            return defer.fail(UnauthorizedLogin("authentication failed"))
        return defer.succeed(canonical)

    def route(self, address: str) -> defer.Deferred:
        return defer.succeed(None)

    def sender_addresses(self, user: str, fresh: bool = False) -> defer.Deferred:
        return defer.succeed(frozenset({user}))

    def is_hosted(self, domain: str) -> defer.Deferred:
        return defer.succeed(domain == "example.org")

    def user_exists(self, address: str) -> defer.Deferred:
        return defer.succeed(address.lower() in self.users)


class FakeTLS:
    """Stands in for TLSMaterial: STARTTLS hands this context to the transport."""

    context = object()

    def server_context(self) -> object:
        return self.context


class TLSStringTransport(StringTransport):
    """A StringTransport that records STARTTLS instead of encrypting."""

    tls_context: object = None
    aborted = False

    def startTLS(self, context: object) -> None:
        self.tls_context = context

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


class World:
    """One server's shared parts: configuration, store, directory, clock."""

    def __init__(self, base: str, **limits: float):
        self.config = Config()
        self.config.server.data_dir = str(base)
        for k, v in limits.items():
            setattr(self.config.limits, k, v)
        os.makedirs(self.config.mail_dir, exist_ok=True)
        self.store = MailStore(self.config.mail_dir)
        self.directory = FakeDirectory()
        self.clock = task.Clock()
        self.tls = FakeTLS()
        self.changes = None  # a mailsuite.notify.ChangeHub for the tests of notifications
        self._laid_out: set[str] = set()

    def connect(self, tls: bool = True, login_as: str | None = "alice@example.org") -> "Client":
        return Client(self, tls=tls, login_as=login_as)

    def maildir(self, address: str, folder: str = "") -> str:
        local, _, domain = address.lower().rpartition("@")
        path = os.path.join(self.config.mail_dir, domain, local)
        return os.path.join(path, "." + folder) if folder else path

    def messages(self, address: str, folder: str = "") -> list[str]:
        return maildir_messages(self.maildir(address, folder))

    def append(self, address: str, folder: str, data: bytes, flags: tuple[str, ...] = (),
               date: float | None = None) -> int:
        """What a client's APPEND does, straight into the store (setting up a test)."""
        account = self.store.account(address)
        if address not in self._laid_out:  # once per account: ~half the cost of an append
            account.ensure_layout()
            self._laid_out.add(address)
        name = folder or "INBOX"
        if not account.folder_exists(name):
            account.create_folder(name)
        return account.folder(name).append(data, list(flags), date)

    def deliver(self, address: str, data: bytes) -> str:
        """What the delivery agent does: a new file in new/ of INBOX, written in tmp/ first."""
        root = self.maildir(address)
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        name = f"{int(time.time())}.M{len(os.listdir(os.path.join(root, 'new')))}P{os.getpid()}Q1.test"
        tmp = os.path.join(root, "tmp", name)
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, os.path.join(root, "new", name))
        return name


class Client(ResponseReader):
    """One connection to an in-memory IMAPServer, read and written like a raw socket."""

    def __init__(self, world: World, tls: bool = True, login_as: str | None = "alice@example.org"):
        self.world = world
        self.clock = world.clock
        self.proto = IMAPServer(world.config, world.directory, world.store, InlinePool(),
                                world.tls, world.clock, implicit_tls=tls, changes=world.changes)
        self.transport = TLSStringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
        self.proto.makeConnection(self.transport)
        self.buf = b""
        self.greeting = self.line()
        if login_as:
            resp = self.cmd(b"L LOGIN " + login_as.encode() + b" " + PASSWORD.encode())
            assert resp[-1].startswith(b"L OK"), resp

    # -- writing ------------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        if not self.transport.disconnecting:
            self.proto.dataReceived(data)
        self.clock.advance(0)  # calls the server scheduled for "the next reactor turn"

    def close(self) -> None:
        if self.proto.transport is not None and not self.proto.closed or not self.transport.disconnecting:
            self.transport.loseConnection()
        self.proto.connectionLost(Failure(error.ConnectionDone()))

    @property
    def disconnected(self) -> bool:
        return self.transport.disconnecting

    # -- reading ------------------------------------------------------------------------------
    def _pull(self) -> None:
        self.buf += self.transport.value()
        self.transport.clear()

    def pending(self) -> bytes:
        """Everything written and not read yet."""
        self._pull()
        return self.buf

    def line(self) -> bytes:
        self._pull()
        if b"\r\n" not in self.buf:
            if self.transport.disconnecting:
                raise ConnectionError(f"closed; pending {self.buf[:200]!r}")
            raise AssertionError(f"the server wrote no complete line; pending {self.buf[:200]!r}")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read_exact(self, n: int) -> bytes:
        self._pull()
        assert len(self.buf) >= n, f"only {len(self.buf)} of {n} octets written"
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def tagged(lines: list[bytes]) -> bytes:
    return lines[-1]


def simple(subject: str = "hello", body: str = "body text\r\n", extra: str = "") -> bytes:
    return (f"From: Sender <sender@remote.example>\r\nTo: alice@example.org\r\n"
            f"Subject: {subject}\r\nDate: Mon, 02 Feb 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@remote.example>\r\n{extra}\r\n{body}").encode()


def fetch_data(lines: list[bytes]) -> dict[int, dict[bytes, object]]:
    """The untagged FETCH responses of `lines`, parsed as imapclient parses them."""
    from imapclient.response_parser import parse_fetch_response

    raw = []
    for line in lines:
        m = re.match(rb"\* \d+ FETCH ", line)
        if not m:
            continue
        # imapclient's parser takes literals as (header, data) pairs
        parts = re.split(rb"(\{\d+\})\r\n", re.sub(rb"^\* (\d+) FETCH ", rb"\1 ", line))
        if len(parts) == 1:
            raw.append(parts[0])
            continue
        i = 0
        rest = parts[0]
        pieces = []
        while i + 2 < len(parts):
            size = int(parts[i + 1][1:-1])
            data, after = parts[i + 2][:size], parts[i + 2][size:]
            pieces.append((rest + parts[i + 1], data))
            rest = after
            i += 2
        pieces.append(rest)
        raw.extend(pieces)
    return dict(parse_fetch_response(raw, uid_is_key=False))


MAX_SIZE = 1024 * 1024


@pytest.fixture
def world(tmp_path) -> World:
    """A server's parts on tmp_path: the limits of the scenario server (1 MiB messages)."""
    return World(str(tmp_path), max_message_size=MAX_SIZE, max_auth_failures=3)


def folder_names(c: Client) -> list[str]:
    """The folder names of `LIST "" "*"`, decoded from modified UTF-7."""
    names = []
    for line in c.cmd(b'N LIST "" "*"')[:-1]:
        m = re.search(rb'"((?:[^"\\]|\\.)*)"$', line)
        names.append(m.group(1).decode("imap4-utf-7"))
    return names

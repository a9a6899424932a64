"""In-memory POP3 test kit: the real protocol and a real MailStore on a temporary directory, an
inline io pool, the fake directory of smtpkit, and a line client over a StringTransport."""
from __future__ import annotations

import base64
import collections
import os
from typing import Any

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone

from mailsuite.mailbox.store import MailStore
from mailsuite.pools import InlinePool
from mailsuite.pop3 import server_factory
from tests.unit.smtpkit import PASSWORD, USERS, FakeDirectory, FakeTLS, TLSStringTransport, \
    unit_config

__all__ = ["PASSWORD", "USERS", "Pop3World", "Pop3Client", "message", "plain"]


def message(subject: str, body: bytes = b"hello\r\n") -> bytes:
    return (f"From: sender@example.net\r\nTo: rcpt@example.org\r\nSubject: {subject}\r\n\r\n"
            .encode() + body)


def plain(user: str, password: str = PASSWORD, authzid: str = "") -> str:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


class Pop3World:
    """`limits` are [limits] keys; `pop3` sets [pop3] keys; `latency` delays the directory's
    answers by that many clock seconds (like SQL in a thread pool)."""

    def __init__(self, mail_dir: str, pop3: dict[str, Any] | None = None, latency: float = 0.0,
                 **limits: Any):
        self.clock = task.Clock()
        self.config = unit_config(**limits)
        for key, value in (pop3 or {}).items():
            setattr(self.config.pop3, key, value)
        self.directory = FakeDirectory(self.clock, latency=latency,
                                       auth_failure_delay=self.config.limits.auth_failure_delay)
        self.store = MailStore(mail_dir)
        self.mail_dir = mail_dir
        self._seq = 0
        self.factories: dict[str, ServerFactory] = {
            name: server_factory(self.config, self.directory, self.store, InlinePool(),
                                 FakeTLS(), self.clock, implicit_tls=name == "pop3s")
            for name in ("pop3", "pop3s")}

    def maildir(self, address: str) -> str:
        account = self.store.account(address)
        account.ensure_layout()
        return account.path

    def put(self, address: str, data: bytes) -> str:
        """Deliver like the delivery agent: tmp/ then rename into new/, ,S=<size>."""
        md = self.maildir(address)
        self._seq += 1
        key = f"{1700000000 + self._seq}.M{self._seq}P4242Q{self._seq}.testhost,S={len(data)}"
        with open(os.path.join(md, "tmp", key), "wb") as f:
            f.write(data)
        os.rename(os.path.join(md, "tmp", key), os.path.join(md, "new", key))
        return key

    def connect(self, port: str = "pop3s", ip: str = "127.0.0.1",
                buffer_size: int | None = None) -> "Pop3Client":
        return Pop3Client(self.factories[port], self.clock, ip, buffer_size)

    def login(self, address: str = USERS[0], port: str = "pop3s",
              buffer_size: int | None = None) -> "Pop3Client":
        c = self.connect(port, buffer_size=buffer_size)
        assert c.line().startswith(b"+OK")
        if port == "pop3":
            c.command("STLS")
        assert c.command(f"USER {address}").startswith(b"+OK")
        assert c.command(f"PASS {PASSWORD}").startswith(b"+OK")
        return c


class FlowTransport(TLSStringTransport):
    """Pauses its streaming producer when more than `buffer_size` octets wait to be read, like
    a TCP transport whose client does not read (twisted.internet.abstract.FileDescriptor);
    `drain()` is the client reading everything, which resumes the producer."""

    def __init__(self, buffer_size: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.buffer_size = buffer_size
        self.producer_paused = False
        self.peak = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        size = len(self.io.getvalue())
        self.peak = max(self.peak, size)
        if (size > self.buffer_size and self.producer is not None and self.streaming
                and not self.producer_paused):
            self.producer_paused = True
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        data = self.value()
        self.clear()
        if self.producer_paused and self.producer is not None:
            self.producer_paused = False
            self.producer.resumeProducing()
        return data


class Pop3Client:
    step = 0.05

    def __init__(self, factory: ServerFactory, clock: task.Clock, ip: str,
                 buffer_size: int | None = None):
        self.clock = clock
        address = IPv4Address("TCP", ip, 40000)
        self.transport = (TLSStringTransport(peerAddress=address) if buffer_size is None
                          else FlowTransport(buffer_size, peerAddress=address))
        self.proto: Protocol = factory.buildProtocol(self.transport.getPeer())
        self.proto.makeConnection(self.transport)
        self.buf = b""  # an incomplete last line
        self.lines: collections.deque[bytes] = collections.deque()

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def line(self, wait: float = 30.0) -> bytes:
        deadline = self.clock.seconds() + wait
        while True:
            self._take()
            if self.lines:
                return self.lines.popleft()
            if self.clock.seconds() >= deadline:
                raise EOFError(f"no line within {wait} s (unread: {self.buf!r})")
            self.clock.advance(self.step)

    def command(self, text: str) -> bytes:
        self.send(text.encode() + b"\r\n")
        return self.line()

    def multiline(self) -> list[bytes]:
        """The lines of a multi-line response up to the "." (still dot-stuffed)."""
        lines = []
        while (line := self.line()) != b".":
            lines.append(line)
        return lines

    def retr_bytes(self, n: int) -> bytes:
        """RETR n, un-stuffed like poplib does, each line ending with CRLF."""
        self.send(f"RETR {n}\r\n".encode())
        return self.retr_bytes_after_command()

    def retr_bytes_after_command(self) -> bytes:
        """The next RETR response (already asked for, e.g. pipelined), un-stuffed."""
        assert self.line().startswith(b"+OK")
        return b"".join((l[1:] if l.startswith(b"..") else l) + b"\r\n" for l in self.multiline())

    def _take(self) -> None:
        if isinstance(self.transport, FlowTransport):
            data = self.transport.drain()
        else:
            data = self.transport.value()
            self.transport.clear()
        *complete, self.buf = (self.buf + data).split(b"\r\n")
        self.lines.extend(complete)

    def unread(self) -> bytes:
        self._take()
        return b"".join(line + b"\r\n" for line in self.lines) + self.buf

    def closed(self) -> bool:
        return self.transport.disconnecting

    def disconnect(self) -> None:
        self.proto.connectionLost(connectionDone)

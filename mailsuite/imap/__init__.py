"""IMAP4rev1 front end of the mailbox store (RFC 3501 plus the extensions clients use).

`server_factory(suite, implicit_tls=False)` is called by mailsuite.service for the `imap`
(STARTTLS) and `imaps` (implicit TLS, wrapped by service.py) listeners.
"""
from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from mailsuite.imap.server import IMAPServer
from mailsuite.listeners import ConnectionCounter

log = Logger()


class _Refused(Protocol):
    """Over a connection limit: say why (RFC 3501 §7.1.5 BYE greeting) and hang up."""

    def connectionMade(self) -> None:
        self.transport.write(b"* BYE too many connections, try again later\r\n")
        self.transport.loseConnection()


class IMAPFactory(Factory):
    def __init__(self, suite: Any, implicit_tls: bool = False):
        self.suite = suite
        self.implicit_tls = implicit_tls
        limits = suite.config.limits
        self.connections = ConnectionCounter(limits.max_connections, limits.max_connections_per_ip)

    def buildProtocol(self, addr: Any) -> Any:
        ip = getattr(addr, "host", "?")
        if not self.connections.admit(ip):
            log.warn("imap: refused a connection from {ip}: connection limit reached", ip=ip)
            return _Refused()
        p = IMAPServer(self.suite, implicit_tls=self.implicit_tls)
        p.factory = self
        p.on_close = lambda: self.connections.release(ip)
        return p


def server_factory(suite: Any, implicit_tls: bool = False, **kwargs: Any) -> IMAPFactory:
    """The protocol factory for one IMAP listener."""
    return IMAPFactory(suite, implicit_tls)

"""IMAP4rev1 front end of the mailbox store (RFC 3501 plus the extensions clients use).

`server_factory(suite, implicit_tls=False)` is called by mailsuite.service for the `imap`
(STARTTLS) and `imaps` (implicit TLS, wrapped by service.py) listeners.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

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
        self.active: Counter = Counter()  # client IP -> open connections

    def buildProtocol(self, addr: Any) -> Any:
        from mailsuite.imap.server import IMAPServer

        limits = self.suite.config.limits
        ip = getattr(addr, "host", "?")
        if (sum(self.active.values()) >= limits.max_connections
                or self.active[ip] >= limits.max_connections_per_ip):
            log.warn("imap: refused a connection from {ip}: connection limit reached", ip=ip)
            return _Refused()
        self.active[ip] += 1
        p = IMAPServer(self.suite, implicit_tls=self.implicit_tls)
        p.factory = self
        p.on_close = lambda: self._closed(ip)
        return p

    def _closed(self, ip: str) -> None:
        self.active[ip] -= 1
        if self.active[ip] <= 0:
            del self.active[ip]


def server_factory(suite: Any, implicit_tls: bool = False, **kwargs: Any) -> IMAPFactory:
    """The protocol factory for one IMAP listener."""
    return IMAPFactory(suite, implicit_tls)

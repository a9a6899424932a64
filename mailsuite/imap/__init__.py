"""IMAP4rev1 front end of the mailbox store (RFC 3501 plus the extensions clients use).

`server_factory(suite, implicit_tls=False)` is called by mailsuite.service for the `imap`
(STARTTLS) and `imaps` (implicit TLS, wrapped by service.py) listeners.
"""
from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory


class IMAPFactory(Factory):
    def __init__(self, suite: Any, implicit_tls: bool = False):
        self.suite = suite
        self.implicit_tls = implicit_tls

    def buildProtocol(self, addr: Any) -> Any:
        from mailsuite.imap.server import IMAPServer

        p = IMAPServer(self.suite, implicit_tls=self.implicit_tls)
        p.factory = self
        return p


def server_factory(suite: Any, implicit_tls: bool = False, **kwargs: Any) -> IMAPFactory:
    """The protocol factory for one IMAP listener."""
    return IMAPFactory(suite, implicit_tls)

"""IMAP4rev1 front end of the mailbox store (RFC 3501 plus the extensions clients use).

`server_factory(...)` is called by mailsuite.service for the `imap` (STARTTLS) and `imaps`
(implicit TLS, wrapped by service.py) listeners. The protocol is `server.IMAPServer`; the
module map is in docs/design/imap.md.
"""
from __future__ import annotations

from typing import Optional

from twisted.internet.interfaces import IAddress, IReactorTime

from mailsuite.config import Config
from mailsuite.directory.api import DirectoryService
from mailsuite.imap.server import IMAPServer
from mailsuite.listeners import ConnectionCounter, LimitedFactory, Refusal
from mailsuite.mailbox import MailStoreAPI
from mailsuite.metrics import Metrics
from mailsuite.notify import ChangeHub
from mailsuite.pools import WorkPool
from mailsuite.tls import TLSMaterial

# RFC 3501 §7.1.5: a BYE greeting says why the server will not serve this connection.
REFUSAL = Refusal(b"* BYE too many connections, try again later\r\n",
                  b"* BYE too many connections, try again later\r\n")


def server_factory(config: Config, directory: DirectoryService, mailstore: MailStoreAPI,
                   io: WorkPool, tls: Optional[TLSMaterial], clock: IReactorTime,
                   implicit_tls: bool = False, metrics: Optional[Metrics] = None,
                   changes: Optional[ChangeHub] = None) -> LimitedFactory:
    """The protocol factory for one IMAP listener, with its own connection limits; `metrics`
    counts logins and command durations (None: a registry of its own)."""
    metrics = metrics if metrics is not None else Metrics()
    limits = config.limits
    counter = ConnectionCounter(limits.max_connections, limits.max_connections_per_ip)

    def build(addr: IAddress) -> IMAPServer:
        return IMAPServer(config, directory, mailstore, io, tls, clock, implicit_tls=implicit_tls,
                          metrics=metrics, changes=changes)

    return LimitedFactory("imaps" if implicit_tls else "imap", counter, REFUSAL, build)

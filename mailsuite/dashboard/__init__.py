"""The admin web dashboard: the `[listen] admin` listener (docs/design/admin-web.md).

HTTPS only (service.py wraps the listener in the server's TLS context, like imaps), behind the
bounds of our HTTP listeners (mailsuite/autoconfig/web.py: connections, request size and time).
Pages are server-rendered HTML with inline SVG charts (`svg`), no script; an admin logs in with
an account of `mailsuite admin add` (`auth`); `web.AdminResource` holds every route.

What the pages show comes from the directory (domains, users), the spool (the queue, through the
CLI's own actions in mailsuite/queue/admin.py), and the `sources`: statistics, message events
and DMARC/TLS reports, each optional.
"""
from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IProtocolNegotiationFactory
from zope.interface import alsoProvides

from mailsuite.dashboard.sources import Sources


def server_factory(hostname: str, directory: Any, pools: Any, spool: Any, clock: Any,
                   sources: Sources) -> Any:
    """The listener's factory. `directory` is the running `Directory` (its store for SQL, its
    login throttle for admin passwords); `pools` the process's pools (db, io, hash)."""
    from mailsuite.autoconfig.web import http_factory
    from mailsuite.dashboard.auth import AdminLogin, Sessions
    from mailsuite.dashboard.web import AdminResource
    from mailsuite.directory.admins import AdminStore

    login = AdminLogin(AdminStore(directory.store), pools.db, pools.hash, directory.throttle,
                       clock)
    root = AdminResource(hostname, directory.store, login, Sessions(clock), spool, pools.db,
                         pools.io, pools.hash, clock, sources)
    factory = http_factory("admin", root, clock)
    # Browsers offer ALPN (h2, http/1.1). Twisted's TLS answers an offer that overlaps nothing
    # it knows with an "internal error" alert, so the factory TLS wraps names what we speak.
    alsoProvides(factory, IProtocolNegotiationFactory)
    factory.acceptableProtocols = lambda: [b"http/1.1"]
    return factory

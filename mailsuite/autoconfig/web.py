"""The HTTP listener mail clients ask for their settings (twisted.web).

Routes (paths are matched case-insensitively: Outlook spells Autodiscover both ways):
  GET  /.well-known/autoconfig/mail/config-v1.1.xml?emailaddress=A   Mozilla autoconfig, as
  GET  /mail/config-v1.1.xml?emailaddress=A                          fetched from the domain or
                                                                     from autoconfig.<domain>
  POST /autodiscover/autodiscover.xml                                Outlook POX Autodiscover
  GET  /apple/mailsuite.mobileconfig?emailaddress=A                  iOS / macOS Mail profile
  GET  /.well-known/mta-sts.txt      (Host: mta-sts.<domain>)        RFC 8461 policy, if enabled
  GET  /                                                             a page linking the above

Only hosted domains are answered (404 otherwise, so the listener does not tell strangers which
addresses exist beyond what DNS already says); a malformed request gets 400 and a log line.

The listener faces the internet before anyone logs in (there is no login at all), so everything
a client can make it hold is bounded (docs/design/autoconfig.md): connections per listener and
per client through mailsuite.listeners.LimitedFactory, the time to send a whole request, the
request line, the number and size of headers, the body, and one request at a time.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote, urlsplit

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from mailsuite.autoconfig import documents
from mailsuite.autoconfig.records import mta_sts_policy
from mailsuite.autoconfig.settings import client_servers, parse_address, valid_domain
from mailsuite.config import Config
from mailsuite.directory.api import DirectoryService
from mailsuite.listeners import (ConnectionCounter, LimitedFactory, Refusal, client_address,
                                 client_ip)

log = Logger()

# docs/design/autoconfig.md, "Limits": what one connection may make the listener hold.
MAX_BODY = 64 * 1024  # an Autodiscover request is a few hundred bytes
MAX_DROPPED_BODY = 4 * MAX_BODY  # body octets skipped after MAX_BODY before we hang up with 413
REQUEST_TIMEOUT = 10  # seconds to send a whole request (line, headers, body); also keep-alive idle
MAX_LINE = 4096  # the request line and each header line
MAX_HEADERS = 40
MAX_HEADER_BYTES = 8192  # the request line and all headers together
# A client asks for one document and leaves: a handful of connections per client is plenty, and
# the listener's share stays small whatever [limits] allows the mail listeners.
MAX_CONNECTIONS = 128
MAX_CONNECTIONS_PER_IP = 8

_UNAVAILABLE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                b"Retry-After: 60\r\nConnection: close\r\n\r\n")
_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_TOO_LARGE = (b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n"
              b"Connection: close\r\n\r\n")


@dataclass
class Reply:
    code: int
    body: bytes
    content_type: bytes = b"text/plain; charset=utf-8"
    headers: tuple[tuple[bytes, bytes], ...] = ()


class BadRequest(Exception):
    """A request we cannot answer: 400 and the reason (also logged)."""


def build_factory(config: Config, directory: DirectoryService,
                  clock: IReactorTime | None = None) -> LimitedFactory:
    """The listener's factory: the Site behind the connection limits every listener has. Over a
    limit the client gets 503 and is hung up on without its request being read."""
    limits = config.limits
    return http_factory("autoconfig", ClientConfigResource(config, directory), clock,
                        min(limits.max_connections, MAX_CONNECTIONS),
                        min(limits.max_connections_per_ip, MAX_CONNECTIONS_PER_IP))


def http_factory(name: str, root: resource.Resource, clock: IReactorTime | None = None,
                 max_connections: int = MAX_CONNECTIONS,
                 max_per_ip: int = MAX_CONNECTIONS_PER_IP) -> LimitedFactory:
    """Listener `name` serving `root` with this module's bounds (also the metrics listener)."""
    site = build_site(root, clock)
    site.listener = name  # type: ignore[attr-defined]  # for _Channel's log lines

    def build(addr: Any) -> _Connection:
        return _Connection(site, addr)

    return _SiteFactory(site, name, ConnectionCounter(max_connections, max_per_ip),
                        Refusal(_UNAVAILABLE, _UNAVAILABLE), build)


def build_site(root: resource.Resource, clock: IReactorTime | None = None) -> server.Site:
    # No twisted.web idle timer: _Channel's request deadline covers idle connections too.
    site = server.Site(root, timeout=None, reactor=clock)
    # HTTP/1.x only, with our limits (no HTTP/2 negotiation).
    site.protocol = _Channel  # type: ignore[assignment,method-assign]
    site.requestFactory = _LimitedRequest
    site.displayTracebacks = False  # errors are logged; clients get a plain status line
    site.noisy = False
    return site


class _SiteFactory(LimitedFactory):
    """LimitedFactory for the Site: the Site's access log starts and stops with the port."""

    def __init__(self, site: server.Site, *args: Any):
        super().__init__(*args)
        self.site = site

    def startFactory(self) -> None:
        self.site.doStart()

    def stopFactory(self) -> None:
        self.site.doStop()


class _Connection(protocol.Protocol):
    """What LimitedFactory counts and gives the listener hooks to: it hands the bytes to the
    Site's HTTP channel, which writes to the transport itself."""

    on_close: Any = None

    def __init__(self, site: server.Site, addr: Any):
        self.channel: _Channel = site.buildProtocol(addr)
        self.channel.connection = self

    # The hooks LimitedFactory replaces (mailsuite/listeners.py); no-ops for a bare connection.
    def on_progress(self) -> None:
        pass

    def on_authenticated(self) -> None:
        pass

    def connectionMade(self) -> None:
        self.channel.makeConnection(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        try:
            self.channel.connectionLost(reason)
        finally:
            self.channel.connection = None
            on_close, self.on_close = self.on_close, None
            if on_close is not None:
                on_close()


class _Channel(http.HTTPChannel):
    """HTTPChannel with small bounds and a deadline for each request.

    twisted.web already answers 400 and hangs up over MAX_LENGTH, maxHeaders and
    totalHeadersSize, and stops reading once 16 KiB wait behind the request being answered (one
    request in flight). Its idle timeout restarts with every byte, which a slowloris client
    feeds one byte at a time: the deadline here does not."""

    MAX_LENGTH = MAX_LINE
    maxHeaders = MAX_HEADERS
    totalHeadersSize = MAX_HEADER_BYTES
    connection: _Connection | None = None
    _deadline: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm()

    def allContentReceived(self) -> None:
        self._disarm()
        super().allContentReceived()

    def requestDone(self, request: server.Request) -> None:
        # Armed before the buffered next request is replayed, which may complete it at once.
        self._arm()
        super().requestDone(request)
        if self.connection is not None:
            self.connection.on_progress()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._disarm()
        super().connectionLost(reason)

    def lineLengthExceeded(self, line: bytes) -> None:
        # LineReceiver would hang up without a word; say 400 like the other head limits.
        log.info("{listener}: {client} sent a request line or header over {n} octets",
                 listener=_listener(self), client=_peer(self), n=MAX_LINE)
        self._respondToBadRequestAndDisconnect()

    def refuse_body(self) -> None:
        log.info("{listener}: {client} sent a body of more than {n} octets: closing",
                 listener=_listener(self), client=_peer(self), n=MAX_BODY + MAX_DROPPED_BODY)
        self._disarm()
        self.transport.write(_TOO_LARGE)
        self.transport.loseConnection()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.callLater(REQUEST_TIMEOUT, self._too_slow)

    def _disarm(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _too_slow(self) -> None:
        self._deadline = None
        log.info("{listener}: {client} sent no complete request within {n} s: closing",
                 listener=_listener(self), client=_peer(self), n=REQUEST_TIMEOUT)
        self.transport.write(_TIMEOUT)
        self.transport.loseConnection()


class _LimitedRequest(server.Request):
    """Drops request bodies beyond MAX_BODY instead of spooling them to disk (413 later); a
    client that goes on sending well beyond is hung up on."""

    too_large = False
    _dropped = 0

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large or self.content.tell() + len(data) > MAX_BODY:
            self.too_large = True
            self._dropped += len(data)
            if self._dropped > MAX_DROPPED_BODY and isinstance(self.channel, _Channel):
                self.channel.refuse_body()
            return
        super().handleContentChunk(data)


class ClientConfigResource(resource.Resource):
    isLeaf = True

    def __init__(self, config: Config, directory: DirectoryService):
        super().__init__()
        self.config = config
        self.directory = directory
        self.routes: dict[str, tuple[bytes, Callable[[server.Request], Any]]] = {
            "/.well-known/autoconfig/mail/config-v1.1.xml": (b"GET", self.mozilla),
            "/mail/config-v1.1.xml": (b"GET", self.mozilla),
            "/autodiscover/autodiscover.xml": (b"POST", self.autodiscover),
            "/apple/mailsuite.mobileconfig": (b"GET", self.mobileconfig),
            "/.well-known/mta-sts.txt": (b"GET", self.mta_sts),
            "/": (b"GET", self.index),
        }

    def render(self, request: server.Request) -> int:
        path = _target(request)[0]
        method = b"GET" if request.method == b"HEAD" else request.method
        route = self.routes.get(path)
        if route is None:
            d = defer.succeed(Reply(http.NOT_FOUND, b"not found\n"))
        elif route[0] != method:
            d = defer.succeed(Reply(http.NOT_ALLOWED, b"method not allowed\n",
                                    headers=((b"Allow", route[0]),)))
        elif getattr(request, "too_large", False):
            d = defer.succeed(Reply(http.REQUEST_ENTITY_TOO_LARGE, b"request too large\n"))
        else:
            d = defer.maybeDeferred(route[1], request)
        finished: list[bool] = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))
        d.addErrback(self._failed, request)
        d.addCallback(self._respond, request, finished)
        d.addErrback(lambda failure: log.failure("autoconfig: could not send the answer",
                                                 failure))
        return server.NOT_DONE_YET

    # -- documents -------------------------------------------------------------------------
    @defer.inlineCallbacks
    def mozilla(self, request: server.Request):
        value = _arg(request, b"emailaddress")
        if value is not None:
            parsed = parse_address(value)
            if parsed is None:
                raise BadRequest("emailaddress is not a mail address")
            domain = parsed[1]
        else:
            # Without the parameter, the host name says which domain: autoconfig.<domain>.
            host = _host(request)
            if not host.startswith("autoconfig."):
                raise BadRequest("emailaddress is missing")
            domain = valid_domain(host[len("autoconfig."):])
            if domain is None:
                raise BadRequest("Host is not autoconfig.<domain>")
        if not (yield self._hosted(domain)):
            return Reply(http.NOT_FOUND, b"not a domain of this server\n")
        body = documents.mozilla_autoconfig(client_servers(self.config), domain)
        log.info("autoconfig: sent config-v1.1.xml for {domain} to {client}", domain=domain,
                 client=_client(request))
        return Reply(http.OK, body, b"application/xml; charset=utf-8")

    @defer.inlineCallbacks
    def autodiscover(self, request: server.Request):
        body = request.content.read(MAX_BODY + 1)
        value = documents.autodiscover_request_address(body)
        if value is None:
            raise BadRequest("not an Autodiscover request with an EMailAddress")
        parsed = parse_address(value)
        if parsed is None:
            raise BadRequest("EMailAddress is not a mail address")
        address, domain = parsed
        if not (yield self._hosted(domain)):
            return Reply(http.NOT_FOUND, b"not a domain of this server\n")
        document = documents.autodiscover_response(client_servers(self.config), address)
        log.info("autoconfig: sent Autodiscover settings for {address} to {client}",
                 address=address, client=_client(request))
        return Reply(http.OK, document, b"application/xml; charset=utf-8")

    @defer.inlineCallbacks
    def mobileconfig(self, request: server.Request):
        parsed = parse_address(_arg(request, b"emailaddress") or "")
        if parsed is None:
            raise BadRequest("emailaddress is missing or not a mail address")
        address, domain = parsed
        if not (yield self._hosted(domain)):
            return Reply(http.NOT_FOUND, b"not a domain of this server\n")
        config = self.config
        profile = documents.apple_mobileconfig(client_servers(config), address, config.hostname)
        if profile is None:
            return Reply(http.NOT_FOUND, b"no IMAP/POP3 and submission listeners are configured\n")
        filename = quote(f"{address}.mobileconfig", safe="@.")
        log.info("autoconfig: sent Apple profile for {address} to {client}", address=address,
                 client=_client(request))
        return Reply(http.OK, profile, documents.MOBILECONFIG_CONTENT_TYPE,
                     headers=((b"Content-Disposition",
                               f'attachment; filename="{filename}"'.encode("ascii")),))

    @defer.inlineCallbacks
    def mta_sts(self, request: server.Request):
        # RFC 8461 §3.2: the policy lives at https://mta-sts.<domain>/.well-known/mta-sts.txt.
        host = _host(request)
        domain = valid_domain(host[len("mta-sts."):]) if host.startswith("mta-sts.") else None
        policy = mta_sts_policy(self.config)
        if domain is None or policy is None or not (yield self._hosted(domain)):
            return Reply(http.NOT_FOUND, b"not found\n")
        return Reply(http.OK, policy.encode("ascii"))

    def index(self, request: server.Request) -> Reply:
        hostname = html.escape(self.config.hostname)
        page = _INDEX.format(hostname=hostname).encode("utf-8")
        return Reply(http.OK, page, b"text/html; charset=utf-8")

    # -- plumbing --------------------------------------------------------------------------
    def _hosted(self, domain: str) -> defer.Deferred:
        return defer.maybeDeferred(self.directory.is_hosted, domain)

    def _failed(self, failure: Any, request: server.Request) -> Reply:
        if failure.check(BadRequest):
            log.info("autoconfig: 400 for {method} {path} from {client}: {reason}",
                     method=request.method.decode("latin-1"), path=request.path.decode("latin-1"),
                     client=_client(request), reason=str(failure.value))
            return Reply(http.BAD_REQUEST, f"bad request: {failure.value}\n".encode("utf-8"))
        log.failure("autoconfig: error answering {path}", failure,
                    path=request.path.decode("latin-1"))
        return Reply(http.SERVICE_UNAVAILABLE, b"temporarily unavailable\n")

    def _respond(self, reply: Reply, request: server.Request, finished: list[bool]) -> None:
        if finished:
            return  # the client went away while we asked the directory
        request.setResponseCode(reply.code)
        request.setHeader(b"Content-Type", reply.content_type)
        request.setHeader(b"Content-Length", str(len(reply.body)).encode("ascii"))
        # Settings may change with the configuration: let clients fetch them fresh each time.
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        for name, value in reply.headers:
            request.setHeader(name, value)
        request.write(reply.body)
        request.finish()


def _arg(request: server.Request, name: bytes) -> str | None:
    values = request.args.get(name)
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{name.decode()} is not UTF-8")


def _target(request: server.Request) -> tuple[str, str | None]:
    """(lower-case path, host from the request line or None).

    RFC 9112 §3.2.2: a server must accept the absolute form ("GET http://autoconfig.example.org/
    mail/config-v1.1.xml"), which is what arrives through an HTTP proxy; the host in it wins over
    the Host header.
    """
    raw = request.path.decode("latin-1")
    if raw[:7].lower() == "http://" or raw[:8].lower() == "https://":
        parts = urlsplit(raw)
        return (parts.path or "/").lower(), (parts.hostname or "")
    return raw.lower(), None


def _host(request: server.Request) -> str:
    host = _target(request)[1]
    if host is not None:
        return host.lower().rstrip(".")
    raw = request.getRequestHostname()
    try:
        return raw.decode("ascii").lower().rstrip(".")
    except UnicodeDecodeError:
        return ""


def _peer(channel: http.HTTPChannel) -> str:
    transport = channel.transport
    return client_ip(transport) if transport is not None else "?"


def _listener(channel: http.HTTPChannel) -> str:
    return getattr(getattr(channel, "site", None), "listener", "http")


def _client(request: server.Request) -> str:
    # The channel's transport's getPeer(): on a PROXY listener, the declared client.
    return client_address(request.getClientAddress())


_INDEX = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Mail settings for {hostname}</title></head>
<body>
<h1>Mail settings for {hostname}</h1>
<p>Thunderbird and Outlook find their settings here by themselves: type your address and password
into the account setup.</p>
<form action="/apple/mailsuite.mobileconfig" method="get">
<p>iPhone, iPad and Mac Mail: download a configuration profile for
<input type="email" name="emailaddress" required placeholder="you@example.org">
<button type="submit">Download</button></p>
</form>
</body></html>
"""

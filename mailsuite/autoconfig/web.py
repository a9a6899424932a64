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
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote, urlsplit

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http, resource, server

from mailsuite.autoconfig import documents
from mailsuite.autoconfig.records import mta_sts_policy
from mailsuite.autoconfig.settings import client_servers, parse_address, valid_domain
from mailsuite.config import Config
from mailsuite.directory.api import DirectoryService

log = Logger()

MAX_BODY = 64 * 1024  # an Autodiscover request is a few hundred bytes
REQUEST_TIMEOUT = 60  # seconds of silence before the connection is dropped


@dataclass
class Reply:
    code: int
    body: bytes
    content_type: bytes = b"text/plain; charset=utf-8"
    headers: tuple[tuple[bytes, bytes], ...] = ()


class BadRequest(Exception):
    """A request we cannot answer: 400 and the reason (also logged)."""


def build_site(config: Config, directory: DirectoryService) -> server.Site:
    site = server.Site(ClientConfigResource(config, directory), timeout=REQUEST_TIMEOUT)
    site.requestFactory = _LimitedRequest
    site.displayTracebacks = False  # errors are logged; clients get a plain status line
    site.noisy = False
    return site


class _LimitedRequest(server.Request):
    """Drops request bodies beyond MAX_BODY instead of spooling them to disk (413 later)."""

    too_large = False

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large or self.content.tell() + len(data) > MAX_BODY:
            self.too_large = True
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


def _client(request: server.Request) -> str:
    peer = request.getClientAddress()
    return getattr(peer, "host", str(peer))


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

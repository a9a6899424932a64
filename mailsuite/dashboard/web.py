"""`AdminResource`: every route of the admin dashboard (docs/design/admin-web.md, "Routes").

Only GET and POST /login answer without a session. Any other request without a live session
gets 302 to /login (GET, HEAD) or 401 (anything else), whether its path exists or not: nothing
about the dashboard is visible before login. With a session, every request first re-checks that
the admin still exists with the same password (db pool), and every POST must carry the
session's CSRF token; actions are POST only, answered with 303 to the page to show next.

Blocking work never runs here: SQL in the db pool, spool reads and queue actions in the io pool,
password hashing in the hash pool.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote, unquote

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from mailsuite.admin.cli import CommandError
from mailsuite.admin.trace_cmd import matching
from mailsuite.dashboard import pages
from mailsuite.dashboard.auth import AdminLogin, Session, Sessions, tokens_equal
from mailsuite.dashboard.sources import (DELIVERED, HOUR, RECEIVED, REJECTED, SENT_LABELS,
                                         Sources, StatsSource)
from mailsuite.directory.admins import hash_new_password
from mailsuite.directory.records import DirectoryError, DirectoryUnavailable
from mailsuite.directory.store import MAX_PASSWORD
from mailsuite.listeners import client_ip
from mailsuite.queue import admin as queue_actions
from mailsuite.queue.admin import QueueActionError
from mailsuite.queue.spool import Spool, SpoolError, valid_queue_id

log = Logger()

SESSION_COOKIE = b"__Host-mailsuite-admin"  # __Host-: Secure, Path=/, no Domain (RFC 6265bis)
LOGIN_COOKIE = b"__Host-mailsuite-login"  # the login form's CSRF token (double submit)
LOGIN_FORM_AGE = 1800  # seconds a login form stays usable
# What one request may carry (the body itself is bounded by the HTTP listener: 64 KiB).
MAX_FIELDS = 16
MAX_FIELD = 2048  # octets of one field's value (a password is at most MAX_PASSWORD)
MAX_QUERY = 400  # characters of a trace search
QUEUE_PAGE_ROWS = 500  # entries listed on the queue page
TRACE_LIMIT = 50  # messages one trace shows
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{43}$")  # secrets.token_urlsafe(32)
# Headers of every answer: nothing is cached, framed, scripted or fetched from elsewhere.
SECURITY_HEADERS = (
    (b"Cache-Control", b"no-store"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Frame-Options", b"DENY"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"Content-Security-Policy", b"default-src 'none'; style-src 'unsafe-inline'; "
                                 b"img-src 'self'; form-action 'self'; frame-ancestors 'none'"),
)


@dataclass(frozen=True)
class Route:
    method: bytes
    template: str  # "/queue/{id}/{action}": {name} matches one path segment

    @property
    def pattern(self) -> re.Pattern:
        return re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)",
                                       re.escape(self.template)) + "$")


@dataclass
class Reply:
    code: int
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()


class BadForm(Exception):
    """A request whose fields we refuse (too many, too long, not UTF-8): 400."""


class AdminResource(resource.Resource):
    isLeaf = True

    # Every route behind the login, and the name of the method answering it.
    ROUTES: tuple[tuple[Route, str], ...] = (
        (Route(b"GET", "/"), "home"),
        (Route(b"GET", "/overview"), "overview"),
        (Route(b"GET", "/queue"), "queue"),
        (Route(b"GET", "/queue/{id}"), "queue_entry"),
        (Route(b"POST", "/queue/{id}/{action}"), "queue_action"),
        (Route(b"GET", "/domains"), "domains"),
        (Route(b"POST", "/domains/add"), "domain_add"),
        (Route(b"GET", "/users"), "users"),
        (Route(b"POST", "/users/add"), "user_add"),
        (Route(b"POST", "/users/enable"), "user_enable"),
        (Route(b"POST", "/users/disable"), "user_disable"),
        (Route(b"POST", "/users/password"), "user_password"),
        (Route(b"GET", "/trace"), "trace"),
        (Route(b"GET", "/reports"), "reports"),
        (Route(b"POST", "/logout"), "logout"),
    )

    def __init__(self, hostname: str, store: Any, login: AdminLogin, sessions: Sessions,
                 spool: Spool, db: Any, io: Any, hashing: Any, clock: IReactorTime,
                 sources: Sources):
        super().__init__()
        self.hostname = hostname
        self.store = store  # DirectoryStore: domains and users (db pool only)
        self.login_check = login
        self.sessions = sessions
        self.spool = spool
        self.db, self.io, self.hashing = db, io, hashing
        self.clock = clock
        self.sources = sources
        self._routes = [(route.method, route.pattern, getattr(self, name))
                        for route, name in self.ROUTES]

    # -- dispatch ---------------------------------------------------------------------------
    def render(self, request: server.Request) -> Any:
        finished: list[bool] = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))
        d = defer.maybeDeferred(self._dispatch, request)
        d.addErrback(self._failed, request)
        d.addCallback(self._respond, request, finished)
        d.addErrback(lambda f: log.failure("admin: could not send the answer", f))
        return server.NOT_DONE_YET

    @defer.inlineCallbacks
    def _dispatch(self, request: server.Request) -> Any:
        method = b"GET" if request.method == b"HEAD" else request.method
        path = request.path.decode("latin-1")
        if getattr(request, "too_large", False):
            return Reply(http.REQUEST_ENTITY_TOO_LARGE, b"request too large\n")
        if path == "/login":
            if method == b"GET":
                return self.login_page(request)
            if method == b"POST":
                return (yield self.login(request))
            return Reply(http.NOT_ALLOWED, b"", ((b"Allow", b"GET, POST"),))
        session = self.sessions.get(_cookie(request, SESSION_COOKIE))
        if session is not None and not (yield self.login_check.still_valid(session)):
            log.info("admin: session of {admin} ended: the account or its password changed",
                     admin=session.admin)
            self.sessions.end(session.token)
            session = None
        if session is None:
            if method == b"GET":
                return _redirect("/login", http.FOUND)
            return Reply(http.UNAUTHORIZED, b"log in first\n")
        allowed = []
        for route_method, pattern, handler in self._routes:
            match = pattern.match(path)
            if match is None:
                continue
            if route_method != method:
                allowed.append(route_method)
                continue
            if method == b"POST" and not tokens_equal(session.csrf, _field(request, "csrf")):
                log.info("admin: POST {path} by {admin} from {client} without the session's "
                         "CSRF token: refused", path=path[:200], admin=session.admin,
                         client=_client(request))
                return Reply(http.FORBIDDEN, b"missing or wrong CSRF token\n")
            params = {k: unquote(v) for k, v in match.groupdict().items()}
            return (yield defer.maybeDeferred(handler, request, session, **params))
        if allowed:
            return Reply(http.NOT_ALLOWED, b"", ((b"Allow", b", ".join(allowed)),))
        return self._page(session, "Not found", "<p>No such page.</p>", http.NOT_FOUND)

    def _failed(self, failure: Failure, request: server.Request) -> Reply:
        if failure.check(BadForm):
            return Reply(http.BAD_REQUEST, f"bad request: {failure.value}\n".encode())
        if failure.check(DirectoryUnavailable):
            return Reply(http.SERVICE_UNAVAILABLE, b"the database is unavailable; try again\n",
                         ((b"Retry-After", b"10"),))
        log.failure("admin: error answering {path}", failure,
                    path=request.path.decode("latin-1")[:200])
        return Reply(http.INTERNAL_SERVER_ERROR, b"internal error (logged)\n")

    def _respond(self, reply: Reply, request: server.Request, finished: list[bool]) -> None:
        if finished:
            return  # the client went away while we worked
        request.setResponseCode(reply.code)
        html_page = reply.body.startswith(b"<!DOCTYPE")
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8" if html_page
                          else b"text/plain; charset=utf-8")
        request.setHeader(b"Content-Length", str(len(reply.body)).encode("ascii"))
        for name, value in SECURITY_HEADERS:
            request.setHeader(name, value)
        for name, value in reply.headers:
            request.responseHeaders.addRawHeader(name, value)
        if request.method != b"HEAD":
            request.write(reply.body)
        request.finish()

    def _page(self, session: Session | None, title: str, body: str,
              code: int = http.OK) -> Reply:
        frame = pages.Frame(self.hostname)
        if session is not None:
            frame = pages.Frame(self.hostname, session.admin, session.csrf, session.notice)
            session.notice = ""
        return Reply(code, pages.page(frame, title, body))

    def _done(self, session: Session, notice: str, location: str) -> Reply:
        session.notice = notice
        return _redirect(location)

    # -- login and logout -------------------------------------------------------------------
    def login_page(self, request: server.Request, failed: bool = False) -> Reply:
        session = self.sessions.get(_cookie(request, SESSION_COOKIE))
        if session is not None and not failed:
            return _redirect("/overview", http.FOUND)
        # The token of an earlier form stays: a browser loads /login more than once (after the
        # 302 of its /favicon.ico, say), and each form it still shows must keep working.
        token = _cookie(request, LOGIN_COOKIE) or ""
        if not _TOKEN.match(token):
            token = secrets.token_urlsafe(32)
        reply = self._page(None, "Log in", pages.login(token, failed),
                           http.UNAUTHORIZED if failed else http.OK)
        reply.headers = (_set_cookie(LOGIN_COOKIE, token, LOGIN_FORM_AGE),)
        return reply

    @defer.inlineCallbacks
    def login(self, request: server.Request) -> Any:
        fields = _fields(request)
        token = _cookie(request, LOGIN_COOKIE)
        if not token or not tokens_equal(token, fields.get("csrf")):
            return Reply(http.FORBIDDEN, b"the login form expired: load /login again\n")
        name, password = fields.get("name", ""), fields.get("password", "")
        if not name or not password or len(password.encode("utf-8")) > MAX_PASSWORD:
            return self.login_page(request, failed=True)
        try:
            admin, fingerprint = yield self.login_check.login(name, password, _client(request))
        except UnauthorizedLogin:
            return self.login_page(request, failed=True)
        session = self.sessions.create(admin, fingerprint)
        return _redirect("/overview", headers=(
            _set_cookie(SESSION_COOKIE, session.token), _set_cookie(LOGIN_COOKIE, "", 0)))

    def logout(self, request: server.Request, session: Session) -> Reply:
        self.sessions.end(session.token)
        log.info("admin: {admin} logged out", admin=session.admin)
        return _redirect("/login", headers=(_set_cookie(SESSION_COOKIE, "", 0),))

    # -- pages ------------------------------------------------------------------------------
    def home(self, request: server.Request, session: Session) -> Reply:
        return _redirect("/overview", http.FOUND)

    @defer.inlineCallbacks
    def overview(self, request: server.Request, session: Session) -> Any:
        now = self.clock.seconds()
        snapshot = yield self.io.run(queue_actions.snapshot, self.spool)
        stats = None
        if self.sources.stats is not None:
            stats = yield self.db.run(overview_figures, self.sources.stats, now)
        return self._page(session, "Overview", pages.overview(stats, snapshot, now))

    @defer.inlineCallbacks
    def queue(self, request: server.Request, session: Session) -> Any:
        snapshot = yield self.io.run(queue_actions.snapshot, self.spool)
        return self._page(session, "Queue", pages.queue(snapshot, self.clock.seconds(),
                                                        session.csrf, QUEUE_PAGE_ROWS))

    @defer.inlineCallbacks
    def queue_entry(self, request: server.Request, session: Session, id: str) -> Any:
        if not valid_queue_id(id):
            return self._page(session, "Not found", "<p>No such queue entry.</p>",
                              http.NOT_FOUND)
        entry, problem, headers = yield self.io.run(_read_entry, self.spool, id)
        if entry is None and not problem:
            return self._page(session, "Not found", "<p>No such queue entry (delivered or "
                              "deleted).</p>", http.NOT_FOUND)
        return self._page(session, f"Queue entry {id}",
                          pages.queue_entry(entry, problem, headers, self.clock.seconds(),
                                            session.csrf, id))

    @defer.inlineCallbacks
    def queue_action(self, request: server.Request, session: Session, id: str,
                     action: str) -> Any:
        act = {"retry": queue_actions.retry, "hold": queue_actions.hold,
               "release": queue_actions.release, "delete": queue_actions.delete}.get(action)
        if act is None or not valid_queue_id(id):
            return self._page(session, "Not found", "<p>No such action.</p>", http.NOT_FOUND)
        try:
            yield self.io.run(act, self.spool, id)
        except (QueueActionError, SpoolError) as e:
            return self._done(session, f"{action} {id}: {e}", "/queue")
        log.info("admin: {admin} did {action} on queue entry {id}", admin=session.admin,
                 action=action, id=id)
        done = {"retry": "due for delivery now", "hold": "held", "release": "released",
                "delete": "deleted"}[action]
        return self._done(session, f"{id}: {done}", "/queue" if action == "delete"
                          else f"/queue/{quote(id)}")

    @defer.inlineCallbacks
    def domains(self, request: server.Request, session: Session) -> Any:
        found = yield self.db.run(self.store.list_domains)
        return self._page(session, "Domains", pages.domains(found, session.csrf))

    @defer.inlineCallbacks
    def domain_add(self, request: server.Request, session: Session) -> Any:
        try:
            name = yield self.db.run(self.store.add_domain, _fields(request).get("domain", ""))
        except DirectoryUnavailable:
            raise
        except DirectoryError as e:
            return self._done(session, str(e), "/domains")
        log.info("admin: {admin} added domain {domain}", admin=session.admin, domain=name)
        return self._done(session, f"added domain {name}", "/domains")

    @defer.inlineCallbacks
    def users(self, request: server.Request, session: Session) -> Any:
        domain = _query(request, "domain")
        try:
            found = yield self.db.run(self.store.list_users, domain or None)
        except DirectoryUnavailable:
            raise
        except DirectoryError as e:
            session.notice, found = str(e), []
        return self._page(session, "Users", pages.users(found, domain, session.csrf))

    def user_add(self, request: server.Request, session: Session) -> defer.Deferred:
        fields = _fields(request)

        async def add() -> str:
            address = await self.db.run(self.store.check_new_user, fields.get("address", ""))
            hashed = await self.hashing.run(hash_new_password, fields.get("password", ""))
            return await self.db.run(self.store.add_user, address, password_hash=hashed)
        return self._user_change(session, add, "added user {}")

    def user_enable(self, request: server.Request, session: Session) -> defer.Deferred:
        address = _fields(request).get("address", "")
        return self._user_change(session, lambda: self.db.run(self.store.set_enabled, address,
                                                              True), "enabled logins of {}")

    def user_disable(self, request: server.Request, session: Session) -> defer.Deferred:
        address = _fields(request).get("address", "")
        return self._user_change(session, lambda: self.db.run(self.store.set_enabled, address,
                                                              False), "disabled logins of {}")

    def user_password(self, request: server.Request, session: Session) -> defer.Deferred:
        fields = _fields(request)

        async def reset() -> str:
            address = await self.db.run(self.store.require_user, fields.get("address", ""))
            hashed = await self.hashing.run(hash_new_password, fields.get("password", ""))
            return await self.db.run(self.store.set_password_hash, address, hashed)
        return self._user_change(session, reset, "changed the password of {}")

    def _user_change(self, session: Session, change: Callable[[], Any],
                     done: str) -> defer.Deferred:
        def changed(address: str) -> Reply:
            log.info("admin: {admin}: {what}", admin=session.admin, what=done.format(address))
            domain = address.rpartition("@")[2]
            return self._done(session, done.format(address), f"/users?domain={quote(domain)}")

        def refused(failure: Failure) -> Reply:
            failure.trap(DirectoryError)
            if failure.check(DirectoryUnavailable):
                return failure  # type: ignore[return-value]
            return self._done(session, str(failure.value), "/users")
        return defer.ensureDeferred(change()).addCallbacks(changed, refused)

    @defer.inlineCallbacks
    def trace(self, request: server.Request, session: Session) -> Any:
        query = _query(request, "q")[:MAX_QUERY]
        title = "Message trace"
        if self.sources.trace is None:
            return self._page(session, title, missing_trace())
        if not query:
            return self._page(session, title, pages.trace("", None))
        search = trace_search(query)
        if search is None:
            return self._page(session, title, pages.trace(
                query, None, "Give a queue id, a Message-ID (<...>) or an address."))
        events = yield self.db.run(_trace, self.sources.trace, search)
        return self._page(session, title, pages.trace(query, events))

    @defer.inlineCallbacks
    def reports(self, request: server.Request, session: Session) -> Any:
        title = "DMARC and TLS reports"
        if self.sources.reports is None:
            return self._page(session, title, pages.missing("DMARC and TLS-RPT reports "
                                                            "(mailsuite.reports)"))
        domain = _query(request, "domain").lower()
        hosted, dmarc, tls = yield self.db.run(_reports, self.store, self.sources.reports,
                                               domain or None)
        return self._page(session, title, pages.reports(domain, hosted, dmarc, tls))


# -- blocking work (run in a pool) -----------------------------------------------------------------
def overview_figures(stats: StatsSource, now: float) -> pages.Overview:
    """The overview's statistics: hourly for the last 24 h, daily (UTC) for 30 days, totals of
    the last 24 h. Days are sums of hour buckets, so one resolution serves both."""
    figures = pages.Overview()
    hour_start = int(now) - int(now) % 3600
    since, until = hour_start - 23 * 3600, hour_start + 3600  # the current hour included
    figures.hours = list(range(since, until, 3600))
    figures.hourly_in = [v for _, v in stats.series(RECEIVED, HOUR, since, until)]
    figures.hourly_out = _sum_labels(stats, DELIVERED, SENT_LABELS, since, until)
    day_start = int(now) - int(now) % 86400
    first_day, day_end = day_start - 29 * 86400, day_start + 86400
    figures.days = list(range(first_day, day_end, 86400))
    received = stats.series(RECEIVED, HOUR, first_day, day_end)
    sent = _sum_labels(stats, DELIVERED, SENT_LABELS, first_day, day_end)
    figures.daily_in = _per_day(figures.days, [(b, v) for b, v in received])
    figures.daily_out = _per_day(figures.days, [(b, v) for (b, _), v in zip(received, sent)])
    figures.outcomes = dict(stats.totals(DELIVERED, HOUR, since, until))
    figures.rejects = dict(stats.totals(REJECTED, HOUR, since, until))
    return figures


def _sum_labels(stats: StatsSource, metric: str, labels: tuple[str, ...], since: float,
                until: float) -> list[int]:
    sums: list[int] = []
    for label in labels:
        values = [v for _, v in stats.series(metric, HOUR, since, until, label)]
        sums = [a + b for a, b in zip(sums, values)] if sums else values
    return sums


def _per_day(days: list[int], buckets: list[tuple[int, int]]) -> list[int]:
    totals = dict.fromkeys(days, 0)
    for start, value in buckets:
        day = start - start % 86400
        if day in totals:
            totals[day] += value
    return [totals[d] for d in days]


def _read_entry(spool: Spool, queue_id: str) -> tuple[Any, str, str]:
    """(entry or None, the problem with it, its headers as text)."""
    try:
        entry, problem = spool.load(queue_id), ""
    except SpoolError as e:
        entry, problem = None, (str(e) if "damaged" in str(e) else "")
    try:
        headers = spool.read_headers(queue_id, 64 * 1024).decode("utf-8", "replace")
    except FileNotFoundError:
        headers = ""
    return entry, problem, headers.replace("\r\n", "\n")


def trace_search(query: str) -> dict[str, list[str]] | None:
    """The TraceSource.find arguments for what the admin typed (as `mailsuite trace` reads it),
    None when it is none of a queue id, a Message-ID (<...>) or an address."""
    try:
        return matching(query)
    except CommandError:
        return None


def _trace(trace: Any, search: dict[str, list[str]]) -> list[Any]:
    return list(trace.events(trace.find(limit=TRACE_LIMIT, **search)))


def _reports(store: Any, reports: Any, domain: str | None) -> tuple[list[str], Any, Any]:
    hosted = [d.name for d in store.list_domains()]
    return hosted, reports.dmarc_summary(domain), reports.tls_summary(domain)


def missing_trace() -> str:
    return pages.missing("The message trace (mailsuite.events)")


# -- requests ---------------------------------------------------------------------------------------
def _fields(request: server.Request) -> dict[str, str]:
    """The form's fields (first value of each), bounded and UTF-8, or BadForm."""
    args = request.args or {}
    if sum(len(v) for v in args.values()) > MAX_FIELDS:
        raise BadForm(f"more than {MAX_FIELDS} fields")
    fields = {}
    for name, values in args.items():
        if len(values[0]) > MAX_FIELD:
            raise BadForm("a field is too long")
        try:
            fields[name.decode("utf-8")] = values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise BadForm("a field is not UTF-8") from None
    return fields


def _field(request: server.Request, name: str) -> str | None:
    return _fields(request).get(name)


def _query(request: server.Request, name: str) -> str:
    return _fields(request).get(name, "").strip()


def _cookie(request: server.Request, name: bytes) -> str | None:
    value = request.getCookie(name)
    try:
        return value.decode("ascii") if value else None
    except UnicodeDecodeError:
        return None


def _set_cookie(name: bytes, value: str, max_age: int | None = None) -> tuple[bytes, bytes]:
    cookie = name + b"=" + value.encode("ascii") + b"; Path=/; Secure; HttpOnly; SameSite=Strict"
    if max_age is not None:
        cookie += b"; Max-Age=" + str(max_age).encode("ascii")
    return b"Set-Cookie", cookie


def _redirect(location: str, code: int = http.SEE_OTHER,
              headers: tuple[tuple[bytes, bytes], ...] = ()) -> Reply:
    return Reply(code, b"", ((b"Location", location.encode("ascii")), *headers))


def _client(request: server.Request) -> str:
    transport = request.channel.transport if request.channel is not None else None
    return client_ip(transport) if transport is not None else "?"


"""The admin dashboard in memory (docs/design/admin-web.md): every route behind the login, CSRF on
every POST, the session cookie's flags, sessions that end, the shared login throttle, the bounds
of a request, and each page over a real SQLite directory, a real spool and fake sources."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlencode

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from mailsuite import dashboard
from mailsuite.dashboard.auth import SESSION_IDLE, Sessions
from mailsuite.dashboard.sources import Sources
from mailsuite.dashboard.web import MAX_FIELDS, AdminResource, trace_search
from mailsuite.directory import DirectoryStore, passwords
from mailsuite.directory.admins import AdminStore, hash_new_password
from mailsuite.directory.throttle import LoginThrottle
from mailsuite.pools import InlinePool
from mailsuite.queue.spool import QueueEntry, Recipient, Spool, new_queue_id

PASSWORD = "admin-pw-1"
CLIENT = "192.0.2.7"
QUEUE_ID = "6543210f0a1b2cdeadbeef"  # a well-formed id of no entry


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: str

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def cookies(self) -> list[str]:
        return [v for k, v in self.headers if k.lower() == "set-cookie"]


class Dashboard:
    """The admin listener over InlinePools on a task.Clock, with one admin "root"."""

    def __init__(self, tmp_path: Any, db_url: str, sources: Sources | None = None,
                 delay: float = 1.0):
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.store = DirectoryStore(db_url)
        self.store.prepare()
        self.admins = AdminStore(self.store)
        self.admins.add("root", hash_new_password(PASSWORD))
        self.throttle = LoginThrottle(delay=delay, clock=self.clock)
        self.spool = Spool(str(tmp_path / "queue"))
        self.spool.ensure()
        pools = SimpleNamespace(db=InlinePool(), io=InlinePool(), hash=InlinePool())
        self.factory = dashboard.server_factory(
            "mx.test.example", SimpleNamespace(store=self.store, throttle=self.throttle), pools,
            self.spool, self.clock, sources or Sources())
        self.factory.doStart()
        self.cookie = ""  # the session cookie, once logged in

    def request(self, method: str, path: str, fields: dict[str, str] | None = None,
                cookie: str | None = None, raw_body: bytes | None = None) -> "Pending":
        body = raw_body if raw_body is not None else (
            urlencode(fields).encode() if fields is not None else b"")
        head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1",
                f"Content-Length: {len(body)}"]
        if fields is not None or raw_body is not None:
            head.append("Content-Type: application/x-www-form-urlencoded")
        cookie = self.cookie if cookie is None else cookie
        if cookie:
            head.append(f"Cookie: {cookie}")
        transport = StringTransport(peerAddress=IPv4Address("TCP", CLIENT, 40000),
                                    hostAddress=IPv4Address("TCP", "127.0.0.1", 8443))
        proto = self.factory.buildProtocol(transport.getPeer())
        proto.makeConnection(transport)
        proto.dataReceived(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        return Pending(proto, transport)

    def get(self, path: str, **kw: Any) -> Answer:
        return self.request("GET", path, **kw).answer()

    def post(self, path: str, fields: dict[str, str] | None = None, **kw: Any) -> Answer:
        return self.request("POST", path, fields or {}, **kw).answer()

    def login(self, name: str = "root", password: str = PASSWORD) -> "Pending":
        form = self.get("/login", cookie="")
        token = csrf_of(form.body)
        login_cookie = form.cookies()[0].split(";")[0]
        return self.request("POST", "/login", {"csrf": token, "name": name,
                                               "password": password}, cookie=login_cookie)

    def logged_in(self) -> "Dashboard":
        answer = self.login().answer()
        assert answer.status == 303, answer
        self.cookie = answer.cookies()[0].split(";")[0]
        return self

    def csrf(self) -> str:
        return csrf_of(self.get("/domains").body)


class Pending:
    def __init__(self, proto: Any, transport: StringTransport):
        self.proto, self.transport = proto, transport

    def answered(self) -> bool:
        return b"\r\n\r\n" in self.transport.value()

    def answer(self) -> Answer:
        raw = self.transport.value()
        assert raw, "no answer (yet)"
        # One request per connection, closed: the listener allows few per client.
        self.proto.connectionLost(None)
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = [tuple(line.split(": ", 1)) for line in lines[1:]]
        return Answer(int(lines[0].split()[1]), headers, body.decode("utf-8"))  # type: ignore


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def notice(page: str) -> str:
    found = re.search(r'class="notice"[^>]*>([^<]*)<', page)
    return found.group(1) if found else ""


def sample_path(template: str) -> str:
    return template.replace("{id}", QUEUE_ID).replace("{action}", "retry")


def queue_entry(spool: Spool, held: bool = False) -> QueueEntry:
    entry = QueueEntry(new_queue_id(), "alice@example.org",
                       [Recipient("bob@remote.example", "bob@remote.example", False,
                                   attempts=2, next_attempt=4_000_000_000.0,
                                   last_error="451 4.3.0 try later")],
                       created=1_800_000_000.0, held=held)
    spool.store(entry, b"Subject: hello\r\n\r\nbody\r\n")
    return entry


@pytest.fixture
def db_url(tmp_path, prepared_directory):
    return prepared_directory(f"{tmp_path}/directory.db")


@pytest.fixture
def web(tmp_path, db_url):
    return Dashboard(tmp_path, db_url)


# -- nothing without a login ------------------------------------------------------------------------
@pytest.mark.parametrize("route", [route for route, _ in AdminResource.ROUTES],
                         ids=lambda r: f"{r.method.decode()} {r.template}")
def test_every_route_requires_a_session(web, route):
    method = route.method.decode()
    path = sample_path(route.template)
    answer = web.request(method, path, {"domain": "evil.example", "csrf": "x"}
                         if method == "POST" else None, cookie="").answer()
    if method == "GET":
        assert (answer.status, answer.header("Location")) == (302, "/login")
    else:
        assert answer.status == 401
    assert "mx.test.example" not in answer.body  # not even the frame of a page
    # With a forged session cookie too.
    forged = web.request(method, path, {} if method == "POST" else None,
                         cookie="__Host-mailsuite-admin=forged").answer()
    assert forged.status == (302 if method == "GET" else 401)
    assert [d.name for d in web.store.list_domains()] == []


def test_every_route_is_in_the_table_the_login_test_iterates(web):
    # A method answering a route must be listed in ROUTES (what the test above checks); the
    # handlers are looked up from that table only, so an unlisted page cannot be reached.
    handlers = {name for _, name in AdminResource.ROUTES}
    assert handlers >= {"overview", "queue", "queue_entry", "queue_action", "domains",
                        "domain_add", "users", "user_add", "user_enable", "user_disable",
                        "user_password", "trace", "reports", "logout", "home"}


def test_unknown_paths_look_the_same_as_pages_without_a_session(web):
    assert web.get("/no/such/page", cookie="").status == 302
    assert web.post("/no/such/page", cookie="").status == 401
    web.logged_in()
    assert web.get("/no/such/page").status == 404


# -- login, cookies, sessions ---------------------------------------------------------------------
def test_session_cookie_is_secure_httponly_samesite_strict(web):
    answer = web.login().answer()
    assert (answer.status, answer.header("Location")) == (303, "/overview")
    session = answer.cookies()[0]
    assert session.startswith("__Host-mailsuite-admin=")
    flags = [f.strip() for f in session.split(";")[1:]]
    assert {"Path=/", "Secure", "HttpOnly", "SameSite=Strict"} <= set(flags)
    assert not any(f.lower().startswith(("domain=", "expires=", "max-age=")) for f in flags)
    token = session.split(";")[0].split("=", 1)[1]
    assert len(token) >= 40  # 32 random octets, base64
    login_form = web.get("/login", cookie="").cookies()[0]
    assert {"Secure", "HttpOnly", "SameSite=Strict"} <= {f.strip() for f in login_form.split(";")}


def test_pages_carry_headers_that_forbid_caching_framing_and_scripts(web):
    web.logged_in()
    answer = web.get("/overview")
    assert answer.status == 200
    assert answer.header("Cache-Control") == "no-store"
    assert answer.header("X-Frame-Options") == "DENY"
    assert "default-src 'none'" in answer.header("Content-Security-Policy")
    assert "<script" not in answer.body


def test_login_needs_the_login_forms_token(web):
    assert web.post("/login", {"name": "root", "password": PASSWORD}, cookie="").status == 403
    form = web.get("/login", cookie="")
    login_cookie = form.cookies()[0].split(";")[0]
    wrong = web.post("/login", {"csrf": "forged", "name": "root", "password": PASSWORD},
                     cookie=login_cookie)
    assert wrong.status == 403 and not wrong.cookies()


def test_a_second_load_of_the_login_page_keeps_the_first_forms_token(web):
    # Browsers load /login again behind the user's back (the 302 of /favicon.ico).
    first = web.get("/login", cookie="")
    login_cookie = first.cookies()[0].split(";")[0]
    again = web.get("/login", cookie=login_cookie)
    assert csrf_of(again.body) == csrf_of(first.body)
    answer = web.post("/login", {"csrf": csrf_of(first.body), "name": "root",
                                 "password": PASSWORD}, cookie=login_cookie)
    assert answer.status == 303
    # A made-up cookie value is not taken over.
    assert csrf_of(web.get("/login", cookie="__Host-mailsuite-login=short").body) != "short"


def test_a_wrong_password_is_held_back_by_the_shared_login_throttle(web):
    pending = web.login(password="wrong")
    assert not pending.answered()  # held back by the throttle's delay (1 s)
    web.clock.advance(1.0)
    answer = pending.answer()
    assert answer.status == 401 and "Wrong name or password" in answer.body
    assert not any(c.startswith("__Host-mailsuite-admin=") and "Max-Age" not in c
                   for c in answer.cookies())
    # Counted in the throttle every protocol shares, per source and per name.
    assert web.throttle.failures(CLIENT) == 1
    assert web.throttle.failures(CLIENT, "admin:root") == 1
    # An unknown name fails the same way, just as slowly.
    pending = web.login(name="nobody")
    assert not pending.answered()
    web.clock.advance(2.0)
    assert pending.answer().status == 401
    # The right password is answered at once and forgets this pair's failures.
    assert web.login().answer().status == 303
    assert web.throttle.failures(CLIENT, "admin:root") == 0


def test_a_mail_users_password_does_not_open_the_dashboard(web):
    web.store.add_domain("example.org")
    web.store.add_user("alice@example.org", "alice-pw-1")
    pending = web.login(name="alice@example.org", password="alice-pw-1")
    web.clock.advance(5)
    assert pending.answer().status == 401


def test_logout_ends_the_session(web):
    web.logged_in()
    answer = web.post("/logout", {"csrf": web.csrf()})
    assert (answer.status, answer.header("Location")) == (303, "/login")
    assert any("Max-Age=0" in c for c in answer.cookies())
    assert web.get("/overview").status == 302


def test_sessions_end_when_idle(web):
    web.logged_in()
    web.clock.advance(SESSION_IDLE - 1)
    assert web.get("/overview").status == 200  # activity restarts the idle time
    web.clock.advance(SESSION_IDLE - 1)
    assert web.get("/overview").status == 200
    web.clock.advance(SESSION_IDLE + 1)
    assert web.get("/overview").status == 302


def test_a_new_password_or_deletion_of_the_admin_ends_its_sessions(web):
    web.logged_in()
    web.admins.set_password_hash("root", passwords.hash_password("new-pw-2"))
    assert web.get("/overview").status == 302
    assert web.login(password="new-pw-2").answer().status == 303


def test_the_session_table_is_bounded():
    clock = task.Clock()
    sessions = Sessions(clock, max_sessions=2)
    first = sessions.create("a", "f")
    second = sessions.create("b", "f")
    assert sessions.get(first.token) is first  # used: now the most recent
    sessions.create("c", "f")
    assert len(sessions) == 2
    assert sessions.get(second.token) is None and sessions.get(first.token) is first


# -- CSRF and bounds ------------------------------------------------------------------------------
def test_a_post_without_or_with_a_wrong_csrf_token_changes_nothing(web):
    web.logged_in()
    assert web.post("/domains/add", {"domain": "a.example"}).status == 403
    assert web.post("/domains/add", {"domain": "a.example", "csrf": "x" * 43}).status == 403
    other = Dashboard.__new__(Dashboard)  # another session's token is wrong as well
    other.__dict__.update(web.__dict__)
    other.cookie = ""
    other.logged_in()
    assert web.post("/domains/add", {"domain": "a.example", "csrf": other.csrf()}).status == 403
    assert web.store.list_domains() == []
    answer = web.post("/domains/add", {"domain": "a.example", "csrf": web.csrf()})
    assert (answer.status, answer.header("Location")) == (303, "/domains")
    assert [d.name for d in web.store.list_domains()] == ["a.example"]


def test_actions_are_post_only(web):
    web.logged_in()
    answer = web.get(f"/domains/add?domain=a.example&csrf={web.csrf()}")
    assert answer.status == 405 and answer.header("Allow") == "POST"
    assert web.store.list_domains() == []


def test_too_many_fields_or_a_long_field_is_refused(web):
    web.logged_in()
    fields = {f"f{i}": "x" for i in range(MAX_FIELDS)}
    fields["csrf"] = web.csrf()
    assert web.post("/domains/add", fields).status == 400
    assert web.post("/domains/add", {"csrf": web.csrf(), "domain": "a" * 5000}).status == 400
    assert web.store.list_domains() == []


def test_a_body_over_the_limit_is_refused(web):
    web.logged_in()
    answer = web.request("POST", "/domains/add", raw_body=b"domain=" + b"a" * 70_000).answer()
    assert answer.status == 413


# -- pages and actions ----------------------------------------------------------------------------
def test_queue_page_lists_entries_with_their_actions(web):
    entry = queue_entry(web.spool)
    web.logged_in()
    page = web.get("/queue").body
    assert entry.id in page and "bob@remote.example" in page and "451 4.3.0 try later" in page
    for action in ("retry", "hold", "delete"):
        assert f'action="/queue/{entry.id}/{action}"' in page
    detail = web.get(f"/queue/{entry.id}").body
    assert "Subject: hello" in detail
    assert web.get(f"/queue/{QUEUE_ID}").status == 404
    assert web.get("/queue/..%2F..%2Fetc").status == 404


def test_queue_actions_are_the_clis(web):
    entry = queue_entry(web.spool)
    web.logged_in()
    token = web.csrf()
    assert web.post(f"/queue/{entry.id}/hold", {"csrf": token}).status == 303
    assert web.spool.load(entry.id).held
    web.post(f"/queue/{entry.id}/release", {"csrf": token})
    released = web.spool.load(entry.id)
    assert not released.held and released.recipients[0].next_attempt == 0.0
    web.spool.save(entry)  # due in the future again
    kicked = web.spool.kick_mtime()
    web.post(f"/queue/{entry.id}/retry", {"csrf": token})
    assert web.spool.load(entry.id).recipients[0].next_attempt == 0.0
    assert web.spool.kick_mtime() >= kicked
    answer = web.post(f"/queue/{entry.id}/delete", {"csrf": token})
    assert answer.header("Location") == "/queue"
    assert entry.id not in web.spool.ids()
    assert "deleted" in notice(web.get("/queue").body)
    # An entry that is gone: a notice, not an error page.
    web.post(f"/queue/{entry.id}/retry", {"csrf": token})
    assert entry.id in notice(web.get("/queue").body)
    assert web.post(f"/queue/{entry.id}/explode", {"csrf": token}).status == 404


def test_users_add_disable_enable_and_reset_password(web):
    web.store.add_domain("example.org")
    web.logged_in()
    token = web.csrf()
    answer = web.post("/users/add", {"csrf": token, "address": "Carol@example.org",
                                     "password": "carol-pw-1"})
    assert answer.header("Location") == "/users?domain=example.org"
    record = web.store.password_record("carol@example.org")
    assert record and passwords.verify_password("carol-pw-1", record[1])[0] and record[2]
    web.post("/users/disable", {"csrf": token, "address": "carol@example.org"})
    assert not web.store.get_user("carol@example.org").enabled
    web.post("/users/enable", {"csrf": token, "address": "carol@example.org"})
    assert web.store.get_user("carol@example.org").enabled
    web.post("/users/password", {"csrf": token, "address": "carol@example.org",
                                 "password": "carol-pw-2"})
    record = web.store.password_record("carol@example.org")
    assert passwords.verify_password("carol-pw-2", record[1])[0]
    page = web.get("/users?domain=example.org").body
    assert "carol@example.org" in page and "changed the password" in notice(page)
    # Refusals are notices on the page.
    web.post("/users/add", {"csrf": token, "address": "dave@elsewhere.example",
                            "password": "x-pw-1"})
    assert "unknown domain elsewhere.example" in notice(web.get("/users").body)
    web.post("/users/add", {"csrf": token, "address": "dave@example.org", "password": ""})
    assert "empty password" in notice(web.get("/users").body)
    assert web.store.get_user("dave@example.org") is None


def test_domains_page_escapes_what_it_shows(web):
    web.store.add_domain("example.org")
    web.logged_in()
    page = web.get("/domains").body
    assert 'href="/users?domain=example.org"' in page
    web.post("/domains/add", {"csrf": web.csrf(), "domain": "<b>x"})
    shown = notice(web.get("/domains").body)
    assert shown and "<b>" not in shown


@dataclass
class FakeStats:
    """A StatsSource: `counts[(metric, label)] = {bucket: value}` on hour buckets."""

    counts: dict[tuple[str, str], dict[int, int]] = field(default_factory=dict)

    def series(self, metric, resolution, since, until, label=None):
        first = int(since) - int(since) % 3600
        out = []
        for b in range(first, int(until), 3600):
            out.append((b, sum(v.get(b, 0) for (m, lbl), v in self.counts.items()
                               if m == metric and (label is None or lbl == label))))
        return out

    def totals(self, metric, resolution, since, until):
        sums: dict[str, int] = {}
        for (m, lbl), values in self.counts.items():
            if m == metric:
                sums[lbl] = sums.get(lbl, 0) + sum(v for b, v in values.items()
                                                   if since <= b < until)
        return sums


def test_overview_plots_the_statistics_as_svg(tmp_path, db_url):
    stats = FakeStats()
    web = Dashboard(tmp_path, db_url, Sources(stats=stats))
    now = int(web.clock.seconds())
    hour = now - now % 3600
    stats.counts[("received", "mx")] = {hour: 7, hour - 3600: 2, hour - 5 * 86400: 4}
    stats.counts[("delivered", "sent/local")] = {hour: 5}
    stats.counts[("delivered", "deferred/remote")] = {hour: 3}
    stats.counts[("rejected", "relay-denied")] = {hour: 9}
    queue_entry(web.spool)
    web.logged_in()
    page = web.get("/overview").body
    charts = re.findall(r"<svg .*?</svg>", page)
    assert len(charts) == 5
    hourly, daily, outcomes, rejects, queue = charts
    assert re.findall(r'class="bar s0" data-value="([\d.]+)"', hourly)[-2:] == ["2", "7"]
    assert re.findall(r'class="bar s1" data-value="([\d.]+)"', hourly)[-1] == "5"
    in_per_day = re.findall(r'class="bar s0" data-value="([\d.]+)"', daily)
    assert len(in_per_day) == 30 and sum(map(float, in_per_day)) == 13
    assert "sent/local: 5" in outcomes and "deferred/remote: 3" in outcomes
    assert "relay-denied: 9" in rejects
    assert '<b id="queue-length">1</b>' in page


def test_overview_and_other_pages_say_when_a_source_is_missing(web):
    web.logged_in()
    assert "Message statistics (mailsuite.events) not available" in web.get("/overview").body
    assert "not available" in web.get("/trace?q=a@b.example").body
    assert "not available" in web.get("/reports").body


def test_trace_shows_the_lifecycle_escaped(tmp_path, db_url):
    event = SimpleNamespace(time=1_800_000_000.5, queue_id="q1", kind="received",
                            message_id="<m1@x>", address="a@b.example",
                            fields={"client_ip": "192.0.2.1", "helo": "<script>x"})
    asked: list[dict] = []

    class Trace:
        def find(self, **kw):
            asked.append(kw)
            return ["q1"]

        def events(self, ids):
            return [event] if ids == ["q1"] else []

    web = Dashboard(tmp_path, db_url, Sources(trace=Trace())).logged_in()
    page = web.get("/trace?q=a%40b.example").body
    assert asked[-1]["addresses"] == ["a@b.example"]
    assert "received" in page and "client_ip=192.0.2.1" in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "Give a queue id" in web.get("/trace?q=hello").body


def test_trace_search_tells_queue_ids_message_ids_and_addresses_apart():
    queue_id = new_queue_id()
    assert trace_search(queue_id) == {"queue_ids": [queue_id]}
    assert trace_search("<abc@x>") == {"message_ids": ["<abc@x>"]}
    assert trace_search("a@b") == {"addresses": ["a@b"], "message_ids": ["<a@b>"]}
    assert trace_search("hello") is None and trace_search("") is None


def test_reports_per_domain(tmp_path, db_url):
    dmarc = SimpleNamespace(domain="example.org", source_ip="198.51.100.9", messages=10,
                            dmarc_pass=4, dkim_pass=4, spf_pass=3, reporters="google.com")
    tls = SimpleNamespace(domain="example.org", policy_type="sts", result_type="success",
                          sessions=12, reporters="microsoft.com")
    asked: list = []

    class Reports:
        def dmarc_summary(self, domain=None):
            asked.append(domain)
            return [dmarc]

        def tls_summary(self, domain=None):
            return [tls]

    web = Dashboard(tmp_path, db_url, Sources(reports=Reports()))
    web.store.add_domain("example.org")
    web.logged_in()
    page = web.get("/reports?domain=example.org").body
    assert asked == ["example.org"]
    assert "198.51.100.9" in page and "40 %" in page and "microsoft.com" in page
    assert 'data-value="6"' in page  # six messages of that source failed DMARC
    assert '<option value="example.org" selected>' in page

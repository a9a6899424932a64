"""The Prometheus metrics in memory (docs/design/metrics.md): each test has its own registry;
counters move on the events they count, figures read at scrape time follow the parts, label
values come from fixed sets, and the listener serves GET /metrics only."""
from __future__ import annotations

import base64
import ipaddress
import re

import prometheus_client
import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from mailsuite import maillog
from mailsuite.directory.logincache import LoginCache
from mailsuite.imap.server import IMAPServer
from mailsuite.metrics import MailLogCounter, Metrics, server_factory
from mailsuite.pools import _NO_LINE, WorkerPool
from mailsuite.smtp import replies
from mailsuite.trust import checks, clamd, rspamd
from tests.unit import imapkit, pop3kit, smtpkit
from tests.unit.manualpool import ManualPool
from tests.unit.queuekit import (FakeAgent, always, local_route, make_kit, message,
                                 remote_route, submit)

ALICE = "alice@example.org"
CAROL = "carol@remote.example"


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def label_values(registry: prometheus_client.CollectorRegistry) -> dict[str, set[str]]:
    """Every value each label takes in the registry's samples."""
    seen: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            for label, v in sample.labels.items():
                seen.setdefault(label, set()).add(v)
    return seen


@pytest.fixture
def counted():
    """A Metrics counting the mail log while the test runs."""
    metrics = Metrics()
    observer = MailLogCounter(metrics)
    observer.startService()
    yield metrics
    observer.stopService()


# -- the mail log: messages, deliveries, delays, outbound TLS ----------------------------------
def test_messages_and_deliveries_are_counted_from_the_mail_log(tmp_path, counted):
    kit = make_kit(str(tmp_path / "data"), remote=FakeAgent(always("deferred", "451 4.4.1 busy")),
                   retry_schedule=[60], max_age=3600)
    kit.runner.startService()
    try:
        data = message("counted")
        submit(kit, CAROL, [(ALICE, local_route(ALICE))], data, {"protocol": "ESMTPS"})
        kit.advance(0)
        assert value(counted, "mailsuite_messages_accepted_total", origin="smtp", tls="yes") == 1
        assert value(counted, "mailsuite_messages_accepted_bytes_total", origin="smtp") == \
            len(data)
        assert value(counted, "mailsuite_deliveries_total", kind="local", status="sent") == 1
        assert value(counted, "mailsuite_maildir_writes_total", source="delivery") == 1
        assert value(counted, "mailsuite_delivery_delay_seconds_count",
                     kind="local", status="sent") == 1

        submit(kit, CAROL, [("dan@far.example", remote_route("dan@far.example"))],
               message("far"), {"protocol": "ESMTP"})
        kit.advance(0)
        assert value(counted, "mailsuite_messages_accepted_total", origin="smtp", tls="no") == 1
        assert value(counted, "mailsuite_deliveries_total", kind="remote", status="deferred") == 1
        # Deferrals are not final: no delay yet. Past max_age the recipient bounces, and the
        # delay from acceptance to that end is observed on the clock.
        assert value(counted, "mailsuite_delivery_delay_seconds_count",
                     kind="remote", status="bounced") == 0
        kit.advance(3700, step=60)
        assert value(counted, "mailsuite_deliveries_total", kind="remote", status="bounced") == 1
        assert value(counted, "mailsuite_delivery_delay_seconds_sum",
                     kind="remote", status="bounced") >= 3600
        assert value(counted, "mailsuite_delivery_delay_seconds_bucket",
                     kind="remote", status="bounced", le="900.0") == 0
    finally:
        kit.stop()


def test_outbound_tls_is_counted_and_the_observer_leaves_with_its_service(counted):
    maillog.transaction("0123456789abcdef", "far.example", "mx.far.example", True,
                        "TLSv1.3", False, 1, 1)
    maillog.transaction("0123456789abcdef", "old.example", "mx.old.example", False, "", False,
                        1, 1)
    assert value(counted, "mailsuite_outbound_transactions_total", tls="yes") == 1
    assert value(counted, "mailsuite_outbound_transactions_total", tls="no") == 1

    later = Metrics()
    observer = MailLogCounter(later)
    observer.startService()
    observer.stopService()
    maillog.transaction("0123456789abcdef", "far.example", "mx.far.example", True, "", False,
                        1, 1)
    assert value(later, "mailsuite_outbound_transactions_total", tls="yes") == 0


# -- SMTP replies and logins -----------------------------------------------------------------
def test_smtp_replies_are_counted_by_code_class_and_reason():
    world = smtpkit.World()
    c = world.connect("mx")
    c.ehlo()
    c.send(b"MAIL FROM:<carol@remote.example>\r\n")
    assert c.code() == 250
    c.send(b"RCPT TO:<nobody@example.org>\r\n")
    assert c.code() == 550
    c.send(b"RCPT TO:<someone@elsewhere.example>\r\n")
    assert c.code() == 554
    c.send(b"XYZZY\r\n")
    assert c.code() == 500
    metrics = world.factories["mx"].metrics
    replies_total = "mailsuite_smtp_replies_total"
    assert value(metrics, replies_total, listener="mx", code_class="5xx",
                 reason="unknown_user") == 1
    assert value(metrics, replies_total, listener="mx", code_class="5xx",
                 reason="relay_denied") == 1
    assert value(metrics, replies_total, listener="mx", code_class="5xx", reason="syntax") == 1
    # Greeting, EHLO, MAIL: successes.
    assert value(metrics, replies_total, listener="mx", code_class="2xx", reason="ok") == 3


def test_trust_refusals_say_why():
    assert rspamd.SPAM.reason == "spam"
    assert clamd.interpret("stream: Eicar-Test-Signature FOUND").reply.reason == "virus"
    assert checks.dmarc_reject_reply("example.com", "fail", "fail").reason == "dmarc"
    assert replies.RELAY_DENIED.with_text("no").reason == "relay_denied"
    assert replies.RELAY_DENIED == replies.Reply(554, "5.7.1", "Relay access denied")


def _plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_logins_are_counted_per_protocol(tmp_path):
    world = smtpkit.World(limits={"auth_failure_delay": 0})
    c = world.connect("submissions")
    c.ehlo()
    c.send(f"AUTH PLAIN {_plain(ALICE, 'wrong')}\r\n".encode())
    assert c.code() == 535
    c.send(f"AUTH PLAIN {_plain(ALICE, smtpkit.PASSWORD)}\r\n".encode())
    assert c.code() == 235
    smtp = world.factories["submissions"].metrics
    assert value(smtp, "mailsuite_auth_total", protocol="smtp", outcome="failure") == 1
    assert value(smtp, "mailsuite_auth_total", protocol="smtp", outcome="success") == 1

    imap = imapkit.World(str(tmp_path / "imap"))
    good = imap.connect()
    bad = imap.connect(login_as=None)
    assert bad.cmd(b"a LOGIN alice@example.org wrong")[-1].startswith(b"a NO")
    for proto in (good.proto, bad.proto):
        assert value(proto.metrics, "mailsuite_auth_total", protocol="imap",
                     outcome="success") == (proto is good.proto)
        assert value(proto.metrics, "mailsuite_auth_total", protocol="imap",
                     outcome="failure") == (proto is bad.proto)

    pop = pop3kit.Pop3World(str(tmp_path / "pop3"), auth_failure_delay=0)
    client = pop.connect()
    assert client.line().startswith(b"+OK")
    assert client.command(f"USER {ALICE}").startswith(b"+OK")
    assert client.command("PASS wrong").startswith(b"-ERR")
    pop.login()
    pop_metrics = client.proto.metrics
    assert value(pop_metrics, "mailsuite_auth_total", protocol="pop3", outcome="failure") == 1
    assert value(pop_metrics, "mailsuite_auth_total", protocol="pop3", outcome="success") == 1


# -- IMAP command durations ------------------------------------------------------------------
def test_imap_command_duration_is_measured_on_the_clock_with_a_fixed_label_set(tmp_path):
    world = imapkit.World(str(tmp_path))
    pool = ManualPool()
    metrics = Metrics()
    proto = IMAPServer(world.config, world.directory, world.store, pool, world.tls, world.clock,
                       implicit_tls=True, metrics=metrics)
    transport = imapkit.TLSStringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
    proto.makeConnection(transport)
    proto.dataReceived(b"a LOGIN alice@example.org " + imapkit.PASSWORD.encode() + b"\r\n")
    world.clock.advance(2.5)  # the io pool is slow today
    pool.drain()
    assert b"a OK" in transport.value()
    assert value(metrics, "mailsuite_imap_command_duration_seconds_count", command="LOGIN") == 1
    assert value(metrics, "mailsuite_imap_command_duration_seconds_sum", command="LOGIN") == 2.5
    assert value(metrics, "mailsuite_imap_command_duration_seconds_bucket", command="LOGIN",
                 le="0.5") == 0
    proto.dataReceived(b"b NOOP\r\nc XYZZY\r\nd UID FETCH 1:* FLAGS\r\n")
    world.clock.advance(0)
    pool.drain()
    assert value(metrics, "mailsuite_imap_command_duration_seconds_count", command="NOOP") == 1
    commands = label_values(metrics.registry)["command"]
    assert "XYZZY" not in commands and commands <= {"LOGIN", "NOOP", "FETCH", "other"}
    metrics.imap_command(b"XYZZY", 0.1)
    metrics.imap_command(b"X-" + b"A" * 300, 0.1)
    assert value(metrics, "mailsuite_imap_command_duration_seconds_count", command="other") == 2
    proto.connectionLost(None)


# -- figures read at scrape time ----------------------------------------------------------------
def test_connections_and_sessions_per_listener_follow_the_factory(tmp_path):
    pop = pop3kit.Pop3World(str(tmp_path))
    metrics = Metrics()
    for factory in pop.factories.values():
        metrics.watch_listener(factory)
    waiting = pop.connect()
    logged_in = pop.login()
    assert value(metrics, "mailsuite_connections_total", listener="pop3s") == 2
    assert value(metrics, "mailsuite_connections_open", listener="pop3s") == 2
    assert value(metrics, "mailsuite_sessions_total", listener="pop3s") == 1
    assert value(metrics, "mailsuite_sessions_open", listener="pop3s") == 1
    assert value(metrics, "mailsuite_connections_total", listener="pop3") == 0
    logged_in.disconnect()
    waiting.disconnect()
    assert value(metrics, "mailsuite_connections_open", listener="pop3s") == 0
    assert value(metrics, "mailsuite_sessions_open", listener="pop3s") == 0
    assert value(metrics, "mailsuite_sessions_total", listener="pop3s") == 1


class FakePool:
    def __init__(self, name: str, jobs: int, queued: int, busy: int):
        self.name, self.jobs, self._queued, self._busy = name, jobs, queued, busy

    def backlog(self) -> int:
        return self._queued

    def busy(self) -> int:
        return self._busy


def test_pool_backlog_queue_and_login_cache_are_read_at_scrape_time(tmp_path):
    metrics = Metrics()
    metrics.watch_pools([FakePool("db", 7, 3, 1), FakePool("io", 40, 0, 16)])
    assert value(metrics, "mailsuite_pool_jobs_total", pool="db") == 7
    assert value(metrics, "mailsuite_pool_queued_jobs", pool="db") == 3
    assert value(metrics, "mailsuite_pool_busy_threads", pool="io") == 16

    # A pool that has not started keeps its jobs waiting: that is its backlog.
    idle = WorkerPool("hash", 2, reactor=MemoryReactorClock())
    idle._queue.put((None, lambda: None, (), {}, _NO_LINE))
    assert (idle.backlog(), idle.busy(), idle.jobs) == (1, 0, 0)
    idle.stop()

    kit = make_kit(str(tmp_path / "data"), remote=FakeAgent(always("deferred", "451 4.4.1 busy")))
    kit.runner.startService()
    try:
        metrics.watch_queue(kit.runner, kit.clock)
        assert value(metrics, "mailsuite_queue_entries") == 0
        assert value(metrics, "mailsuite_queue_oldest_entry_age_seconds") == 0
        submit(kit, CAROL, [("dan@far.example", remote_route("dan@far.example"))], message())
        kit.advance(0)
        kit.clock.advance(90)
        submit(kit, CAROL, [("eve@far.example", remote_route("eve@far.example"))], message())
        kit.advance(0)
        assert value(metrics, "mailsuite_queue_entries") == 2
        assert value(metrics, "mailsuite_queue_oldest_entry_age_seconds") == \
            pytest.approx(90, abs=1)  # queue ids hold whole seconds
    finally:
        kit.stop()

    cache = LoginCache(ttl=60, clock=task.Clock())
    metrics.watch_login_cache(cache)
    tag = cache.tag(ALICE, "pw")
    cache.hit(ALICE, tag, "$stored")
    cache.remember(ALICE, tag, "$stored")
    cache.hit(ALICE, tag, "$stored")
    assert value(metrics, "mailsuite_login_cache_hits_total") == 1
    assert value(metrics, "mailsuite_login_cache_misses_total") == 1


# -- bounded labels --------------------------------------------------------------------------
def test_no_address_or_client_input_becomes_a_label_value():
    world = smtpkit.World()
    c = world.connect("mx", ip="192.0.2.77")
    c.ehlo("client.example")
    for line in (b"MAIL FROM:<carol@remote.example>", b"RCPT TO:<nobody@example.org>",
                 b"RCPT TO:<x@192.0.2.1>", b"VRFY alice@example.org", b"FOO@BAR baz",
                 b"MAIL FROM:<bad", b"RCPT TO:<\xff@example.org>"):
        c.send(line + b"\r\n")
        c.reply()
    known = {r.reason for r in vars(replies).values() if isinstance(r, replies.Reply)}
    seen = label_values(world.factories["mx"].metrics.registry)
    assert seen["reason"] <= known | {"ok", "other"}
    assert seen["listener"] == {"mx"}
    for values in seen.values():
        for v in values:
            assert "@" not in v and not _is_ip(v) and re.fullmatch(r"[A-Za-z0-9_.+]+", v), v


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


# -- the listener --------------------------------------------------------------------------------
def _get(factory, request: bytes) -> bytes:
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 9425))
    proto = factory.buildProtocol(transport.getPeer())
    proto.makeConnection(transport)
    proto.dataReceived(request)
    return transport.value()


def test_the_listener_serves_get_metrics_and_nothing_else():
    metrics = Metrics()
    metrics.auth("imap", "success")
    factory = server_factory(metrics, task.Clock())
    factory.doStart()
    try:
        answer = _get(factory, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert b"Content-Type: text/plain; version=0.0.4" in answer
        assert b'mailsuite_auth_total{outcome="success",protocol="imap"} 1.0' in answer
        # OpenMetrics when Prometheus asks for it.
        answer = _get(factory, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n"
                               b"Accept: application/openmetrics-text; version=1.0.0\r\n\r\n")
        assert b"Content-Type: application/openmetrics-text" in answer
        assert answer.rstrip().endswith(b"# EOF")
        assert _get(factory, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 404 ")
        assert _get(factory, b"GET /metrics/x HTTP/1.1\r\nHost: x\r\n\r\n").startswith(
            b"HTTP/1.1 404 ")
        assert _get(factory, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n"
                             b"{}").startswith(b"HTTP/1.1 405 ")
    finally:
        factory.doStop()
    # Never the library's global registry.
    assert metrics.registry is not prometheus_client.REGISTRY
    assert prometheus_client.REGISTRY.get_sample_value(
        "mailsuite_auth_total", {"protocol": "imap", "outcome": "success"}) is None


def test_the_service_hands_one_registry_to_every_part(tmp_path, monkeypatch):
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from mailsuite.config import Config
    from mailsuite.service import make_service

    monkeypatch.setattr("twisted.names.client.getResolver", lambda: None)
    config = Config()
    config.server.data_dir = str(tmp_path)
    config.server.hostname = "mx.example.org"
    top = make_service(config, reactor=MemoryReactorClock())
    front = top.getServiceNamed("front")
    factories = {}
    for svc in front:
        if svc.name and svc.name.startswith("listen-"):
            f = svc.factory
            factories[svc.name[7:]] = f.wrappedFactory if isinstance(f, TLSMemoryBIOFactory) \
                else f
    registry = factories["metrics"].site.resource.registry
    assert factories["mx"].metrics.registry is registry
    assert factories["submissions"].metrics.registry is registry
    assert [s for s in front if isinstance(s, MailLogCounter)][0].metrics.registry is registry
    listeners = label_values(registry)["listener"]
    assert listeners == set(factories)


def test_counts_stay_right_when_the_children_are_kept_and_when_the_cache_is_full(monkeypatch):
    import mailsuite.metrics as metrics_module

    monkeypatch.setattr(metrics_module, "MAX_CHILDREN", 3)
    metrics = metrics_module.Metrics()
    for _ in range(2):
        for code in (220, 250, 451, 550, 999):
            metrics.smtp_reply("mx", code, "")
        metrics.message_accepted(100, "ESMTPS")
        metrics.delivery(True, "sent", 0.1)
    total = "mailsuite_smtp_replies_total"
    assert value(metrics, total, listener="mx", code_class="2xx", reason="ok") == 4
    assert value(metrics, total, listener="mx", code_class="4xx", reason="other") == 2
    assert value(metrics, total, listener="mx", code_class="5xx", reason="other") == 2
    assert value(metrics, total, listener="mx", code_class="other", reason="other") == 2
    assert value(metrics, "mailsuite_messages_accepted_total", origin="smtp", tls="yes") == 2
    assert value(metrics, "mailsuite_messages_accepted_bytes_total", origin="smtp") == 200
    assert value(metrics, "mailsuite_deliveries_total", kind="local", status="sent") == 2
    assert value(metrics, "mailsuite_maildir_writes_total", source="delivery") == 2
    assert len(metrics._children) <= 3

"""The autoconfig HTTP listener in memory: connection limits (LimitedFactory), the deadline for a
whole request, bounded request line, headers and body, one request in flight, the listener hooks
(docs/design/autoconfig.md, "Limits"); then fuzzing of the request handling with hypothesis,
replaying tests/unit/corpus/http/ first."""
from __future__ import annotations

import os
import re

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from mailsuite.autoconfig import server_factory
from mailsuite.autoconfig.web import (MAX_BODY, MAX_CONNECTIONS_PER_IP, MAX_DROPPED_BODY,
                                      MAX_HEADERS, MAX_LINE, REQUEST_TIMEOUT)
from tests.unit.smtpkit import FakeDirectory, unit_config

CORPUS = os.path.join(os.path.dirname(__file__), "corpus", "http")
MOZILLA = b"GET /mail/config-v1.1.xml?emailaddress=alice@example.org HTTP/1.1\r\nHost: x\r\n\r\n"
STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")
ALLOWED = {200, 400, 404, 405, 408, 413, 503}


class Web:
    """One autoconfig listener over a FakeDirectory answering after `latency` clock seconds."""

    def __init__(self, latency: float = 0.0, **limits):
        self.clock = task.Clock()
        self.directory = FakeDirectory(self.clock, latency=latency)
        self.factory = server_factory(unit_config(**limits), self.directory, self.clock)
        self.factory.doStart()

    def connect(self, ip: str = "127.0.0.1") -> "Conn":
        transport = StringTransport(peerAddress=IPv4Address("TCP", ip, 40000),
                                    hostAddress=IPv4Address("TCP", "127.0.0.1", 2080))
        proto = self.factory.buildProtocol(transport.getPeer())
        proto.makeConnection(transport)
        return Conn(proto, transport, self.clock)


class Conn:
    def __init__(self, proto, transport, clock):
        self.proto, self.transport, self.clock = proto, transport, clock

    def send(self, data: bytes) -> None:
        if not self.transport.disconnecting:  # a TCP transport stops reading at loseConnection
            self.proto.dataReceived(data)

    def output(self) -> bytes:
        return self.transport.value()

    def statuses(self) -> list[int]:
        # Our bodies (XML, HTML, short texts) never contain a status line.
        return [int(m.group(1)) for m in re.finditer(rb"HTTP/1\.[01] (\d{3}) ", self.output())]

    def closed(self) -> bool:
        return self.transport.disconnecting

    def lose(self) -> None:
        self.proto.connectionLost(None)


@pytest.fixture
def web():
    return Web()


def test_a_request_is_answered(web):
    c = web.connect()
    c.send(MOZILLA)
    assert c.statuses() == [200]
    assert b"<clientConfig" in c.output()


def test_connections_per_client_and_per_listener(web):
    conns = [web.connect() for _ in range(MAX_CONNECTIONS_PER_IP)]
    assert not any(c.closed() for c in conns)
    extra = web.connect()
    assert extra.output().startswith(b"HTTP/1.1 503 ") and extra.closed()
    other = web.connect("127.0.0.2")  # another client still gets in
    other.send(MOZILLA)
    assert other.statuses() == [200]
    conns[0].lose()  # a slot given back is usable again
    again = web.connect()
    again.send(MOZILLA)
    assert again.statuses() == [200]


def test_listener_total_follows_limits_when_smaller():
    web = Web(max_connections=3)
    for i in range(3):
        assert not web.connect(f"127.0.0.{i + 1}").closed()
    assert web.connect("127.0.0.9").output().startswith(b"HTTP/1.1 503 ")


def test_a_silent_connection_is_closed_at_the_deadline(web):
    c = web.connect()
    web.clock.advance(REQUEST_TIMEOUT - 0.1)
    assert not c.closed()
    web.clock.advance(0.2)
    assert c.output().startswith(b"HTTP/1.1 408 ") and c.closed()


def test_slowloris_one_byte_at_a_time_gets_no_more_time(web):
    """twisted.web's idle timeout restarts with every byte; the request deadline does not."""
    c = web.connect()
    for byte in (b"GET / HTTP/1.1\r\nHost: x\r\nX-a: " + b"a" * 100):
        if c.closed():
            break
        c.send(bytes([byte]))
        web.clock.advance(1)
    assert c.closed() and c.statuses() == [408]
    assert web.clock.seconds() <= REQUEST_TIMEOUT + 1


def test_keep_alive_idle_is_bounded_by_the_same_deadline(web):
    c = web.connect()
    web.clock.advance(REQUEST_TIMEOUT - 1)
    c.send(MOZILLA)  # just in time
    assert c.statuses() == [200] and not c.closed()
    web.clock.advance(REQUEST_TIMEOUT - 1)
    c.send(MOZILLA)
    assert c.statuses() == [200, 200] and not c.closed()
    web.clock.advance(REQUEST_TIMEOUT + 0.1)
    assert c.statuses() == [200, 200, 408] and c.closed()


def test_a_slow_directory_is_not_the_clients_fault():
    """The deadline covers receiving the request, not answering it."""
    web = Web(latency=REQUEST_TIMEOUT * 2)
    c = web.connect()
    c.send(MOZILLA)
    web.clock.advance(REQUEST_TIMEOUT * 2 + 0.1)
    assert c.statuses() == [200]


@pytest.mark.parametrize("request_bytes", [
    b"GET /" + b"a" * MAX_LINE + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nX-Long: " + b"a" * MAX_LINE + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n",
    b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(10))
    + b"\r\n",
], ids=["request-line", "header-line", "header-count", "header-bytes"])
def test_request_head_is_bounded(web, request_bytes):
    c = web.connect()
    c.send(request_bytes)
    assert c.statuses() == [400] and c.closed()


def test_a_body_beyond_the_bound_is_cut_off(web):
    c = web.connect()
    c.send(b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: x\r\n"
           b"Content-Length: 100000000\r\n\r\n")
    sent = 0
    while not c.closed():
        c.send(b"<" * 8192)
        sent += 8192
        assert sent <= MAX_BODY + MAX_DROPPED_BODY + 8192
    assert c.statuses() == [413]


def test_a_body_a_little_too_large_gets_413(web):
    c = web.connect()
    body = b"x" * (MAX_BODY + 1)
    c.send(b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: x\r\n"
           b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert c.statuses() == [413]


def test_pipelined_requests_wait_one_at_a_time():
    """One request in flight: what follows is buffered up to 16 KiB, then reading stops."""
    web = Web(latency=1.0)
    c = web.connect()
    progress = []
    c.proto.on_progress = lambda: progress.append(1)
    c.send(MOZILLA * 300)
    assert c.statuses() == []
    assert c.transport.producerState == "paused"
    web.clock.pump([1.0] * 301)
    assert c.statuses() == [200] * 300
    assert len(progress) == 300


def test_the_slot_is_given_back_once(web):
    c = web.connect()
    d = web.connect()
    assert web.factory.connections.active == {"127.0.0.1": 2}
    c.lose()
    c.lose()
    assert web.factory.connections.active == {"127.0.0.1": 1}
    d.lose()
    assert web.factory.connections.active == {}


# -- fuzzing ---------------------------------------------------------------------------------
def check(web: Web, data: bytes, chunks: int = 1) -> None:
    """Invariants: never raises, no traceback logged, every answer is a valid status line with
    a code from ALLOWED, and by the deadline every connection was answered or closed."""
    failures = []
    observer = (lambda e: failures.append(e) if "log_failure" in e else None)
    globalLogPublisher.addObserver(observer)
    try:
        c = web.connect(ip="127.0.0.1")
        size = max(1, len(data) // chunks)
        for i in range(0, len(data), size):
            c.send(data[i:i + size])
        web.clock.advance(REQUEST_TIMEOUT + 1)
        out = c.output()
        assert out, "no answer by the deadline"
        assert STATUS.match(out), out[:200]
        assert set(c.statuses()) <= ALLOWED, c.statuses()
        assert b"root:" not in out  # no XXE reached /etc/passwd
        c.lose()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not failures, failures[0].get("log_format")


def corpus() -> list[str]:
    return sorted(os.listdir(CORPUS))


@pytest.mark.parametrize("name", corpus())
def test_corpus(name):
    with open(os.path.join(CORPUS, name), "rb") as f:
        data = f.read()
    check(Web(), data)
    check(Web(), data, chunks=7)


tokens = st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"get", b"G\x00T", b""])
paths = st.one_of(
    st.sampled_from([b"/", b"/mail/config-v1.1.xml",
                     b"/.well-known/autoconfig/mail/config-v1.1.xml",
                     b"/autodiscover/autodiscover.xml", b"/Autodiscover/Autodiscover.xml",
                     b"/apple/mailsuite.mobileconfig", b"/.well-known/mta-sts.txt",
                     b"http://autoconfig.example.org/mail/config-v1.1.xml", b"*", b"//..//"]),
    st.binary(max_size=300).map(lambda b: b"/" + b.replace(b"\r", b"").replace(b"\n", b"")
                                .replace(b" ", b"%20")))
queries = st.one_of(
    st.just(b""),
    st.sampled_from([b"?emailaddress=alice@example.org", b"?emailaddress=x@not-hosted.test",
                     b"?emailaddress=%ff%fe@example.org", b"?emailaddress=a%00b@example.org",
                     b"?emailaddress=" + b"a" * 3000 + b"@example.org", b"?emailaddress",
                     b"?emailaddress=alice@example.org&emailaddress=bob@example.org"]),
    st.binary(max_size=200).map(lambda b: b"?" + b.replace(b"\r", b"").replace(b"\n", b"")
                                .replace(b" ", b"+")))
header_values = st.binary(max_size=200).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
headers = st.lists(st.tuples(st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding",
                                              b"Connection", b"Expect", b"X-Junk", b"host"]),
                             header_values), max_size=8)
XML = [
    b'<?xml version="1.0"?><Autodiscover><Request><EMailAddress>alice@example.org'
    b"</EMailAddress></Request></Autodiscover>",
    b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    b"<Autodiscover><Request><EMailAddress>&x;</EMailAddress></Request></Autodiscover>",
    b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;'
    b'&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]><Autodiscover><Request>'
    b"<EMailAddress>&c;</EMailAddress></Request></Autodiscover>",
    b"<Autodiscover>" * 5000,
    b'<?xml version="1.0" encoding="utf-16"?><a/>',
    b"<a xmlns:x='http://www.w3.org/2001/XInclude'><x:include href='/etc/passwd' parse='text'/>"
    b"</a>",
]
bodies = st.one_of(st.just(b""), st.sampled_from(XML), st.binary(max_size=2000))


@st.composite
def requests(draw) -> bytes:
    method, path, query = draw(tokens), draw(paths), draw(queries)
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"", b"HTTP/1.1 x"]))
    body = draw(bodies)
    head = [method + b" " + path + query + b" " + version]
    head += [name + b": " + value for name, value in draw(headers)]
    if draw(st.booleans()):
        head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(requests(), min_size=1, max_size=3), st.integers(1, 5))
def test_fuzz_requests(reqs, chunks):
    check(Web(), b"".join(reqs), chunks)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=3000))
def test_fuzz_raw_bytes(data):
    check(Web(), data)

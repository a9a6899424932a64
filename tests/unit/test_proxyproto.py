"""The PROXY protocol (mailsuite/proxyproto.py): the header parser, v1 and v2, and the listener
wrapper that admits trusted proxies only and serves the declared client (docs/design/limits.md,
"Behind a proxy")."""
from __future__ import annotations

import ipaddress
import struct

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Protocol, ServerFactory

from mailsuite.config import Config, ConfigError
from mailsuite.proxyproto import (HEADER_TIMEOUT, V1_MAX, V2_MAX_BODY, HeaderError,
                                  ProxyProtocolFactory, check_settings, parse_header,
                                  trusted_networks)
from tests.unit.smtpkit import Client, World

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(command: int = 1, fam: int = 0x11, block: bytes = b"", version: int = 2,
       length: int | None = None) -> bytes:
    body_len = len(block) if length is None else length
    return SIG + bytes([version << 4 | command, fam]) + struct.pack("!H", body_len) + block


def tcp4(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
            + struct.pack("!HH", sport, dport))


def tcp6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
            + struct.pack("!HH", sport, dport))


# -- version 1 -------------------------------------------------------------------------------
def test_v1_tcp4_names_the_client_and_ends_at_crlf():
    data = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\nEHLO x\r\n"
    h = parse_header(data)
    assert h.version == 1 and h.length == len(b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\n")
    assert h.source == IPv4Address("TCP", "192.0.2.7", 56324)
    assert h.destination == IPv4Address("TCP", "198.51.100.1", 25)


def test_v1_tcp6_and_an_ipv4_mapped_source():
    h = parse_header(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 993\r\n")
    assert h.source == IPv6Address("TCP", "2001:db8::7", 40000)
    h = parse_header(b"PROXY TCP6 ::ffff:192.0.2.7 ::ffff:198.51.100.1 1 2\r\n")
    assert h.source.host == "::ffff:192.0.2.7"


def test_v1_unknown_keeps_the_connections_own_address():
    assert parse_header(b"PROXY UNKNOWN\r\n").source is None
    h = parse_header(b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535\r\nrest")
    assert h.source is None and h.length == len(b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535\r\n")


def test_v1_is_incomplete_until_crlf_however_it_is_split():
    line = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\n"
    for cut in range(1, len(line)):
        assert parse_header(line[:cut]) is None, cut
    assert parse_header(line).source.host == "192.0.2.7"


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\n",  # bare LF
    b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\rX\n",  # bare CR
    b"PROXY TCP4 192.0.2.07 198.51.100.1 56324 25\r\n",  # leading zero (octal?)
    b"PROXY TCP4 2001:db8::7 198.51.100.1 56324 25\r\n",  # family mismatch
    b"PROXY TCP6 192.0.2.7 2001:db8::1 56324 25\r\n",
    b"PROXY TCP6 fe80::1%eth0 2001:db8::1 56324 25\r\n",  # zone index
    b"PROXY TCP4 192.0.2.7 198.51.100.1 056324 25\r\n",  # leading zero port
    b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 25\r\n",  # port out of range
    b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 25\r\n",
    b"PROXY TCP4  192.0.2.7 198.51.100.1 1 25\r\n",  # two spaces
    b"PROXY TCP4 192.0.2.7 198.51.100.1 1\r\n",  # a field missing
    b"PROXY UDP4 192.0.2.7 198.51.100.1 1 25\r\n",
    b"PROXY TCP4 localhost 198.51.100.1 1 25\r\n",
])
def test_v1_anything_not_exactly_the_format_is_refused(line):
    with pytest.raises(HeaderError):
        parse_header(line)


def test_v1_without_crlf_in_107_octets_is_refused():
    assert parse_header(b"PROXY UNKNOWN " + b"x" * (V1_MAX - 15)) is None  # 106: may still end
    with pytest.raises(HeaderError, match="longer than 107"):
        parse_header(b"PROXY UNKNOWN " + b"x" * (V1_MAX - 14))
    # The longest valid line (UNKNOWN with full IPv6 fields) is exactly 107 octets.
    six = ":".join(["ffff"] * 8).encode()
    longest = b"PROXY UNKNOWN " + six + b" " + six + b" 65535 65535\r\n"
    assert len(longest) == V1_MAX and parse_header(longest).length == V1_MAX


@pytest.mark.parametrize("data", [b"EHLO client.example\r\n", b"\x16\x03\x01\x02\x00",
                                  b"GET / HTTP/1.1\r\n", b"proxy TCP4", b"\r\n\r\n\x01"])
def test_garbage_is_refused_from_the_first_wrong_octet(data):
    with pytest.raises(HeaderError, match="signature"):
        parse_header(data)


# -- version 2 -------------------------------------------------------------------------------
def test_v2_tcp4_and_what_follows():
    header = v2(fam=0x11, block=tcp4("192.0.2.7", "198.51.100.1", 56324, 25))
    h = parse_header(header + b"EHLO x\r\n")
    assert h.version == 2 and h.length == len(header) == 28 and not h.local
    assert h.source == IPv4Address("TCP", "192.0.2.7", 56324)
    assert h.destination == IPv4Address("TCP", "198.51.100.1", 25)


def test_v2_tcp6():
    h = parse_header(v2(fam=0x21, block=tcp6("2001:db8::7", "2001:db8::1", 40000, 993)))
    assert h.source == IPv6Address("TCP", "2001:db8::7", 40000)
    assert h.destination == IPv6Address("TCP", "2001:db8::1", 993)


def test_v2_tlvs_after_the_addresses_are_skipped():
    tlvs = b"\x01\x00\x02h2" + b"\x04\x00\x00"  # ALPN "h2", NOOP
    header = v2(fam=0x11, block=tcp4("192.0.2.7", "198.51.100.1", 1, 25) + tlvs)
    h = parse_header(header + b"A")
    assert h.length == len(header) and h.source.host == "192.0.2.7"


def test_v2_local_keeps_the_connections_own_address_whatever_the_block_says():
    assert parse_header(v2(command=0, fam=0x00)).local
    h = parse_header(v2(command=0, fam=0x11, block=tcp4("192.0.2.7", "198.51.100.1", 1, 25)))
    assert h.local and h.source is None and h.length == 28


@pytest.mark.parametrize("fam,block", [
    (0x00, b""),  # UNSPEC
    (0x00, b"\x00" * 12),
    (0x31, b"/run/x".ljust(108, b"\x00") * 2),  # UNIX stream
    (0x12, tcp4("192.0.2.7", "198.51.100.1", 1, 25)),  # UDP: not a TCP client we can name
])
def test_v2_other_families_keep_the_connections_own_address(fam, block):
    h = parse_header(v2(fam=fam, block=block))
    assert h.source is None and not h.local and h.length == 16 + len(block)


def test_v2_is_incomplete_until_its_last_octet():
    header = v2(fam=0x21, block=tcp6("2001:db8::7", "2001:db8::1", 1, 2))
    for cut in range(1, len(header)):
        assert parse_header(header[:cut]) is None, cut
    assert parse_header(header).source.host == "2001:db8::7"


@pytest.mark.parametrize("header,why", [
    (v2(version=1, block=tcp4("192.0.2.7", "198.51.100.1", 1, 2)), "version 1"),
    (v2(command=2, block=tcp4("192.0.2.7", "198.51.100.1", 1, 2)), "command 2"),
    (v2(fam=0x41, block=tcp4("192.0.2.7", "198.51.100.1", 1, 2)), "0x41"),
    (v2(fam=0x13, block=tcp4("192.0.2.7", "198.51.100.1", 1, 2)), "0x13"),
    (v2(fam=0x11, block=b"\x00" * 8), "8 octets, 12 needed"),  # truncated address block
    (v2(fam=0x21, block=b"\x00" * 12), "12 octets, 36 needed"),
])
def test_v2_invalid_headers_are_refused(header, why):
    with pytest.raises(HeaderError, match=why):
        parse_header(header)


def test_v2_oversized_header_is_refused_before_it_is_read():
    assert parse_header(v2(length=V2_MAX_BODY)) is None  # the largest we wait for
    with pytest.raises(HeaderError, match="at most"):
        parse_header(v2(length=V2_MAX_BODY + 1))
    with pytest.raises(HeaderError, match="at most"):
        parse_header(v2(length=0xFFFF))


# -- the listener wrapper --------------------------------------------------------------------
class Recorder(Protocol):
    def __init__(self, addr):
        self.addr = addr
        self.data = b""
        self.lost = False

    def connectionMade(self):
        self.peer = self.transport.getPeer()
        self.transport.write(b"hello\r\n")

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason=None):
        self.lost = True


class RecordingFactory(ServerFactory):
    def __init__(self):
        self.built = []

    def buildProtocol(self, addr):
        p = Recorder(addr)
        self.built.append(p)
        return p


def wrapped(trusted=("10.0.0.0/8",), **kwargs):
    clock = task.Clock()
    inner = RecordingFactory()
    factory = ProxyProtocolFactory("mx", inner, trusted_networks(trusted), clock, **kwargs)
    return factory, inner, clock


def connect(factory, clock, ip="10.0.0.5"):
    return Client(factory, clock, ip)


def test_a_trusted_proxy_is_served_as_the_declared_client_only_once_the_header_is_in():
    factory, inner, clock = wrapped()
    c = connect(factory, clock)
    header = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\n"
    c.send(header[:10])
    assert inner.built == [] and c.transport.value() == b""  # nothing served, nobody admitted
    c.send(header[10:] + b"EHLO x\r\n")
    (p,) = inner.built
    assert p.addr.host == "192.0.2.7" and p.peer.host == "192.0.2.7"
    assert p.transport.getHost().port == 25
    assert p.data == b"EHLO x\r\n" and c.transport.value() == b"hello\r\n"
    c.send(b"more")
    assert p.data == b"EHLO x\r\nmore"
    c.disconnect()
    assert p.lost and factory.waiting == 0


def test_a_local_header_keeps_the_proxys_own_address():
    factory, inner, clock = wrapped()
    c = connect(factory, clock, "10.0.0.5")
    c.send(v2(command=0, fam=0x00))
    assert inner.built[0].peer.host == "10.0.0.5"


def test_a_connection_from_an_untrusted_address_is_closed_unread():
    factory, inner, clock = wrapped(trusted=("10.0.0.0/8",))
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.66", 4000)) is None
    assert factory.buildProtocol(IPv6Address("TCP", "::ffff:192.0.2.66", 4000)) is None
    assert factory.buildProtocol(IPv6Address("TCP", "::ffff:10.0.0.5", 4000)) is not None
    assert factory.refused == 2 and inner.built == []


@pytest.mark.parametrize("data", [b"EHLO client.example\r\n",
                                  b"PROXY TCP4 192.0.2.7 198.51.100.1 1 25\n",
                                  v2(length=V2_MAX_BODY + 1)])
def test_a_bad_header_closes_the_connection_and_serves_nothing(data):
    factory, inner, clock = wrapped()
    c = connect(factory, clock)
    c.send(data)
    assert c.transport.disconnecting and inner.built == [] and c.transport.value() == b""
    assert factory.waiting == 0 and factory.refused == 1


def test_a_header_that_does_not_come_in_time_closes_the_connection():
    factory, inner, clock = wrapped()
    c = connect(factory, clock)
    c.send(b"PROXY TCP4 192.0.2.7")
    clock.advance(HEADER_TIMEOUT - 0.1)
    assert not c.transport.disconnecting
    clock.advance(0.2)
    assert c.transport.disconnecting and inner.built == [] and factory.waiting == 0
    assert clock.getDelayedCalls() == []


def test_the_header_timer_is_gone_once_the_header_is_in():
    factory, inner, clock = wrapped()
    c = connect(factory, clock)
    c.send(b"PROXY UNKNOWN\r\n")
    assert clock.getDelayedCalls() == [] and inner.built


def test_connections_waiting_for_their_header_are_bounded():
    factory, inner, clock = wrapped(max_waiting=2)
    a, b = connect(factory, clock), connect(factory, clock)
    assert factory.waiting == 2
    assert factory.buildProtocol(IPv4Address("TCP", "10.0.0.5", 1)) is None
    a.send(b"PROXY UNKNOWN\r\n")
    assert factory.waiting == 1
    assert factory.buildProtocol(IPv4Address("TCP", "10.0.0.5", 1)) is not None
    b.disconnect()
    assert factory.waiting == 0


# -- through the real SMTP server and its limits ----------------------------------------------
def test_smtp_admits_counts_and_records_the_declared_client():
    world = World(limits={"max_connections_per_ip": 1})
    mx = world.factories["mx"]
    factory = ProxyProtocolFactory("mx", mx, trusted_networks(["127.0.0.0/8"]), world.clock)
    first = Client(factory, world.clock, "127.0.0.1")
    first.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n")
    first.ehlo()
    assert mx.connections.active == {"192.0.2.7": 1}  # the client is counted, not the proxy
    # Another client through the same proxy is admitted; the same client a second time is not.
    other = Client(factory, world.clock, "127.0.0.1")
    other.send(b"PROXY TCP4 192.0.2.8 127.0.0.1 40001 25\r\n")
    assert other.reply()[0].startswith(b"220 ")
    again = Client(factory, world.clock, "127.0.0.1")
    again.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 40002 25\r\n")
    assert again.reply()[0].startswith(b"421 ")
    for line in (b"MAIL FROM:<carol@remote.example>\r\n", b"RCPT TO:<alice@example.org>\r\n",
                 b"DATA\r\n"):
        first.send(line)
        assert first.code() in (250, 354)
    first.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
    assert first.code() == 250
    (queued,) = world.queue.messages
    assert queued.meta["client_ip"] == "192.0.2.7"
    assert b"([192.0.2.7])" in queued.data.split(b"\r\n\r\n")[0]


def test_starttls_works_through_the_wrapper():
    world = World()
    factory = ProxyProtocolFactory("mx", world.factories["mx"], trusted_networks(["127.0.0.1"]),
                                   world.clock)
    c = Client(factory, world.clock, "127.0.0.1")
    c.send(v2(block=tcp4("192.0.2.7", "127.0.0.1", 1, 25)))
    c.ehlo()
    c.send(b"STARTTLS\r\n")
    assert c.code() == 220 and c.transport.tls_context is not None


# -- settings --------------------------------------------------------------------------------
LISTENERS = ["mx", "submission", "imap", "imaps"]


def listen(**values):
    config = Config()
    for key, value in values.items():
        setattr(config.listen, key, value)
    return config.listen


def test_settings_that_could_not_work_stop_start_up():
    check_settings(listen(), LISTENERS)  # the default: no proxy anywhere
    check_settings(listen(proxy_protocol=["mx"], trusted_proxies=["10.0.0.5"]), LISTENERS)
    with pytest.raises(ConfigError, match="'smtp' is not a listener"):
        check_settings(listen(proxy_protocol=["smtp"], trusted_proxies=["10.0.0.5"]), LISTENERS)
    with pytest.raises(ConfigError, match="trusted_proxies is empty"):
        check_settings(listen(proxy_protocol=["mx"]), LISTENERS)
    with pytest.raises(ConfigError, match="trusted_proxies: '10.0.0.300' is not a network"):
        check_settings(listen(trusted_proxies=["10.0.0.300"]), LISTENERS)
    with pytest.raises(ConfigError, match="haproxy: endpoint"):
        check_settings(listen(mx="haproxy:tcp:25"), LISTENERS)


def test_make_service_puts_the_header_beneath_tls(tmp_path, monkeypatch):
    from twisted.internet.testing import MemoryReactorClock
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from mailsuite.listeners import LimitedFactory
    from mailsuite.service import make_service

    monkeypatch.setattr("twisted.names.client.getResolver", lambda: None)
    config = Config()
    config.server.data_dir = str(tmp_path)
    config.server.hostname = "mx.example.org"
    config.listen.proxy_protocol = ["mx", "imaps"]
    config.listen.trusted_proxies = ["10.0.0.5/32"]
    top = make_service(config, reactor=MemoryReactorClock())
    factories = {s.name[7:]: s.factory for s in top.getServiceNamed("front")
                 if s.name and s.name.startswith("listen-")}
    mx, imaps, imap = factories["mx"], factories["imaps"], factories["imap"]
    assert isinstance(mx, ProxyProtocolFactory) and isinstance(mx.wrappedFactory, LimitedFactory)
    assert isinstance(imaps, ProxyProtocolFactory)
    assert isinstance(imaps.wrappedFactory, TLSMemoryBIOFactory)
    assert isinstance(imaps.wrappedFactory.wrappedFactory, LimitedFactory)
    assert isinstance(imap, LimitedFactory)

"""The PROXY protocol (HAProxy's proxy-protocol.txt, versions 1 and 2) on listeners that enable it.

A load balancer in TCP mode (HAProxy `send-proxy` / `send-proxy-v2`) opens each connection to us
with a header that names the client it relays. On a listener named in `[listen] proxy_protocol`
(docs/design/limits.md, "Behind a proxy"):

- a connection from an address outside `[listen] trusted_proxies` is closed at accept, unread;
- from a trusted proxy, nothing is served until a complete, valid header has arrived (v1 or v2,
  told apart by their signatures); a malformed, oversized or late (`HEADER_TIMEOUT`) header
  closes the connection;
- then the listener's own factory (TLS for the implicit-TLS ports, the LimitedFactory beneath)
  builds the protocol for the declared client address: admission, fairness and everything the
  protocol reads from `transport.getPeer()` see the real client, not the proxy. A v2 LOCAL
  header (the proxy's health check), a v1 UNKNOWN one and addresses that are not TCP over IPv4
  or IPv6 keep the connection's own address (proxy-protocol.txt §2.1, §2.2).

The header comes first on the wire, before any TLS: `ProxyProtocolFactory` wraps the factory the
listener would otherwise have, TLSMemoryBIOFactory included.

Twisted's own `haproxy:` endpoint trusts every peer, builds the protocol at accept (so admission
would count the proxy) and needs a whole header in the first read; we do not use it.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from twisted.internet import address
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, providedBy

from mailsuite.config import ConfigError
from mailsuite.listeners import RateLimitedLog, client_address
from mailsuite.trust.ratelimit import Network, in_networks, parse_networks

log = Logger()

V1_SIGNATURE = b"PROXY "
V1_MAX = 107  # octets of the longest v1 line, CRLF included (proxy-protocol.txt §2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/protocol, length
# Octets after the fixed part of a v2 header we accept: the addresses (216 at most, AF_UNIX)
# and TLVs (ALPN, authority, TLS details...), which we skip. More is not a header we can use.
V2_MAX_BODY = 2048
HEADER_TIMEOUT = 10.0  # seconds from accept to a complete header; the proxy sends it at once
MAX_WAITING = 1000  # connections of one listener still waiting for their header


class HeaderError(ValueError):
    """Not a valid PROXY protocol header; the message says why, for the log."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed header. `source`/`destination` are None when the connection's own addresses
    apply (v2 LOCAL, v1 UNKNOWN, families other than TCP over IPv4/IPv6)."""

    version: int
    length: int  # octets of the header on the wire
    source: Optional[IAddress] = None
    destination: Optional[IAddress] = None
    local: bool = False  # v2 LOCAL: the proxy speaking for itself (a health check)


def parse_header(data: bytes) -> Optional[ProxyHeader]:
    """The header at the start of `data`, or None while it is incomplete; HeaderError when it
    is not one (or can no longer become one)."""
    if len(data) < len(V2_SIGNATURE) and V2_SIGNATURE.startswith(data):
        return None
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if len(data) < len(V1_SIGNATURE) and V1_SIGNATURE.startswith(data):
        return None
    if data.startswith(V1_SIGNATURE):
        return _parse_v1(data)
    raise HeaderError("no PROXY protocol signature")


def _parse_v1(data: bytes) -> Optional[ProxyHeader]:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise HeaderError(f"v1 line longer than {V1_MAX} octets")
        if b"\n" in data or (b"\r" in data[:-1]):
            raise HeaderError("v1 line not ended by CRLF")
        return None
    line = data[:end]
    fields = line.split(b" ")
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        # The sender could not tell the addresses: anything up to CRLF is ignored (§2.1).
        return ProxyHeader(version=1, length=end + 2)
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise HeaderError("v1 line is not PROXY TCP4|TCP6 <src> <dst> <sport> <dport>")
    kind = address.IPv4Address if fields[1] == b"TCP4" else address.IPv6Address
    version = 4 if fields[1] == b"TCP4" else 6
    src = _v1_address(fields[2], version)
    dst = _v1_address(fields[3], version)
    sport, dport = _v1_port(fields[4]), _v1_port(fields[5])
    return ProxyHeader(version=1, length=end + 2, source=kind("TCP", src, sport),
                       destination=kind("TCP", dst, dport))


def _v1_address(text: bytes, version: int) -> str:
    try:
        s = text.decode("ascii")
        if "%" in s:  # a zone index is not part of the format
            raise ValueError(s)
        addr = ipaddress.ip_address(s)  # also refuses leading zeros in IPv4 (Python >= 3.9.5)
    except (UnicodeDecodeError, ValueError):
        raise HeaderError(f"v1 address {text[:45]!r} is not an IPv{version} address")
    if addr.version != version:
        raise HeaderError(f"v1 address {text[:45]!r} is not an IPv{version} address")
    return _text(addr)


def _text(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address as Twisted's TCP transport writes it: IPv4-mapped IPv6 in dotted form
    (listeners.client_address then counts it as the IPv4 address)."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return f"::ffff:{addr.ipv4_mapped}"
    return str(addr)


def _v1_port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text.startswith(b"0")):
        raise HeaderError(f"v1 port {text[:8]!r} is not a decimal number without leading zeros")
    port = int(text)
    if port > 65535:
        raise HeaderError(f"v1 port {port} is out of range")
    return port


# (family, transport protocol) of the low byte -> the Twisted address class and the size of its
# address block; other valid combinations keep the connection's own addresses (§2.2).
_V2_TCP = {0x11: (address.IPv4Address, 4), 0x21: (address.IPv6Address, 16)}
_V2_BLOCK = {0x1: 12, 0x2: 36, 0x3: 216}  # by family: INET, INET6, UNIX


def _parse_v2(data: bytes) -> Optional[ProxyHeader]:
    if len(data) < V2_FIXED:
        return None
    ver_cmd, fam, body = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    if ver_cmd >> 4 != 2:
        raise HeaderError(f"v2 header of version {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command not in (0, 1):
        raise HeaderError(f"v2 header with unknown command {command}")
    if body > V2_MAX_BODY:
        raise HeaderError(f"v2 header of {V2_FIXED + body} octets (at most "
                          f"{V2_FIXED + V2_MAX_BODY} accepted)")
    if len(data) < V2_FIXED + body:
        return None
    length = V2_FIXED + body
    if command == 0:
        # LOCAL: the proxy's own connection; the protocol block is ignored, family included.
        return ProxyHeader(version=2, length=length, local=True)
    family, proto = fam >> 4, fam & 0x0F
    if family > 3 or proto > 2:
        raise HeaderError(f"v2 header with unknown family/protocol 0x{fam:02x}")
    if family in _V2_BLOCK and proto != 0 and body < _V2_BLOCK[family]:
        raise HeaderError(f"v2 address block of {body} octets, {_V2_BLOCK[family]} needed")
    if fam not in _V2_TCP:
        return ProxyHeader(version=2, length=length)  # UNSPEC, UDP or UNIX: our own addresses
    kind, size = _V2_TCP[fam]
    block = data[V2_FIXED:V2_FIXED + 2 * size + 4]
    src = _text(ipaddress.ip_address(block[:size]))
    dst = _text(ipaddress.ip_address(block[size:2 * size]))
    sport, dport = struct.unpack("!HH", block[2 * size:])
    return ProxyHeader(version=2, length=length, source=kind("TCP", src, sport),
                       destination=kind("TCP", dst, dport))


# -- the listener side ------------------------------------------------------------------------

def trusted_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """`[listen] trusted_proxies` as networks; a bad entry stops start-up with one line."""
    return parse_networks(values, "[listen] trusted_proxies")


def check_settings(listen: Any, listeners: Iterable[str]) -> None:
    """Refuse at start-up, in one line, PROXY protocol settings we could not act on."""
    known = list(listeners)
    for name in listen.proxy_protocol:
        if name not in known:
            raise ConfigError(f"[listen] proxy_protocol: {name!r} is not a listener (one of "
                              f"{', '.join(known)})")
    networks = trusted_networks(listen.trusted_proxies)
    if listen.proxy_protocol and not networks:
        raise ConfigError("[listen] proxy_protocol is set but trusted_proxies is empty: every "
                          "connection would be refused; list the proxies' addresses")
    for name in known:
        if getattr(listen, name).lstrip().lower().startswith("haproxy:"):
            raise ConfigError(f"[listen] {name}: use proxy_protocol = [{name!r}] and "
                              f"trusted_proxies instead of a haproxy: endpoint (it trusts "
                              f"every peer)")


class ProxyHeaderReceiver(ProtocolWrapper):
    """One connection on a PROXY listener: reads the header, then hands the connection to the
    protocol the wrapped factory builds for the declared client, and is its transport."""

    factory: "ProxyProtocolFactory"

    def __init__(self, factory: "ProxyProtocolFactory"):
        super().__init__(factory, None)  # type: ignore[arg-type]  # built once the header is in
        self.header: Optional[ProxyHeader] = None
        self._buffer = b""
        self._timer: Any = None
        self._waiting = False

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))  # ITLSTransport etc., for STARTTLS
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def connectionMade(self) -> None:
        self._waiting = True
        self.factory.waiting += 1
        self._timer = self.factory.clock.callLater(self.factory.header_timeout, self._late)

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if not self._waiting:
            return  # refused, closing
        self._buffer += data
        try:
            header = parse_header(self._buffer)
        except HeaderError as e:
            self._refuse(str(e))
            return
        if header is not None:
            rest, self._buffer = self._buffer[header.length:], b""
            self._done_waiting()
            self.header = header
            self._serve(rest)

    def _serve(self, rest: bytes) -> None:
        peer = self.getPeer()
        inner = self.factory.wrappedFactory.buildProtocol(peer)
        if inner is None:
            self.transport.loseConnection()
            return
        self.wrappedProtocol = inner
        inner.makeConnection(self)
        if rest and self.wrappedProtocol is not None:
            inner.dataReceived(rest)

    def _late(self) -> None:
        self._timer = None
        self._refuse(f"no complete header within {self.factory.header_timeout:.0f} s")

    def _refuse(self, why: str) -> None:
        self._done_waiting()
        self.factory.refused += 1
        self.factory.log.emit("{listener}: closed a connection from proxy {ip}: {why}",
                              listener=self.factory.name,
                              ip=client_address(self.transport.getPeer()), why=why)
        self.transport.abortConnection()

    def _done_waiting(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._waiting:
            self._waiting = False
            self.factory.waiting -= 1

    def connectionLost(self, reason: Any) -> None:
        self._done_waiting()
        self._buffer = b""
        self.factory.unregisterProtocol(self)
        inner, self.wrappedProtocol = self.wrappedProtocol, None
        if inner is not None:
            inner.connectionLost(reason)

    # -- what the protocol above sees ---------------------------------------------------------
    def getPeer(self) -> IAddress:
        if self.header is not None and self.header.source is not None:
            return self.header.source
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        if self.header is not None and self.header.destination is not None:
            return self.header.destination
        return self.transport.getHost()

    def logPrefix(self) -> str:
        return f"{self.factory.name} (PROXY)"


class ProxyProtocolFactory(WrappingFactory):
    """The factory of a PROXY listener: admits trusted proxies only and gives each connection a
    ProxyHeaderReceiver; `wrapped` (the listener's usual factory) builds the protocol once the
    header has named the client."""

    noisy = False

    def __init__(self, name: str, wrapped: Any, trusted: tuple[Network, ...], clock: Any,
                 header_timeout: float = HEADER_TIMEOUT, max_waiting: int = MAX_WAITING):
        super().__init__(wrapped)
        self.name = name
        self.trusted = trusted
        self.clock = clock
        self.header_timeout = header_timeout
        self.max_waiting = max_waiting
        self.waiting = 0  # connections whose header has not arrived yet
        self.refused = 0
        self.log = RateLimitedLog(clock, "closed (PROXY protocol)")

    def buildProtocol(self, addr: Any) -> Optional[ProxyHeaderReceiver]:  # type: ignore[override]
        ip = client_address(addr)
        why = None
        if not in_networks(ip, self.trusted):
            why = "not in [listen] trusted_proxies"
        elif self.waiting >= self.max_waiting:
            why = f"{self.max_waiting} connections already waiting for their PROXY header"
        if why is not None:
            self.refused += 1
            self.log.emit("{listener}: refused a connection from {ip}: {why}",
                          listener=self.name, ip=ip, why=why)
            return None  # Twisted closes the socket at once, unread
        return ProxyHeaderReceiver(self)

    def doStop(self) -> None:
        self.log.stop()
        super().doStop()

    def logPrefix(self) -> str:
        return f"{self.name} (PROXY)"

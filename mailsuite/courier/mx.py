"""Where mail for a domain goes: MX lookup with twisted.names (RFC 5321 §5.1, RFC 7505).

Not Twisted's MXCalculator: it crashes on equal preferences, returns one host, and maps a null MX
to '' (docs/design/courier.md). Here: MX records sorted by preference and shuffled within one
preference, each exchange resolved to its A/AAAA addresses; no MX means the domain's own address
records; NXDOMAIN and null MX are permanent, SERVFAIL and timeouts temporary.
"""
from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import cache, client, dns, error, hosts, resolve

from mailsuite.courier import status

log = Logger()

# Resolver timeouts (seconds per retry): short enough that a dead name server defers the delivery
# within a minute instead of Twisted's default 60 s per query.
RESOLVER_TIMEOUT = (1, 3, 8)


@dataclass(frozen=True)
class MailHost:
    name: str  # the exchange (or the domain for the A/AAAA fallback)
    preference: int
    addresses: tuple[str, ...]


@dataclass
class Resolution:
    hosts: list[MailHost] = field(default_factory=list)
    failure: status.Failure | None = None  # set when there is nowhere to go


def make_resolver(nameservers: list[str], reactor: Any = None) -> Any:
    """A twisted.names resolver using `nameservers` ("host:port") or the system's."""
    if not nameservers:
        # What client.createResolver() builds, but on `reactor` (its resolv.conf re-reads and
        # cache expiries are timed calls, which must not land on the global reactor).
        return resolve.ResolverChain([hosts.Resolver(file=b"/etc/hosts"),
                                      cache.CacheResolver(reactor=reactor),
                                      client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)])
    servers = []
    for ns in nameservers:
        servers.append(parse_hostport(ns, 53))
    return client.Resolver(servers=servers, timeout=RESOLVER_TIMEOUT, reactor=reactor)


class MXResolver:
    def __init__(self, resolver: Any, rng: random.Random | None = None):
        self._resolver = resolver
        self._rng = rng or random.Random()

    @defer.inlineCallbacks
    def resolve(self, domain: str) -> Any:
        """Deferred[Resolution] for a recipient domain."""
        literal = _address_literal(domain)
        if literal:
            return Resolution([MailHost(domain, 0, (literal,))])
        qname = domain.rstrip(".").encode("idna") if not domain.isascii() else domain.encode()
        try:
            answers, _, _ = yield self._resolver.lookupMailExchange(qname)
        except error.DNSNameError:
            return Resolution(failure=status.NO_SUCH_DOMAIN)
        except (error.DNSServerError, error.DNSQueryTimeoutError, defer.TimeoutError,
                error.DNSQueryRefusedError, error.DNSUnknownError, error.DNSFormatError) as e:
            log.info("MX lookup for {domain} failed temporarily: {error}", domain=domain,
                     error=type(e).__name__)
            return Resolution(failure=status.DNS_TEMPORARY)
        mx = [(a.payload.preference, str(a.payload.name)) for a in answers if a.type == dns.MX]
        if any(name in ("", ".") for _, name in mx):
            return Resolution(failure=status.NULL_MX)  # RFC 7505 §3
        if not mx:
            # RFC 5321 §5.1: no MX, so the domain itself is the implicit MX with preference 0.
            addresses = yield self._addresses(domain)
            if addresses is None:
                return Resolution(failure=status.DNS_TEMPORARY)
            if not addresses:
                return Resolution(failure=status.NO_MAIL_HOST)
            return Resolution([MailHost(domain, 0, tuple(addresses))])
        ordered = self._order(mx)
        lookups = yield defer.gatherResults([self._addresses(name) for _, name in ordered])
        hosts = [MailHost(name, pref, tuple(addrs))
                 for (pref, name), addrs in zip(ordered, lookups) if addrs]
        if not hosts:
            temporary = any(addrs is None for addrs in lookups)
            return Resolution(failure=status.DNS_TEMPORARY if temporary
                              else status.MX_HOST_UNRESOLVED)
        return Resolution(hosts)

    def _order(self, mx: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """By preference; random within one preference (RFC 5321 §5.1 load spreading)."""
        shuffled = list(dict.fromkeys(mx))  # duplicates collapsed, first occurrence kept
        self._rng.shuffle(shuffled)
        return sorted(shuffled, key=lambda item: item[0])  # sort is stable: shuffle survives

    @defer.inlineCallbacks
    def _addresses(self, name: str) -> Any:
        """Deferred[list[str] | None]: IPv4 then IPv6 addresses; None on a temporary failure."""
        qname = name.encode("idna") if not name.isascii() else name.encode()
        results = yield defer.DeferredList(
            [self._resolver.lookupAddress(qname), self._resolver.lookupIPV6Address(qname)],
            consumeErrors=True)
        addresses: list[str] = []
        temporary = False
        for ok, value in results:
            if ok:
                answers = value[0]
                for a in answers:
                    if a.type == dns.A:
                        addresses.append(a.payload.dottedQuad())
                    elif a.type == dns.AAAA:
                        addresses.append(ipaddress.ip_address(a.payload.address).compressed)
            elif not value.check(error.DNSNameError):
                temporary = True
        if not addresses and temporary:
            return None
        return list(dict.fromkeys(addresses))


def _address_literal(domain: str) -> str | None:
    """'[192.0.2.1]' or '[IPv6:2001:db8::1]' (RFC 5321 §4.1.3) -> the address."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        return ipaddress.ip_address(inner).compressed
    except ValueError:
        return None


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """"host:port", "host", "[v6]:port" or a bare IPv6 address -> (host, port)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, default_port

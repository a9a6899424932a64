"""DNS block and allow lists on the MX client's address (docs/design/trust-limits.md, "DNSBL").

Sites are written as Postfix's postscreen_dnsbl_sites: `zone[=filter][*weight]`.

- zone: the list's DNS zone, e.g. `zen.spamhaus.org`;
- filter: which A answers count, four dot-separated octet patterns, each a number, `[a..b]`
  (a range) or `[x;y;a..b]` (alternatives); several patterns separated by `;` outside the
  brackets, e.g. `127.0.0.[2..11]`, `127.0.0.2;127.0.0.4`. Without a filter any answer counts;
- weight: an integer, default 1; negative makes an allow list (its matches lower the score).

`DNSBL.check(ip)` asks every zone at once (`<reversed address>.<zone>`, A records through the
process's `DnsClient`) and adds the weights of the sites that list the address. A score of
`[dnsbl] threshold` or more gives a 554 5.7.1 reply. A zone that does not answer within
`[dnsbl] timeout`, or answers with a temporary error, counts as not listing (logged). Answers in
127.255.255.0/24 are the list refusing our query (e.g. Spamhaus's 127.255.255.254 for queries
through a public resolver), logged, never a listing. Loopback, private and other non-public
addresses are never looked up.
"""
from __future__ import annotations

import collections
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsuite.config import ConfigError, DNSBLSection
from mailsuite.smtp.replies import Reply
from mailsuite.trust.ratelimit import parse_address

from mailsuite.trust.dns import DnsTempError

log = Logger()

CACHE_TTL = 300.0  # seconds a complete result is reused for the same address
CACHE_SIZE = 10_000  # addresses remembered at most (least recently used forgotten first)
ERROR_NETWORK = ipaddress.ip_network("127.255.255.0/24")
ZONE_LOG_INTERVAL = 60.0  # one line per zone and kind of trouble in this time, at most

_ZONE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)"
                   r"(\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")
_NUMBER = re.compile(r"^[0-9]{1,3}$")


@dataclass(frozen=True)
class DnsblSite:
    zone: str
    # Each pattern: four octet sets (frozensets of allowed values); empty tuple = any answer.
    patterns: tuple[tuple[frozenset[int], ...], ...]
    weight: int
    text: str

    def matches(self, answer: ipaddress.IPv4Address) -> bool:
        if not self.patterns:
            return True
        octets = answer.packed
        return any(all(o in allowed for o, allowed in zip(octets, pattern))
                   for pattern in self.patterns)


@dataclass
class DnsblResult:
    score: int = 0
    listed_by: list[str] = field(default_factory=list)  # zones with a positive weight
    allowed_by: list[str] = field(default_factory=list)  # zones with a negative weight
    reply: Reply | None = None


# -- syntax ---------------------------------------------------------------------------------------
def parse_site(text: str) -> DnsblSite:
    """One postscreen site; ConfigError (one line) for anything else."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"[dnsbl] sites: {text!r}: {why}")

    if not isinstance(text, str) or not text.strip():
        raise bad("empty site")
    rest = text.strip()
    weight = 1
    if "*" in rest:
        rest, _, weight_text = rest.rpartition("*")
        if not re.fullmatch(r"[+-]?[0-9]{1,6}", weight_text.strip()):
            raise bad(f"the weight {weight_text!r} is not an integer")
        weight = int(weight_text)
        if weight == 0:
            raise bad("a weight of 0 has no effect")
    zone, eq, filter_text = rest.partition("=")
    zone = zone.strip().rstrip(".").lower()
    if not _ZONE.match(zone) or "." not in zone:
        raise bad(f"{zone!r} is not a DNS zone")
    patterns: tuple[tuple[frozenset[int], ...], ...] = ()
    if eq:
        if not filter_text.strip():
            raise bad("empty filter after '='")
        try:
            patterns = tuple(_parse_pattern(p)
                             for p in _split_outside_brackets(filter_text, ";"))
        except ValueError as e:
            raise bad(str(e))
    return DnsblSite(zone, patterns, weight, text.strip())


def _split_outside_brackets(text: str, separator: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for c in text:
        if c == "[":
            depth += 1
            if depth > 1:
                raise ValueError("nested '[' in the filter")
        elif c == "]":
            depth -= 1
            if depth < 0:
                raise ValueError("']' without '[' in the filter")
        if c == separator and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += c
    if depth:
        raise ValueError("'[' without ']' in the filter")
    parts.append(current)
    return parts


def _parse_pattern(pattern: str) -> tuple[frozenset[int], ...]:
    octets = _split_outside_brackets(pattern.strip(), ".")
    if len(octets) != 4:
        raise ValueError(f"the filter {pattern.strip()!r} is not four octets (like "
                         "127.0.0.[2..11])")
    return tuple(_parse_octet(o) for o in octets)


def _parse_octet(text: str) -> frozenset[int]:
    if text.startswith("[") and text.endswith("]"):
        values: set[int] = set()
        for item in text[1:-1].split(";"):
            low, dots, high = item.partition("..")
            a = _octet_number(low)
            b = _octet_number(high) if dots else a
            if b < a:
                raise ValueError(f"the range [{item}] is empty")
            values.update(range(a, b + 1))
        return frozenset(values)
    return frozenset({_octet_number(text)})


def _octet_number(text: str) -> int:
    text = text.strip()
    if not _NUMBER.match(text) or int(text) > 255:
        raise ValueError(f"{text!r} is not an octet (0 to 255) in the filter")
    return int(text)


def reversed_name(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The query label of an address: IPv4 octets reversed, IPv6 nibbles reversed."""
    if addr.version == 4:
        return ".".join(reversed(str(addr).split(".")))
    return ".".join(reversed(addr.exploded.replace(":", "")))


def never_queried(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Addresses no public list can say anything about (and must not learn about). Loopback
    is left to `[dnsbl] exempt_networks` (exempt by default), so a test zone can list it."""
    if addr.is_loopback:
        return False
    return (addr.is_private or addr.is_link_local or addr.is_multicast
            or addr.is_unspecified or addr.is_reserved)


# -- the checker ----------------------------------------------------------------------------------
class DNSBL:
    """`check(ip)` at MX: Deferred[DnsblResult], never an errback."""

    def __init__(self, dns: Any, config: DNSBLSection, clock: Any):
        self.dns = dns
        self.config = config
        self.clock = clock
        self.sites = [parse_site(s) for s in config.sites]
        if config.threshold < 1:
            raise ConfigError("[dnsbl] threshold must be 1 or more")
        if config.timeout <= 0:
            raise ConfigError("[dnsbl] timeout must be positive")
        self.zones = list(dict.fromkeys(site.zone for site in self.sites))  # one query each
        self._cache: collections.OrderedDict[str, tuple[float, DnsblResult]] = \
            collections.OrderedDict()
        self._pending: dict[str, list[defer.Deferred]] = {}
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}

    def _zone_log(self, zone: str, trouble: str, level: str, fmt: str, **kw: Any) -> None:
        """Log a zone's trouble (no answer, temporary error, refusal) once, then at most once
        every ZONE_LOG_INTERVAL seconds with the number of occurrences left out: a dead list
        would otherwise write a line for every client."""
        now = self.clock.seconds()
        last, skipped = self._logged.get((zone, trouble), (None, 0))
        if last is not None and now - last < ZONE_LOG_INTERVAL:
            self._logged[(zone, trouble)] = (last, skipped + 1)
            return
        self._logged[(zone, trouble)] = (now, 0)
        more = f" ({skipped} more since)" if skipped else ""
        getattr(log, level)(fmt + "{more}", zone=zone, more=more, **kw)

    def check(self, ip: str) -> defer.Deferred:
        addr = parse_address(ip)
        if addr is None or not self.sites or never_queried(addr):
            return defer.succeed(DnsblResult())
        key = str(addr)
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > self.clock.seconds():
                self._cache.move_to_end(key)
                return defer.succeed(cached[1])
            del self._cache[key]
        waiter: defer.Deferred = defer.Deferred()
        if key in self._pending:  # the same address checked by another connection right now
            self._pending[key].append(waiter)
            return waiter
        self._pending[key] = [waiter]
        d = defer.ensureDeferred(self._check(addr))
        d.addErrback(self._bug, key)
        d.addCallback(self._done, key)
        return waiter

    def _bug(self, failure: Failure, key: str) -> tuple[DnsblResult, bool]:
        log.failure("dnsbl: check of {ip} failed; counted as unlisted", failure, ip=key)
        return DnsblResult(), False

    def _done(self, outcome: tuple[DnsblResult, bool], key: str) -> None:
        result, complete = outcome
        if complete:  # a zone that did not answer is asked again next time
            self._cache[key] = (self.clock.seconds() + CACHE_TTL, result)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        for waiter in self._pending.pop(key, []):
            waiter.callback(result)

    async def _check(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address
                     ) -> tuple[DnsblResult, bool]:
        label = reversed_name(addr)
        queries = [self._query(f"{label}.{zone}", zone, str(addr)) for zone in self.zones]
        answers = await defer.gatherResults(queries)
        by_zone = dict(zip(self.zones, answers))
        result = DnsblResult()
        for site in self.sites:
            found = by_zone[site.zone]
            if not found or not any(site.matches(a) for a in found):
                continue
            result.score += site.weight
            names = result.listed_by if site.weight > 0 else result.allowed_by
            if site.zone not in names:
                names.append(site.zone)
        if result.score >= self.config.threshold and result.listed_by:
            result.reply = Reply(554, "5.7.1", f"{result.listed_by[0]} lists {addr}",
                                 reason="dnsbl")
            log.info("dnsbl: {ip} scores {score} (threshold {threshold}), listed by {listed}",
                     ip=str(addr), score=result.score, threshold=self.config.threshold,
                     listed=", ".join(result.listed_by))
        return result, all(a is not None for a in answers)

    def _query(self, name: str, zone: str, ip: str) -> defer.Deferred:
        """Deferred[list[IPv4Address] | None]: the zone's usable answers (None: no answer in
        time, or a temporary error). Never errbacks."""
        out: defer.Deferred = defer.Deferred()
        timeout = self.config.timeout

        def expire() -> None:
            if not out.called:
                self._zone_log(zone, "timeout", "info", "dnsbl: {zone} gave no answer for {ip} "
                               "within {timeout} s; counted as unlisted", ip=ip,
                               timeout=timeout)
                out.callback(None)

        timer = self.clock.callLater(timeout, expire)

        def answered(records: list) -> None:
            if out.called:
                return
            timer.cancel()
            out.callback(self._usable(records, zone, ip))

        def failed(failure: Failure) -> None:
            if out.called:
                return
            timer.cancel()
            if failure.check(DnsTempError):
                self._zone_log(zone, "temporary", "info", "dnsbl: {zone} temporary error for "
                               "{ip} ({error}); counted as unlisted", ip=ip,
                               error=failure.getErrorMessage())
            else:
                log.failure("dnsbl: query {name} failed; counted as unlisted", failure,
                            name=name)
            out.callback(None)

        # The query itself is never cancelled: the DnsClient may share it with other callers,
        # and its answer still fills the cache for the next check.
        defer.maybeDeferred(self.dns.query, name, "A").addCallbacks(answered, failed)
        return out

    def _usable(self, records: list, zone: str, ip: str) -> list[ipaddress.IPv4Address]:
        usable = []
        for record in records or ():
            try:
                answer = ipaddress.IPv4Address(str(record).strip())
            except ValueError:
                continue
            if answer in ERROR_NETWORK:
                self._zone_log(zone, "refused", "warn", "dnsbl: {zone} refused to answer for "
                               "{ip} ({answer}: e.g. queries through a public resolver or over "
                               "quota); counted as unlisted", ip=ip, answer=str(answer))
                continue
            usable.append(answer)
        return usable

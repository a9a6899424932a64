"""The one DNS client of the process: every trust check asks it (docs/design/trust.md, "DNS").

INTERFACE (implemented by the trust-auth work; other modules rely on exactly this):

    class DnsTempError(Exception)       # timeout, SERVFAIL, REFUSED, malformed answer
    class DnsClient:
        def __init__(self, resolver, clock, max_entries: int = 20000): ...
        def query(self, name: str, qtype: str) -> Deferred
            # qtype in "A", "AAAA", "TXT", "MX", "PTR". Fires with a list:
            #   A/AAAA -> list[str] addresses; TXT -> list[bytes] (each record's strings
            #   joined); MX -> list[tuple[int, str]]; PTR -> list[str].
            # NXDOMAIN and NODATA fire with [] (cached for the SOA minimum, at most 1 hour,
            # 60 s when there is no SOA); DnsTempError on timeout/SERVFAIL (not cached).
            # Positive answers are cached for their smallest TTL (at most 1 day).
        def blocking(self, reactor) -> Callable[[str, str, float], list]
            # For libraries running in a worker thread (pyspf, dkimpy): the same query,
            # waited for from the thread (never call it on the reactor thread).

Implementation notes (docs/design/trust-authentication.md, "DNS"):
- `resolver` is a twisted.names IResolver, normally `mailsuite.courier.mx.make_resolver(...)`;
  its own retries and timeouts bound one query.
- The cache key is the lower-cased name in A-labels (IDNA) and the type. Expiry is read from
  `clock.seconds()`, so tests drive it with `task.Clock`; nothing is scheduled on the clock.
- Identical queries in flight share one resolver call; every caller gets its own Deferred, so
  one caller cancelling (or timing out) does not disturb the others.
- The negative TTL is the SOA MINIMUM, lowered to the SOA record's own TTL when that is smaller
  and not zero (RFC 2308 §5).
"""
from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Any, Callable

from twisted.internet import defer, threads
from twisted.names import dns, error
from twisted.python.failure import Failure

POSITIVE_TTL_MAX = 24 * 3600
NEGATIVE_TTL_MAX = 3600
NEGATIVE_TTL_DEFAULT = 60
MAX_CNAME_CHAIN = 8

_TYPES = {
    "A": (dns.A, "lookupAddress"),
    "AAAA": (dns.AAAA, "lookupIPV6Address"),
    "TXT": (dns.TXT, "lookupText"),
    "MX": (dns.MX, "lookupMailExchange"),
    "PTR": (dns.PTR, "lookupPointer"),
}

# Errors that mean "ask again later" (RFC 7208 §2.6.6, RFC 7489 §6.6.3 temperror).
_TEMPORARY = (error.DNSServerError, error.DNSQueryRefusedError, error.DNSQueryTimeoutError,
              defer.TimeoutError, error.DNSUnknownError, error.DNSFormatError,
              error.DNSNotImplementedError)


class DnsTempError(Exception):
    """Timeout, SERVFAIL, REFUSED or a malformed answer: the question may be asked again later."""


def normalize_name(name: str | bytes) -> str | None:
    """`name` as lower-case A-labels without the trailing dot; None if it cannot be a DNS name.

    Labels are encoded one by one so that underscore labels ("_dmarc", "_domainkey") pass."""
    if isinstance(name, bytes):
        try:
            name = name.decode("ascii")
        except UnicodeDecodeError:
            try:
                name = name.decode("utf-8")
            except UnicodeDecodeError:
                return None
    name = name.strip().rstrip(".")
    if not name or len(name) > 1024:
        return None
    labels = []
    for label in name.split("."):
        if not label.isascii():
            label = _alabel(label)
            if label is None:
                return None
        label = label.lower()
        if not label or len(label) > 63 or any(c in label for c in " \t\r\n\x00\\\"()"):
            return None
        labels.append(label)
    out = ".".join(labels)
    if len(out) > 253:
        return None
    return out


def _alabel(label: str) -> str | None:
    try:
        import idna  # IDNA 2008 with the UTS #46 mapping (RFC 5891)

        return idna.alabel(idna.uts46_remap(label, std3_rules=False)).decode("ascii")
    except Exception:
        try:
            return label.encode("idna").decode("ascii")  # IDNA 2003, the codec, as a fallback
        except Exception:
            return None


class DnsClient:
    def __init__(self, resolver: Any, clock: Any, max_entries: int = 20000):
        self._resolver = resolver
        self._clock = clock
        self._max_entries = max(1, max_entries)
        # key -> (expiry, records); insertion order is the eviction order.
        self._cache: OrderedDict[tuple[str, str], tuple[float, list]] = OrderedDict()
        self._pending: dict[tuple[str, str], list[defer.Deferred]] = {}

    # -- reactor side --------------------------------------------------------------------------
    def query(self, name: str, qtype: str) -> defer.Deferred:
        qtype = qtype.upper()
        if qtype not in _TYPES:
            return defer.fail(ValueError(f"unsupported query type {qtype!r}"))
        qname = normalize_name(name)
        if qname is None:
            return defer.succeed([])  # no such name can exist
        key = (qname, qtype)
        cached = self._cache.get(key)
        if cached is not None:
            expiry, records = cached
            if self._clock.seconds() < expiry:
                return defer.succeed(list(records))
            del self._cache[key]
        waiter: defer.Deferred = defer.Deferred()
        if key in self._pending:
            self._pending[key].append(waiter)
            return waiter
        self._pending[key] = [waiter]
        rrtype, method = _TYPES[qtype]
        try:
            d = getattr(self._resolver, method)(qname.encode("ascii"))
        except Exception as e:  # a resolver refusing the call outright
            d = defer.fail(e)
        d.addCallbacks(self._answered, self._failed, callbackArgs=(qname, rrtype))
        d.addBoth(self._deliver, key)
        return waiter

    def _answered(self, result: Any, qname: str, rrtype: int) -> tuple[list, float]:
        answers, authority, _additional = result
        records, ttl = _extract(answers, qname, rrtype)
        if records:
            return records, min(ttl, POSITIVE_TTL_MAX)
        return [], _negative_ttl(authority)  # NODATA

    def _failed(self, failure: Failure) -> tuple[list, float]:
        if failure.check(error.DNSNameError):  # NXDOMAIN
            message = failure.value.args[0] if failure.value.args else None
            authority = getattr(message, "authority", None) or []
            return [], _negative_ttl(authority)
        if failure.check(*_TEMPORARY):
            raise DnsTempError(failure.type.__name__)
        raise DnsTempError(f"{failure.type.__name__}: {failure.getErrorMessage()}")

    def _deliver(self, outcome: Any, key: tuple[str, str]) -> None:
        waiters = self._pending.pop(key, [])
        if isinstance(outcome, Failure):
            error_ = outcome.value if outcome.check(DnsTempError) else DnsTempError(
                outcome.getErrorMessage())
            for waiter in waiters:
                waiter.errback(Failure(error_))
            return None
        records, ttl = outcome
        if ttl > 0:
            self._store(key, records, ttl)
        for waiter in waiters:
            waiter.callback(list(records))
        return None

    def _store(self, key: tuple[str, str], records: list, ttl: float) -> None:
        self._cache.pop(key, None)
        self._cache[key] = (self._clock.seconds() + ttl, list(records))
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)

    def __len__(self) -> int:
        return len(self._cache)

    # -- worker-thread side --------------------------------------------------------------------
    def blocking(self, reactor: Any) -> Callable[[str, str, float], list]:
        """`fn(name, qtype, timeout) -> list` for worker threads; DnsTempError after `timeout`.

        The timeout runs on the reactor (Deferred.addTimeout): only the caller's own Deferred
        is cancelled, a shared query goes on for the others and still fills the cache."""

        def on_reactor(name: str, qtype: str, timeout: float) -> defer.Deferred:
            d = self.query(name, qtype)
            if timeout is not None and timeout > 0:
                d.addTimeout(timeout, reactor, onTimeoutCancel=_timed_out)
            return d

        def lookup(name: str, qtype: str, timeout: float) -> list:
            if timeout is not None and timeout <= 0:
                raise DnsTempError("DNS time budget exhausted")
            cached = self._peek(name, qtype)
            if cached is not None:
                return cached
            return threads.blockingCallFromThread(reactor, on_reactor, name, qtype, timeout)

        return lookup

    def _peek(self, name: str, qtype: str) -> list | None:
        """A fresh cached answer read from a worker thread, or None: a hit needs no trip through
        the reactor (docs/design/trust-authentication.md, "DNS"). Only reads: single dict
        look-ups are atomic, and expiry and eviction stay with the reactor side."""
        qtype = qtype.upper()
        if qtype not in _TYPES:
            return None
        qname = normalize_name(name)
        if qname is None:
            return []
        cached = self._cache.get((qname, qtype))
        if cached is None or self._clock.seconds() >= cached[0]:
            return None
        return list(cached[1])


def _timed_out(result: Any, timeout: float) -> Failure:
    return Failure(DnsTempError(f"no DNS answer within {timeout:g} s"))


def _extract(answers: list, qname: str, rrtype: int) -> tuple[list, float]:
    """The records of `rrtype` for `qname`, following CNAMEs inside the answer; and the TTL."""
    cnames = {}
    for rr in answers:
        if rr.type == dns.CNAME:
            cnames[_rrname(rr)] = (str(rr.payload.name).rstrip(".").lower(), rr.ttl)
    ttls: list[int] = []
    current = qname
    if cnames:
        seen = {current}
        while current in cnames and len(seen) <= MAX_CNAME_CHAIN:
            target, ttl = cnames[current]
            ttls.append(ttl)
            if target in seen:
                break  # a loop: whatever we have so far
            seen.add(target)
            current = target
        chosen = [rr for rr in answers if rr.type == rrtype and _rrname(rr) == current]
    else:
        # No CNAME: the answer section is about the question, whatever case the server used.
        chosen = [rr for rr in answers if rr.type == rrtype]
    records = []
    for rr in chosen:
        value = _value(rr)
        if value is not None:
            records.append(value)
            ttls.append(rr.ttl)
    return records, (min(ttls) if ttls and records else 0)


def _rrname(rr: Any) -> str:
    return str(rr.name).rstrip(".").lower()


def _value(rr: Any) -> Any:
    payload = rr.payload
    try:
        if rr.type == dns.A:
            return payload.dottedQuad()
        if rr.type == dns.AAAA:
            return ipaddress.IPv6Address(payload.address).compressed
        if rr.type == dns.TXT:
            return b"".join(s if isinstance(s, bytes) else s.encode() for s in payload.data)
        if rr.type == dns.MX:
            return (int(payload.preference), str(payload.name).rstrip("."))
        if rr.type == dns.PTR:
            return str(payload.name).rstrip(".")
    except Exception:
        return None  # a record we cannot read is left out, not an error for the whole answer
    return None


def _negative_ttl(authority: list) -> float:
    for rr in authority or []:
        if getattr(rr, "type", None) == dns.SOA:
            ttl = int(rr.payload.minimum)
            if rr.ttl and rr.ttl < ttl:
                ttl = rr.ttl  # RFC 2308 §5: the smaller of the SOA's TTL and MINIMUM
            return max(0, min(ttl, NEGATIVE_TTL_MAX))
    return NEGATIVE_TTL_DEFAULT

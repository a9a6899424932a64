"""DnsClient: answers, TTL cache on a task.Clock, negative caching, coalescing, errors, blocking."""
from __future__ import annotations

import pytest
from twisted.internet import defer, task
from twisted.names import dns, error

from mailsuite.trust.dns import DnsClient, DnsTempError, normalize_name


def rr(name, payload, ttl=300):
    return dns.RRHeader(name=name, type=payload.TYPE, ttl=ttl, payload=payload)


def soa(zone, minimum, ttl=3600):
    return rr(zone, dns.Record_SOA(mname="ns." + zone, rname="root." + zone, minimum=minimum),
              ttl=ttl)


def nx_failure(authority=()):
    message = dns.Message(rCode=dns.ENAME)
    message.authority = list(authority)
    return error.DNSNameError(message)


class FakeResolver:
    """twisted.names IResolver: answers from a dict (name, type) -> tuple | Exception | Deferred."""

    METHODS = {"lookupAddress": "A", "lookupIPV6Address": "AAAA", "lookupText": "TXT",
               "lookupMailExchange": "MX", "lookupPointer": "PTR"}

    def __init__(self, answers=None):
        self.answers = dict(answers or {})
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, method):
        if method not in self.METHODS:
            raise AttributeError(method)
        qtype = self.METHODS[method]

        def lookup(name, timeout=None):
            name = name.decode() if isinstance(name, bytes) else name
            self.calls.append((name, qtype))
            value = self.answers.get((name, qtype))
            if isinstance(value, defer.Deferred):
                return value
            if isinstance(value, Exception):
                return defer.fail(value)
            if value is None:
                return defer.fail(nx_failure())
            return defer.succeed(value)

        return lookup


def fired(d):
    results = []

    def keep(result):
        results.append(result)  # and consumed: ask each Deferred once

    d.addBoth(keep)
    assert results, "the Deferred has not fired"
    return results[0]


def value_of(d):
    result = fired(d)
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


def failure_of(d):
    result = fired(d)
    assert hasattr(result, "raiseException"), f"expected a failure, got {result!r}"
    return result


def make(answers=None, **kw):
    clock = task.Clock()
    resolver = FakeResolver(answers)
    return DnsClient(resolver, clock, **kw), resolver, clock


def test_record_types_are_converted():
    client, _, _ = make({
        ("a.test", "A"): ([rr("a.test", dns.Record_A("192.0.2.1")),
                           rr("a.test", dns.Record_A("192.0.2.2"))], [], []),
        ("a.test", "AAAA"): ([rr("a.test", dns.Record_AAAA("2001:db8::1"))], [], []),
        ("a.test", "TXT"): ([rr("a.test", dns.Record_TXT(b"v=spf1 ", b"-all"))], [], []),
        ("a.test", "MX"): ([rr("a.test", dns.Record_MX(10, b"mx.a.test"))], [], []),
        ("1.2.0.192.in-addr.arpa", "PTR"): (
            [rr("1.2.0.192.in-addr.arpa", dns.Record_PTR(b"host.a.test"))], [], []),
    })
    assert value_of(client.query("a.test", "A")) == ["192.0.2.1", "192.0.2.2"]
    assert value_of(client.query("a.test", "AAAA")) == ["2001:db8::1"]
    assert value_of(client.query("a.test", "TXT")) == [b"v=spf1 -all"]
    assert value_of(client.query("A.Test.", "MX")) == [(10, "mx.a.test")]
    assert value_of(client.query("1.2.0.192.in-addr.arpa", "PTR")) == ["host.a.test"]


def test_positive_answers_are_cached_for_the_smallest_ttl():
    client, resolver, clock = make({
        ("a.test", "A"): ([rr("a.test", dns.Record_A("192.0.2.1"), ttl=300),
                           rr("a.test", dns.Record_A("192.0.2.2"), ttl=100)], [], [])})
    assert value_of(client.query("a.test", "A")) == ["192.0.2.1", "192.0.2.2"]
    clock.advance(99)
    assert value_of(client.query("A.TEST", "A")) == ["192.0.2.1", "192.0.2.2"]
    assert len(resolver.calls) == 1
    clock.advance(1)
    value_of(client.query("a.test", "A"))
    assert len(resolver.calls) == 2
    assert clock.getDelayedCalls() == []  # expiry is read from the clock, nothing scheduled


def test_positive_ttl_is_capped_at_one_day():
    client, resolver, clock = make({
        ("a.test", "TXT"): ([rr("a.test", dns.Record_TXT(b"x"), ttl=7 * 86400)], [], [])})
    value_of(client.query("a.test", "TXT"))
    clock.advance(86400 - 1)
    value_of(client.query("a.test", "TXT"))
    assert len(resolver.calls) == 1
    clock.advance(1)
    value_of(client.query("a.test", "TXT"))
    assert len(resolver.calls) == 2


def test_nxdomain_is_cached_for_the_soa_minimum_capped_at_one_hour():
    client, resolver, clock = make({
        ("gone.test", "A"): nx_failure([soa("test", 600)]),
        ("long.test", "A"): nx_failure([soa("test", 86400, ttl=86400)]),
        ("bare.test", "A"): nx_failure(),
    })
    assert value_of(client.query("gone.test", "A")) == []
    clock.advance(599)
    assert value_of(client.query("gone.test", "A")) == []
    assert resolver.calls.count(("gone.test", "A")) == 1
    clock.advance(1)
    value_of(client.query("gone.test", "A"))
    assert resolver.calls.count(("gone.test", "A")) == 2

    value_of(client.query("long.test", "A"))
    clock.advance(3599)
    value_of(client.query("long.test", "A"))
    assert resolver.calls.count(("long.test", "A")) == 1
    clock.advance(1)
    value_of(client.query("long.test", "A"))
    assert resolver.calls.count(("long.test", "A")) == 2

    value_of(client.query("bare.test", "A"))  # no SOA: 60 s
    clock.advance(59)
    value_of(client.query("bare.test", "A"))
    assert resolver.calls.count(("bare.test", "A")) == 1
    clock.advance(1)
    value_of(client.query("bare.test", "A"))
    assert resolver.calls.count(("bare.test", "A")) == 2


def test_nodata_is_negative_and_cached():
    client, resolver, clock = make({("a.test", "AAAA"): ([], [soa("test", 120)], [])})
    assert value_of(client.query("a.test", "AAAA")) == []
    clock.advance(119)
    assert value_of(client.query("a.test", "AAAA")) == []
    assert len(resolver.calls) == 1
    clock.advance(1)
    value_of(client.query("a.test", "AAAA"))
    assert len(resolver.calls) == 2


@pytest.mark.parametrize("exc", [
    error.DNSServerError(dns.Message(rCode=dns.ESERVER)),
    error.DNSQueryRefusedError(dns.Message(rCode=dns.EREFUSED)),
    error.DNSQueryTimeoutError(None),
    defer.TimeoutError(),
    error.DNSUnknownError(dns.Message()),
    error.DNSFormatError(dns.Message()),
])
def test_temporary_errors_are_not_cached(exc):
    client, resolver, _ = make({("a.test", "TXT"): exc})
    failure_of(client.query("a.test", "TXT")).trap(DnsTempError)
    failure_of(client.query("a.test", "TXT")).trap(DnsTempError)
    assert len(resolver.calls) == 2


def test_cname_inside_the_answer_is_followed():
    client, _, _ = make({("www.a.test", "A"): ([
        rr("www.a.test", dns.Record_CNAME(b"edge.b.test"), ttl=50),
        rr("edge.b.test", dns.Record_CNAME(b"host.c.test"), ttl=400),
        rr("host.c.test", dns.Record_A("192.0.2.9"), ttl=400),
        rr("unrelated.test", dns.Record_A("192.0.2.66"), ttl=400),
    ], [], [])})
    assert value_of(client.query("www.a.test", "A")) == ["192.0.2.9"]


def test_cname_ttl_bounds_the_cache_and_loops_end():
    client, resolver, clock = make({
        ("www.a.test", "TXT"): ([rr("www.a.test", dns.Record_CNAME(b"t.b.test"), ttl=50),
                                 rr("t.b.test", dns.Record_TXT(b"hello"), ttl=400)], [], []),
        ("loop.test", "A"): ([rr("loop.test", dns.Record_CNAME(b"loop2.test")),
                              rr("loop2.test", dns.Record_CNAME(b"loop.test"))], [], []),
    })
    assert value_of(client.query("www.a.test", "TXT")) == [b"hello"]
    clock.advance(50)
    value_of(client.query("www.a.test", "TXT"))
    assert resolver.calls.count(("www.a.test", "TXT")) == 2
    assert value_of(client.query("loop.test", "A")) == []


def test_identical_queries_in_flight_are_coalesced():
    pending = defer.Deferred()
    client, resolver, _ = make({("a.test", "A"): pending})
    first, second = client.query("a.test", "A"), client.query("A.test.", "A")
    third = client.query("a.test", "TXT")  # another type is another query
    assert resolver.calls == [("a.test", "A"), ("a.test", "TXT")]
    assert not first.called and not second.called
    pending.callback(([rr("a.test", dns.Record_A("192.0.2.1"))], [], []))
    first_list = value_of(first)
    assert first_list == value_of(second) == ["192.0.2.1"]
    first_list.append("mutated by a caller")
    assert value_of(client.query("a.test", "A")) == ["192.0.2.1"]
    assert value_of(third) == []


def test_a_cancelled_caller_leaves_the_shared_query_alone():
    pending = defer.Deferred()
    client, _, _ = make({("a.test", "A"): pending})
    first, second = client.query("a.test", "A"), client.query("a.test", "A")
    first.cancel()
    failure_of(first).trap(defer.CancelledError)
    pending.callback(([rr("a.test", dns.Record_A("192.0.2.1"))], [], []))
    assert value_of(second) == ["192.0.2.1"]


def test_coalesced_temporary_failure_reaches_every_caller():
    pending = defer.Deferred()
    client, _, _ = make({("a.test", "MX"): pending})
    first, second = client.query("a.test", "MX"), client.query("a.test", "MX")
    pending.errback(error.DNSServerError(dns.Message(rCode=dns.ESERVER)))
    failure_of(first).trap(DnsTempError)
    failure_of(second).trap(DnsTempError)


def test_cache_is_bounded_and_evicts_the_oldest():
    answers = {(f"h{i}.test", "A"): ([rr(f"h{i}.test", dns.Record_A(f"192.0.2.{i}"))], [], [])
               for i in range(5)}
    client, resolver, _ = make(answers, max_entries=3)
    for i in range(5):
        value_of(client.query(f"h{i}.test", "A"))
    assert len(client) == 3
    value_of(client.query("h4.test", "A"))
    value_of(client.query("h0.test", "A"))
    assert resolver.calls.count(("h4.test", "A")) == 1
    assert resolver.calls.count(("h0.test", "A")) == 2


def test_idna_names_are_asked_in_a_labels():
    client, resolver, _ = make({
        ("xn--bcher-kva.test", "A"): ([rr("xn--bcher-kva.test", dns.Record_A("192.0.2.3"))],
                                      [], [])})
    assert value_of(client.query("Bücher.test", "A")) == ["192.0.2.3"]
    assert value_of(client.query("_dmarc.bücher.test", "TXT")) == []
    assert resolver.calls[-1] == ("_dmarc.xn--bcher-kva.test", "TXT")
    assert normalize_name("a b.test") is None
    assert normalize_name("x" * 64 + ".test") is None
    assert normalize_name(b"\xff.test") is None
    assert value_of(client.query("bad name..test", "A")) == []


def test_unsupported_type_fails():
    client, _, _ = make()
    failure_of(client.query("a.test", "SRV")).trap(ValueError)


class ThreadlessReactor(task.Clock):
    """A reactor for `blocking` in one thread: callFromThread runs at once; optionally the clock
    jumps forward right after (so a pending query times out)."""

    def __init__(self, jump=0):
        super().__init__()
        self.jump = jump

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)
        if self.jump:
            self.advance(self.jump)


def test_blocking_returns_answers_and_raises_temp_errors():
    client, _, _ = make({
        ("a.test", "TXT"): ([rr("a.test", dns.Record_TXT(b"v=DKIM1; p=abc"))], [], []),
        ("down.test", "TXT"): error.DNSServerError(dns.Message(rCode=dns.ESERVER)),
    })
    lookup = client.blocking(ThreadlessReactor())
    assert lookup("a.test", "TXT", 5) == [b"v=DKIM1; p=abc"]
    assert lookup("nx.test", "TXT", 5) == []
    with pytest.raises(DnsTempError):
        lookup("down.test", "TXT", 5)
    with pytest.raises(DnsTempError):
        lookup("a.test", "TXT", 0)  # an exhausted budget never asks


def test_blocking_times_out_with_a_temp_error_and_the_query_still_completes():
    pending = defer.Deferred()
    client, _, _ = make({("slow.test", "A"): pending})
    reactor = ThreadlessReactor(jump=10)
    lookup = client.blocking(reactor)
    with pytest.raises(DnsTempError):
        lookup("slow.test", "A", 5)
    pending.callback(([rr("slow.test", dns.Record_A("192.0.2.5"))], [], []))
    assert value_of(client.query("slow.test", "A")) == ["192.0.2.5"]


class CountingReactor(ThreadlessReactor):
    def __init__(self):
        super().__init__()
        self.trips = 0

    def callFromThread(self, f, *args, **kwargs):
        self.trips += 1
        super().callFromThread(f, *args, **kwargs)


def test_blocking_reads_a_fresh_cached_answer_without_a_trip_through_the_reactor():
    client, resolver, clock = make({
        ("a.test", "TXT"): ([rr("a.test", dns.Record_TXT(b"v=spf1 -all"), ttl=60)], [], []),
    })
    reactor = CountingReactor()
    lookup = client.blocking(reactor)
    assert lookup("a.test", "TXT", 5) == [b"v=spf1 -all"]
    assert reactor.trips == 1
    assert lookup("A.Test.", "TXT", 5) == [b"v=spf1 -all"]  # same key after normalizing
    assert reactor.trips == 1
    clock.advance(61)  # expired: asked again, through the reactor
    assert lookup("a.test", "TXT", 5) == [b"v=spf1 -all"]
    assert reactor.trips == 2

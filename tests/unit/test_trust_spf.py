"""SPF through pyspf with our DNS: every result, the HELO identity, limits, the pool seam."""
from __future__ import annotations

import pytest
import spf as pyspf
from twisted.internet import defer, task
from twisted.names import dns

from mailsuite.pools import InlinePool
from mailsuite.trust import AuthResult
from mailsuite.trust import spf as trust_spf
from mailsuite.trust.dns import DnsClient, DnsTempError
from mailsuite.trust.spf import check_spf, evaluate_spf, identity_domain
from tests.unit.trustkit import FakeLookup


class FakeDns:
    def __init__(self, lookup):
        self.lookup = lookup

    def blocking(self, reactor):
        return self.lookup


ZONE = {
    ("pass.test", "TXT"): [b"v=spf1 ip4:192.0.2.0/24 -all"],
    ("fail.test", "TXT"): [b"v=spf1 ip4:198.51.100.1 -all"],
    ("soft.test", "TXT"): [b"v=spf1 ~all"],
    ("neutral.test", "TXT"): [b"v=spf1 ?all"],
    ("nospf.test", "TXT"): [b"google-site-verification=abc"],
    ("temp.test", "TXT"): DnsTempError("timeout"),
    ("bad.test", "TXT"): [b"v=spf1 ip4:192.0.2.0/24 frobnicate -all"],
    ("two.test", "TXT"): [b"v=spf1 -all", b"v=spf1 +all"],
    ("mx.test", "TXT"): [b"v=spf1 mx a:host.mx.test -all"],
    ("mx.test", "MX"): [(10, "mail.mx.test")],
    ("mail.mx.test", "A"): ["192.0.2.25"],
    ("host.mx.test", "A"): ["192.0.2.26"],
    ("v6.test", "TXT"): [b"v=spf1 ip6:2001:db8::/32 -all"],
    ("incl.test", "TXT"): [b"v=spf1 include:pass.test -all"],
    ("inclt.test", "TXT"): [b"v=spf1 include:temp.test -all"],
    ("helo.example.test", "TXT"): [b"v=spf1 ip4:192.0.2.7 -all"],
}
# A chain of includes that needs more than 10 DNS-querying terms (RFC 7208 §4.6.4).
for n in range(12):
    ZONE[(f"l{n}.test", "TXT")] = [f"v=spf1 include:l{n + 1}.test -all".encode()]
ZONE[("l12.test", "TXT")] = [b"v=spf1 +all"]


def spf(ip, mail_from, helo="client.example.net", zone=ZONE):
    return evaluate_spf(FakeLookup(zone), ip, mail_from, helo, 10)


@pytest.mark.parametrize("sender,ip,expected", [
    ("alice@pass.test", "192.0.2.10", "pass"),
    ("alice@fail.test", "192.0.2.10", "fail"),
    ("alice@soft.test", "192.0.2.10", "softfail"),
    ("alice@neutral.test", "192.0.2.10", "neutral"),
    ("alice@nospf.test", "192.0.2.10", "none"),
    ("alice@nxdomain.test", "192.0.2.10", "none"),
    ("alice@temp.test", "192.0.2.10", "temperror"),
    ("alice@bad.test", "192.0.2.10", "permerror"),
    ("alice@two.test", "192.0.2.10", "permerror"),
    ("alice@l0.test", "192.0.2.10", "permerror"),
    ("alice@mx.test", "192.0.2.25", "pass"),
    ("alice@mx.test", "192.0.2.26", "pass"),
    ("alice@mx.test", "192.0.2.27", "fail"),
    ("alice@v6.test", "2001:db8::5", "pass"),
    ("alice@v6.test", "2001:db9::5", "fail"),
    ("alice@pass.test", "::ffff:192.0.2.10", "pass"),
    ("alice@incl.test", "192.0.2.10", "pass"),
    ("alice@inclt.test", "192.0.2.10", "temperror"),
])
def test_results(sender, ip, expected):
    result = spf(ip, sender)
    assert result.method == "spf"
    assert result.result == expected, result
    assert result.properties == (("smtp.mailfrom", sender),)


def test_too_many_lookups_is_permerror_with_a_reason():
    result = spf("192.0.2.10", "alice@l0.test")
    assert result.result == "permerror"
    assert "lookup" in result.reason.lower()


def test_null_reverse_path_checks_the_helo_identity():
    lookup = FakeLookup(ZONE)
    ok = evaluate_spf(lookup, "192.0.2.7", "", "helo.example.test", 10)
    assert (ok.result, ok.properties) == ("pass", (("smtp.helo", "helo.example.test"),))
    assert ("helo.example.test", "TXT") in lookup.asked
    bad = evaluate_spf(FakeLookup(ZONE), "192.0.2.8", "", "helo.example.test", 10)
    assert bad.result == "fail"
    assert identity_domain(ok) == "helo.example.test"


@pytest.mark.parametrize("helo", ["[192.0.2.7]", "localhost", "", "a b"])
def test_helo_that_is_not_a_domain_gives_none(helo):
    lookup = FakeLookup(ZONE)
    result = evaluate_spf(lookup, "192.0.2.7", "", helo, 10)
    assert result.result == "none"
    assert lookup.asked == []


def test_hostile_inputs_never_raise():
    for ip, sender in [("not-an-ip", "a@pass.test"), ("192.0.2.1", "a@" + "x" * 300),
                       ("192.0.2.1", "a@exa mple.test"), ("192.0.2.1", "\udcff@pass.test"),
                       ("192.0.2.1", "a@\u00e9xample.test")]:
        result = spf(ip, sender)
        assert result.result in trust_spf.RESULTS


def test_identity_domain_of_mail_from():
    assert identity_domain(AuthResult("spf", "pass", "", (("smtp.mailfrom", "a@B.Test."),))) \
        == "b.test"


def test_check_spf_runs_in_the_pool_and_fires_with_the_result():
    calls = []

    class RecordingPool(InlinePool):
        def run(self, fn, *args, **kwargs):
            calls.append(fn)
            return super().run(fn, *args, **kwargs)

    d = check_spf(FakeDns(FakeLookup(ZONE)), RecordingPool(), None, "192.0.2.10",
                  "alice@pass.test", "client.example.net", 10)
    results = []
    d.addCallback(results.append)
    assert results[0].result == "pass"
    assert calls == [evaluate_spf]
    assert pyspf.DNSLookup is trust_spf._dns_lookup


def test_check_spf_never_errbacks_when_the_pool_fails():
    class BrokenPool:
        def run(self, fn, *args, **kwargs):
            return defer.fail(RuntimeError("pool stopped"))

    d = check_spf(FakeDns(FakeLookup(ZONE)), BrokenPool(), None, "192.0.2.10",
                  "alice@pass.test", "h.test", 10)
    results = []
    d.addCallback(results.append)
    assert results[0].result == "temperror"


class ThreadlessReactor(task.Clock):
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class TxtResolver:
    """Enough of IResolver for one TXT record; everything else is NXDOMAIN."""

    def __init__(self, records):
        self.records = records

    def lookupText(self, name, timeout=None):
        name = name.decode()
        if name in self.records:
            payloads = [dns.RRHeader(name=name, type=dns.TXT, ttl=60,
                                     payload=dns.Record_TXT(*chunks))
                        for chunks in self.records[name]]
            return defer.succeed((payloads, [], []))
        from twisted.names import error
        return defer.fail(error.DNSNameError(dns.Message(rCode=dns.ENAME)))


def test_through_the_real_dns_client_and_install_dns():
    # A record split into two strings is joined (RFC 7208 §3.3).
    client = DnsClient(TxtResolver({"split.test": [(b"v=spf1 ip4:192.0.2.0/24", b" -all")]}),
                       task.Clock())
    reactor = ThreadlessReactor()
    trust_spf.install_dns(client, reactor)
    try:
        d = check_spf(client, InlinePool(), reactor, "192.0.2.1", "a@split.test", "h.test", 5)
        results = []
        d.addCallback(results.append)
        assert results[0].result == "pass"
        # The process-wide hook: pyspf used directly now asks our client too.
        assert pyspf.query(i="198.51.100.9", s="a@split.test", h="h.test").check()[0] == "fail"
    finally:
        trust_spf._default_lookup = None

"""DNSBL: postscreen site syntax, query names, filters, weights, errors and time-outs, with a
fake DnsClient and task.Clock."""
from __future__ import annotations

import ipaddress

import pytest
from twisted.internet import task

from mailsuite.config import ConfigError, DNSBLSection
from mailsuite.smtp.replies import Reply
from mailsuite.trust.dnsbl import (CACHE_TTL, DNSBL, DnsblResult, DnsTempError, parse_site,
                                   reversed_name)
from tests.unit.limitskit import HANG, FakeDns, LogLines, result_of

IP = "81.2.69.142"
REV = "142.69.2.81"


def dnsbl(answers, sites, threshold=1, timeout=5.0):
    clock = task.Clock()
    dns = FakeDns(answers)
    return DNSBL(dns, DNSBLSection(sites=list(sites), threshold=threshold, timeout=timeout),
                 clock), dns, clock


def a(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


# -- syntax ---------------------------------------------------------------------------------------
def test_parse_site_ranges_alternatives_and_weights():
    site = parse_site("zen.spamhaus.org=127.0.0.[2..11]*3")
    assert (site.zone, site.weight) == ("zen.spamhaus.org", 3)
    assert site.matches(a("127.0.0.2")) and site.matches(a("127.0.0.11"))
    assert not site.matches(a("127.0.0.12")) and not site.matches(a("127.0.1.2"))
    two = parse_site("bl.example.net=127.0.0.2;127.0.0.4")
    assert two.weight == 1
    assert two.matches(a("127.0.0.2")) and two.matches(a("127.0.0.4"))
    assert not two.matches(a("127.0.0.3"))
    mixed = parse_site("bl.example.net=127.0.0.[1;5;7..8]")
    assert [n for n in range(10) if mixed.matches(a(f"127.0.0.{n}"))] == [1, 5, 7, 8]
    allow = parse_site("list.dnswl.org=127.0.[0..255].[1..3]*-5")
    assert allow.weight == -5 and allow.matches(a("127.0.9.2")) and not allow.matches(
        a("127.0.9.0"))
    anything = parse_site("Bl.Example.Net.")
    assert anything.zone == "bl.example.net" and anything.matches(a("127.0.0.200"))


@pytest.mark.parametrize("text", [
    "", "  ", "zen", "zen..example.org", "bad zone.example", "zen.example.org*",
    "zen.example.org*x",
    "zen.example.org*0", "zen.example.org=", "zen.example.org=127.0.0",
    "zen.example.org=127.0.0.256", "zen.example.org=127.0.0.[5..2]",
    "zen.example.org=127.0.0.[2..3", "zen.example.org=127.0.0.2]", "zen.example.org=127.0.0.[[2]]",
    "zen.example.org=127.0.0.x", "zen.example.org=127.0.0.2;", "=127.0.0.2",
])
def test_bad_site_syntax_is_one_config_error_line(text):
    with pytest.raises(ConfigError) as e:
        parse_site(text)
    assert str(e.value).startswith("[dnsbl] sites: ") and "\n" not in str(e.value)


def test_bad_sites_or_threshold_stop_start_up():
    with pytest.raises(ConfigError, match="not a DNS zone"):
        dnsbl({}, ["zen.spamhaus.org", "oops"])
    with pytest.raises(ConfigError, match="threshold"):
        dnsbl({}, ["zen.spamhaus.org"], threshold=0)


# -- query names ----------------------------------------------------------------------------------
def test_ipv4_and_ipv6_reversal():
    assert reversed_name(ipaddress.ip_address("81.2.69.142")) == "142.69.2.81"
    assert reversed_name(ipaddress.ip_address("2a00:1450:4001:81b::200e")) == \
        "e.0.0.2.0.0.0.0.0.0.0.0.0.0.0.0.b.1.8.0.1.0.0.4.0.5.4.1.0.0.a.2"
    checker, dns, _ = dnsbl({}, ["zen.example.org"])
    result_of(checker.check(IP))
    result_of(checker.check("2a00:1450:4001:81b::200e"))
    result_of(checker.check("::ffff:81.2.69.143"))
    assert dns.queries == [
        (f"{REV}.zen.example.org", "A"),
        ("e.0.0.2.0.0.0.0.0.0.0.0.0.0.0.0.b.1.8.0.1.0.0.4.0.5.4.1.0.0.a.2.zen.example.org", "A"),
        ("143.69.2.81.zen.example.org", "A")]


def test_private_addresses_are_never_queried():
    checker, dns, _ = dnsbl({}, ["zen.example.org"])
    for ip in ("10.1.2.3", "192.168.1.1", "172.16.0.1", "169.254.1.1",
               "fd00::1", "fe80::1", "not an address"):
        assert result_of(checker.check(ip)) == DnsblResult()
    assert dns.queries == []


def test_loopback_is_queried_when_not_exempt():
    """The gate skips [dnsbl] exempt_networks (loopback by default); the checker itself asks,
    so a test zone can list 127.0.0.1."""
    checker, dns, _ = dnsbl({}, ["zen.example.org"])
    result_of(checker.check("127.0.0.2"))
    assert dns.queries == [("2.0.0.127.zen.example.org", "A")]


# -- scores ---------------------------------------------------------------------------------------
def test_listed_with_filter_and_threshold():
    sites = ["zen.example.org=127.0.0.[2..11]", "bl.example.net"]
    answers = {f"{REV}.zen.example.org": ["127.0.0.4"], f"{REV}.bl.example.net": ["127.0.0.2"]}
    checker, _, _ = dnsbl(answers, sites, threshold=2)
    assert result_of(checker.check(IP)) == DnsblResult(
        2, ["zen.example.org", "bl.example.net"], [],
        Reply(554, "5.7.1", "zen.example.org lists 81.2.69.142"))
    # Below the threshold: the score, no reply.
    checker, _, _ = dnsbl({f"{REV}.bl.example.net": ["127.0.0.2"]}, sites, threshold=2)
    assert result_of(checker.check(IP)) == DnsblResult(1, ["bl.example.net"], [], None)


def test_answers_outside_the_filter_do_not_count():
    checker, _, _ = dnsbl({f"{REV}.zen.example.org": ["127.0.0.12", "127.0.1.4"]},
                          ["zen.example.org=127.0.0.[2..11]"])
    assert result_of(checker.check(IP)) == DnsblResult()


def test_one_zone_with_several_filters_is_queried_once_and_weights_add():
    sites = ["zen.example.org=127.0.0.[10;11]*8", "zen.example.org=127.0.0.[4..7]*6",
             "zen.example.org=127.0.0.[2..3]*3"]
    checker, dns, _ = dnsbl({f"{REV}.zen.example.org": ["127.0.0.4", "127.0.0.10"]}, sites,
                            threshold=10)
    result = result_of(checker.check(IP))
    assert result.score == 14 and result.listed_by == ["zen.example.org"] and result.reply
    assert len(dns.queries) == 1


def test_negative_weight_is_an_allow_list():
    sites = ["zen.example.org*2", "list.dnswl.example=127.0.[0..255].[1..3]*-5"]
    answers = {f"{REV}.zen.example.org": ["127.0.0.2"],
               f"{REV}.list.dnswl.example": ["127.0.15.2"]}
    checker, _, _ = dnsbl(answers, sites)
    assert result_of(checker.check(IP)) == DnsblResult(-3, ["zen.example.org"],
                                                       ["list.dnswl.example"], None)


def test_127_255_255_x_is_an_error_not_a_listing():
    checker, _, _ = dnsbl({f"{REV}.zen.example.org": ["127.255.255.254"]}, ["zen.example.org"])
    with LogLines() as logs:
        assert result_of(checker.check(IP)) == DnsblResult()
    assert len(logs.matching("zen.example.org refused to answer for 81.2.69.142 "
                             "(127.255.255.254")) == 1


# -- failures and time ----------------------------------------------------------------------------
def test_timeout_counts_as_unlisted_and_is_not_cached():
    sites = ["slow.example.org", "bl.example.net"]
    checker, dns, clock = dnsbl({f"{REV}.slow.example.org": HANG,
                                 f"{REV}.bl.example.net": ["127.0.0.2"]}, sites, threshold=2,
                                timeout=5)
    d = checker.check(IP)
    assert not d.called
    clock.advance(4.9)
    assert not d.called
    with LogLines() as logs:
        clock.advance(0.1)
    assert result_of(d) == DnsblResult(1, ["bl.example.net"], [], None)
    assert len(logs.matching("slow.example.org gave no answer for 81.2.69.142 within 5")) == 1
    dns.fire(f"{REV}.slow.example.org", ["127.0.0.2"])  # too late: ignored
    assert clock.getDelayedCalls() == []
    # Not cached: the next check asks again, and this time the zone answers.
    dns.answers[f"{REV}.slow.example.org"] = ["127.0.0.2"]
    assert result_of(checker.check(IP)).reply == Reply(554, "5.7.1",
                                                       "slow.example.org lists 81.2.69.142")


def test_temporary_dns_error_counts_as_unlisted():
    checker, _, clock = dnsbl({f"{REV}.zen.example.org": DnsTempError("SERVFAIL")},
                              ["zen.example.org"])
    with LogLines() as logs:
        assert result_of(checker.check(IP)) == DnsblResult()
    assert len(logs.matching("zen.example.org temporary error for 81.2.69.142 (SERVFAIL)")) == 1
    assert clock.getDelayedCalls() == []


def test_results_are_cached_and_concurrent_checks_coalesced():
    checker, dns, clock = dnsbl({f"{REV}.zen.example.org": HANG}, ["zen.example.org"])
    first, second = checker.check(IP), checker.check(IP)
    assert len(dns.queries) == 1 and not first.called and not second.called
    dns.fire(f"{REV}.zen.example.org", ["127.0.0.2"])
    assert result_of(first).listed_by == result_of(second).listed_by == ["zen.example.org"]
    dns.answers[f"{REV}.zen.example.org"] = []
    assert result_of(checker.check(IP)).listed_by == ["zen.example.org"]  # from the cache
    assert len(dns.queries) == 1
    clock.advance(CACHE_TTL)
    assert result_of(checker.check(IP)) == DnsblResult()
    assert len(dns.queries) == 2


def test_no_sites_no_queries():
    checker, dns, _ = dnsbl({}, [])
    assert result_of(checker.check(IP)) == DnsblResult()
    assert dns.queries == []


def test_a_dead_zone_logs_once_a_minute_not_once_per_client():
    checker, _, clock = dnsbl({}, ["zen.example.org"])
    checker.dns.answers = {f"{n}.69.2.81.zen.example.org": DnsTempError("SERVFAIL")
                           for n in range(1, 6)}
    with LogLines() as logs:
        for n in range(1, 5):
            result_of(checker.check(f"81.2.69.{n}"))
        clock.advance(60)
        result_of(checker.check("81.2.69.5"))
    lines = logs.matching("zen.example.org temporary error")
    assert len(lines) == 2 and lines[1].endswith("(3 more since)")

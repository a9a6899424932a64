"""DMARC: records, alignment, org-domain fallback, pct sampling, From: parsing, and the
dispositions `checks.authenticate_message` derives from them."""
from __future__ import annotations

import random

import dkim
import pytest

from mailsuite.config import TrustSection
from mailsuite.smtp.replies import Reply
from mailsuite.trust import ACCEPT, JUNK, REJECT, TEMPFAIL, AuthResult, Envelope
from mailsuite.trust.checks import AuthOutcome, authenticate_message
from mailsuite.trust.dmarc import (evaluate_domain, evaluate_message, from_domains,
                                   organizational_domain, parse_record)
from mailsuite.trust.dns import DnsTempError
from tests.unit.trustkit import FakeLookup, rsa_key

NO_SPF = AuthResult("spf", "none", "", (("smtp.mailfrom", "bounce@elsewhere.test"),))


def spf_pass(mail_from):
    return AuthResult("spf", "pass", "", (("smtp.mailfrom", mail_from),))


def dkim_result(result, d):
    return AuthResult("dkim", result, "", (("header.d", d), ("header.s", "s")))


class Never:
    """An rng that must not be asked."""

    def random(self):
        raise AssertionError("pct sampling asked the rng")


def dmarc_zone(mapping):
    return FakeLookup({(name, "TXT"): [v.encode() if isinstance(v, str) else v for v in values]
                       if not isinstance(values, Exception) else values
                       for name, values in mapping.items()})


REJECT_REC = "v=DMARC1; p=reject; rua=mailto:d@example.com"


# -- records -----------------------------------------------------------------------------------
def test_parse_record_tags_and_defaults():
    r = parse_record(b"v=DMARC1; p=Quarantine; sp=reject; pct=30; adkim=s; aspf=s; "
                     b"rua=mailto:a@x.test,https://x.test/r; foo=bar")
    assert (r.p, r.sp, r.pct, r.adkim, r.aspf) == ("quarantine", "reject", 30, "s", "s")
    assert r.rua == ("mailto:a@x.test", "https://x.test/r")
    d = parse_record("v=DMARC1;p=none")
    assert (d.p, d.sp, d.pct, d.adkim, d.aspf) == ("none", None, 100, "r", "r")
    assert parse_record("v=DMARC1; p=reject; pct=250; adkim=x").pct == 100
    assert parse_record("v=DMARC1; p=reject; adkim=x").adkim == "r"


@pytest.mark.parametrize("text", ["v=spf1 -all", "p=reject; v=DMARC1", "v=dmarc1; p=reject",
                                  "v=DMARC1; p=bogus", "v=DMARC1", "v=DMARC1; p=reject; sp=x",
                                  "", "v=DMARC10; p=reject"])
def test_invalid_records_are_none(text):
    assert parse_record(text) is None


def test_invalid_policy_with_rua_acts_as_p_none():
    r = parse_record("v=DMARC1; p=bogus; rua=mailto:r@x.test")
    assert (r.p, r.sp) == ("none", None)


def test_organizational_domain():
    assert organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert organizational_domain("example.com") == "example.com"
    assert organizational_domain("com") == "com"


# -- alignment ---------------------------------------------------------------------------------
@pytest.mark.parametrize("record,spf_from,dkim_d,expected", [
    ("v=DMARC1; p=reject", "a@example.com", None, "pass"),
    ("v=DMARC1; p=reject", "a@bounce.example.com", None, "pass"),          # relaxed SPF
    ("v=DMARC1; p=reject; aspf=s", "a@bounce.example.com", None, "fail"),  # strict SPF
    ("v=DMARC1; p=reject; aspf=s", "a@example.com", None, "pass"),
    ("v=DMARC1; p=reject", None, "mail.example.com", "pass"),              # relaxed DKIM
    ("v=DMARC1; p=reject; adkim=s", None, "mail.example.com", "fail"),     # strict DKIM
    ("v=DMARC1; p=reject; adkim=s", None, "EXAMPLE.com", "pass"),
    ("v=DMARC1; p=reject", "a@example.net", "example.org", "fail"),        # nothing aligned
])
def test_alignment(record, spf_from, dkim_d, expected):
    lookup = dmarc_zone({"_dmarc.example.com": [record]})
    spf = spf_pass(spf_from) if spf_from else NO_SPF
    dkim_results = [dkim_result("pass", dkim_d)] if dkim_d else [AuthResult("dkim", "none")]
    outcome = evaluate_domain("example.com", spf, dkim_results, lookup, Never())
    assert outcome.keyword == expected
    assert outcome.result.properties[0] == ("header.from", "example.com")


def test_spf_must_pass_and_dkim_must_pass_to_align():
    lookup = dmarc_zone({"_dmarc.example.com": [REJECT_REC]})
    spf_fail = AuthResult("spf", "fail", "", (("smtp.mailfrom", "a@example.com"),))
    outcome = evaluate_domain("example.com", spf_fail, [dkim_result("fail", "example.com")],
                              lookup, Never())
    assert (outcome.keyword, outcome.policy, outcome.requested) == ("fail", "reject", "reject")
    assert ("policy.dmarc", "reject") in outcome.result.properties


def test_no_record_is_none_and_multiple_records_are_none():
    assert evaluate_domain("example.com", NO_SPF, [], dmarc_zone({}), Never()).keyword == "none"
    two = dmarc_zone({"_dmarc.example.com": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]})
    assert evaluate_domain("example.com", NO_SPF, [], two, Never()).keyword == "none"
    other_txt = dmarc_zone({"_dmarc.example.com": ["something else", REJECT_REC]})
    assert evaluate_domain("example.com", NO_SPF, [], other_txt, Never()).keyword == "fail"


def test_org_domain_fallback_uses_sp_for_subdomains():
    lookup = dmarc_zone({"_dmarc.example.com": ["v=DMARC1; p=reject; sp=quarantine"]})
    outcome = evaluate_domain("sub.example.com", NO_SPF, [], lookup, Never())
    assert (outcome.keyword, outcome.requested, outcome.policy) == ("fail", "quarantine",
                                                                    "quarantine")
    assert outcome.record_domain == "example.com"
    assert ("_dmarc.sub.example.com", "TXT") in lookup.asked
    # Without sp=, p= applies to subdomains too.
    plain = dmarc_zone({"_dmarc.example.com": ["v=DMARC1; p=reject"]})
    assert evaluate_domain("sub.example.com", NO_SPF, [], plain, Never()).policy == "reject"
    # A record of the subdomain itself wins, with its p=.
    own = dmarc_zone({"_dmarc.sub.example.com": ["v=DMARC1; p=none"],
                      "_dmarc.example.com": ["v=DMARC1; p=reject; sp=reject"]})
    assert evaluate_domain("sub.example.com", NO_SPF, [], own, Never()).requested == "none"


def test_pct_zero_never_applies_the_requested_policy_and_records_it():
    lookup = dmarc_zone({"_dmarc.q.test": ["v=DMARC1; p=quarantine; pct=0"],
                         "_dmarc.r.test": ["v=DMARC1; p=reject; pct=0"]})
    q = evaluate_domain("q.test", NO_SPF, [], lookup, Never())
    assert (q.keyword, q.requested, q.policy, q.sampled_out) == ("fail", "quarantine", "none",
                                                                 True)
    assert "not sampled" in q.result.reason and "pct=0" in q.result.reason
    r = evaluate_domain("r.test", NO_SPF, [], lookup, Never())
    assert (r.policy, r.sampled_out) == ("quarantine", True)  # RFC 7489 §6.6.4


def test_pct_sampling_with_a_seeded_rng():
    lookup = dmarc_zone({"_dmarc.example.com": ["v=DMARC1; p=reject; pct=30"]})
    rng = random.Random(1234)
    policies = [evaluate_domain("example.com", NO_SPF, [], lookup, rng).policy
                for _ in range(1000)]
    applied = policies.count("reject")
    assert policies.count("quarantine") == 1000 - applied
    assert 240 <= applied <= 360
    again = random.Random(1234)
    assert policies == [evaluate_domain("example.com", NO_SPF, [], lookup, again).policy
                        for _ in range(1000)]


def test_temperror_from_the_record_lookup_and_from_pending_identifiers():
    down = dmarc_zone({"_dmarc.example.com": DnsTempError("timeout")})
    assert evaluate_domain("example.com", NO_SPF, [], down, Never()).keyword == "temperror"
    lookup = dmarc_zone({"_dmarc.example.com": [REJECT_REC]})
    pending = evaluate_domain("example.com", NO_SPF, [dkim_result("temperror", "example.com")],
                              lookup, Never())
    assert pending.keyword == "temperror"
    spf_temp = AuthResult("spf", "temperror", "", (("smtp.mailfrom", "a@example.com"),))
    assert evaluate_domain("example.com", spf_temp, [], lookup, Never()).keyword == "temperror"
    # A temporary error on an identifier that could not align changes nothing: fail.
    unrelated = evaluate_domain("example.com", NO_SPF,
                                [dkim_result("temperror", "other.test")], lookup, Never())
    assert unrelated.keyword == "fail"
    # And a pass elsewhere decides: pass.
    decided = evaluate_domain("example.com", spf_pass("a@example.com"),
                              [dkim_result("temperror", "example.com")], lookup, Never())
    assert decided.keyword == "pass"


# -- From: -------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers,expected", [
    (b"From: Alice <alice@Example.COM.>\r\n", ["example.com"]),
    (b"From: =?utf-8?q?Bob_=40_evil=2Etest?= <alice@example.com>\r\n", ["example.com"]),
    (b"From: \"bob@evil.test\" <alice@example.com>\r\n", ["example.com"]),
    (b"From: a@one.test, b@two.test\r\n", ["one.test", "two.test"]),
    (b"From: a@one.test\r\nFrom: b@two.test\r\n", ["one.test", "two.test"]),
    (b"From: a@one.test\r\nfrom: b@ONE.test\r\n", ["one.test"]),
    (b"From:\r\n Alice\r\n <alice@folded.test>\r\n", ["folded.test"]),
    (b"From: alice@b\xc3\xbccher.test\r\n", ["xn--bcher-kva.test"]),
    (b"From: alice@example.org)<bob@evil.test>\r\n", None),  # both parsers' views count
])
def test_from_domains(headers, expected):
    domains, problem = from_domains(headers + b"Subject: x\r\n\r\nFrom: body@body.test\r\n")
    if expected is None:
        assert problem == "" and "evil.test" in domains
    else:
        assert (domains, problem) == (expected, "")


@pytest.mark.parametrize("message", [
    b"Subject: no from\r\n\r\nbody",
    b"From: undisclosed-recipients:;\r\n\r\n",
    b"From: \r\n\r\n",
    b"From: alice@[192.0.2.1]\r\n\r\n",
    b"From: \xff\xfe\x00@\xff\r\n\r\n",
    b"From: " + b"(" * 5000 + b"\r\n\r\n",
    b"",
])
def test_no_usable_from_is_permerror(message):
    outcome = evaluate_message(message, NO_SPF, [], dmarc_zone({}), Never())
    assert outcome.keyword == "permerror"
    assert outcome.policy == "none"


def test_huge_from_is_searched_not_parsed():
    message = b"From: " + b"x" * 20000 + b" <ceo@bank.test>\r\n\r\n"
    assert from_domains(message) == (["bank.test"], "")


def test_multiple_from_domains_apply_the_strictest():
    lookup = dmarc_zone({"_dmarc.lax.test": ["v=DMARC1; p=none"],
                         "_dmarc.strict.test": ["v=DMARC1; p=reject"]})
    message = b"From: a@lax.test, b@strict.test\r\n\r\nbody"
    outcome = evaluate_message(message, NO_SPF, [], lookup, Never())
    assert (outcome.keyword, outcome.policy, outcome.domain) == ("fail", "reject", "strict.test")
    assert outcome.domains == ["lax.test", "strict.test"]
    assert "2 From domains" in outcome.result.reason
    # One passing domain does not rescue the other.
    passing = evaluate_message(message, spf_pass("x@lax.test"), [], lookup, Never())
    assert passing.policy == "reject"


# -- dispositions (checks.authenticate_message) -------------------------------------------------
MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: hi\r\n"
           b"Date: Sat, 28 Nov 2026 01:00:00 +0000\r\n\r\nHello\r\n")
ENVELOPE = Envelope("192.0.2.1", "client.example.net", "bounce@elsewhere.test",
                    ("bob@example.org",))


def authenticate(message, records, spf=NO_SPF, config=None, rng=None):
    return authenticate_message(message, ENVELOPE, spf, dmarc_zone(records),
                                config or TrustSection(), rng or Never())


def test_reject_policy_and_failure_is_rejected_with_550():
    outcome = authenticate(MESSAGE, {"_dmarc.example.com": [REJECT_REC]},
                           spf=AuthResult("spf", "fail", "",
                                          (("smtp.mailfrom", "bounce@elsewhere.test"),)))
    assert isinstance(outcome, AuthOutcome)
    assert outcome.disposition == REJECT
    assert outcome.reply == Reply(550, "5.7.1", "message refused: DMARC policy of example.com "
                                                "says reject (SPF fail, DKIM none)")
    assert [r.method for r in outcome.results] == ["spf", "dkim", "arc", "dmarc"]
    assert outcome.results[-1].result == "fail"
    assert "dmarc=fail" in outcome.log and "\n" not in outcome.log


def test_quarantine_policy_is_junk():
    outcome = authenticate(MESSAGE, {"_dmarc.example.com": ["v=DMARC1; p=quarantine"]})
    assert (outcome.disposition, outcome.reply) == (JUNK, None)


@pytest.mark.parametrize("setting,expected", [("reject", REJECT), ("quarantine", JUNK),
                                              ("none", ACCEPT)])
def test_local_config_maps_p_reject(setting, expected):
    outcome = authenticate(MESSAGE, {"_dmarc.example.com": [REJECT_REC]},
                           config=TrustSection(dmarc_reject=setting))
    assert outcome.disposition == expected


def test_local_config_can_ignore_quarantine():
    outcome = authenticate(MESSAGE, {"_dmarc.example.com": ["v=DMARC1; p=quarantine"]},
                           config=TrustSection(dmarc_quarantine="none"))
    assert outcome.disposition == ACCEPT


def test_dmarc_dns_timeout_is_tempfail_451():
    outcome = authenticate(MESSAGE, {"_dmarc.example.com": DnsTempError("timeout")})
    assert outcome.disposition == TEMPFAIL
    assert outcome.reply == Reply(451, "4.7.0", "temporary DNS failure checking sender "
                                                "authentication, try again later")
    assert outcome.results[-1].result == "temperror"


def test_pass_none_and_sampled_out_are_accepted():
    signed = dkim.sign(MESSAGE, b"s1", b"example.com", rsa_key("a")[0],
                       include_headers=[b"from", b"subject"]) + MESSAGE
    records = {"_dmarc.example.com": [REJECT_REC],
               "s1._domainkey.example.com": [rsa_key("a")[1]]}
    passed = authenticate(signed, records)
    assert passed.disposition == ACCEPT and passed.reply is None
    assert [r.result for r in passed.results] == ["none", "pass", "none", "pass"]
    assert authenticate(MESSAGE, {}).disposition == ACCEPT
    sampled = authenticate(MESSAGE, {"_dmarc.example.com": ["v=DMARC1; p=quarantine; pct=0"]})
    assert sampled.disposition == ACCEPT
    assert "not sampled" in sampled.results[-1].reason


def test_hostile_message_is_never_an_exception():
    for message in [b"", b"\x00" * 100, b"From: \xff\r\n\r\n", b"From: a@example.com\r\n" +
                    b"DKIM-Signature: \xff\r\n" * 50 + b"\r\n"]:
        outcome = authenticate(message, {"_dmarc.example.com": [REJECT_REC]})
        assert outcome.disposition in (ACCEPT, REJECT)
        assert outcome.results[0].method == "spf"


def test_disabled_trust_accepts_without_results():
    outcome = authenticate(MESSAGE, {"_dmarc.example.com": [REJECT_REC]},
                           config=TrustSection(enabled=False))
    assert (outcome.disposition, outcome.results) == (ACCEPT, [])


def test_missing_spf_result_is_recorded_as_none():
    outcome = authenticate(MESSAGE, {"_dmarc.example.com": [REJECT_REC]}, spf=None)
    assert outcome.results[0] == AuthResult("spf", "none", "not checked",
                                            (("smtp.mailfrom", "bounce@elsewhere.test"),))
    assert outcome.disposition == REJECT

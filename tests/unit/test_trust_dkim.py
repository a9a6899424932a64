"""DKIM verification of every signature, ARC verification and sealing, the dnsfunc adaptor."""
from __future__ import annotations

import re

import dkim
import pytest

from mailsuite.trust.authresults import build_header
from mailsuite.trust import AuthResult
from mailsuite.trust.dkimcheck import (DkimDnsTempError, arc_seal, dkim_dnsfunc, verify_arc,
                                       verify_dkim)
from mailsuite.trust.dns import DnsTempError
from tests.unit.trustkit import FakeLookup, ed25519_key, rsa_key

MESSAGE = (b"Received: from client.example.net by mx.example.org\r\n"
           b"From: Alice <alice@a.test>\r\nTo: bob@example.org\r\nSubject: hello\r\n"
           b"Date: Sat, 28 Nov 2026 01:00:00 +0000\r\nMessage-ID: <1@a.test>\r\n\r\n"
           b"Hello Bob,\r\nsee you.\r\n")


def sign(message, selector, domain, key, algorithm=b"rsa-sha256"):
    return dkim.sign(message, selector.encode(), domain.encode(), key,
                     signature_algorithm=algorithm, include_headers=[b"from", b"to",
                                                                     b"subject", b"date"])


def zone():
    lookup = FakeLookup()
    lookup.add("s1._domainkey.a.test", "TXT", [rsa_key("a")[1]])
    lookup.add("s2._domainkey.b.test", "TXT", [rsa_key("b")[1]])
    lookup.add("ed._domainkey.a.test", "TXT", [ed25519_key("a")[1]])
    return lookup


def dnsfunc(lookup=None):
    return dkim_dnsfunc(lookup or zone())


def props(result):
    return dict(result.properties)


def test_one_good_rsa_signature_passes_with_its_properties():
    signed = sign(MESSAGE, "s1", "a.test", rsa_key("a")[0]) + MESSAGE
    [result] = verify_dkim(signed, dnsfunc())
    assert (result.method, result.result) == ("dkim", "pass")
    p = props(result)
    assert (p["header.d"], p["header.i"], p["header.s"], p["header.a"]) == (
        "a.test", "@a.test", "s1", "rsa-sha256")
    b = re.search(rb"\bb=([^;]+)$", re.sub(rb"\s+", b"", signed.split(b"\r\nReceived")[0]))
    assert p["header.b"] == b.group(1)[:8].decode()


def test_two_signatures_give_two_results_in_header_order():
    # The second signature claims b.test but is made with another key than b.test publishes.
    good = sign(MESSAGE, "s1", "a.test", rsa_key("a")[0])
    bad = sign(MESSAGE, "s2", "b.test", rsa_key("other")[0])
    results = verify_dkim(bad + good + MESSAGE, dnsfunc())
    assert [(props(r)["header.d"], r.result) for r in results] == [("b.test", "fail"),
                                                                  ("a.test", "pass")]


def test_altered_body_fails():
    signed = sign(MESSAGE, "s1", "a.test", rsa_key("a")[0]) + MESSAGE
    [result] = verify_dkim(signed.replace(b"see you", b"send money"), dnsfunc())
    assert result.result == "fail"
    assert "body hash" in result.reason


def test_altered_signed_header_fails():
    signed = sign(MESSAGE, "s1", "a.test", rsa_key("a")[0]) + MESSAGE
    [result] = verify_dkim(signed.replace(b"Subject: hello", b"Subject: HELLO"), dnsfunc())
    assert result.result == "fail"


def test_ed25519_passes():
    signed = sign(MESSAGE, "ed", "a.test", ed25519_key("a")[0], b"ed25519-sha256") + MESSAGE
    [result] = verify_dkim(signed, dnsfunc())
    assert result.result == "pass"
    assert props(result)["header.a"] == "ed25519-sha256"


def test_rsa_and_ed25519_side_by_side():
    signed = (sign(MESSAGE, "ed", "a.test", ed25519_key("a")[0], b"ed25519-sha256")
              + sign(MESSAGE, "s1", "a.test", rsa_key("a")[0]) + MESSAGE)
    assert [r.result for r in verify_dkim(signed, dnsfunc())] == ["pass", "pass"]


def test_no_signature_is_one_none():
    assert verify_dkim(MESSAGE, dnsfunc()) == [AuthResult("dkim", "none")]


def test_dns_temporary_failure_is_temperror():
    lookup = FakeLookup({("s1._domainkey.a.test", "TXT"): DnsTempError("SERVFAIL")})
    signed = sign(MESSAGE, "s1", "a.test", rsa_key("a")[0]) + MESSAGE
    [result] = verify_dkim(signed, dkim_dnsfunc(lookup))
    assert result.result == "temperror"
    assert props(result)["header.d"] == "a.test"


def test_missing_or_broken_key_is_permerror():
    signed = sign(MESSAGE, "s1", "a.test", rsa_key("a")[0]) + MESSAGE
    [missing] = verify_dkim(signed, dkim_dnsfunc(FakeLookup()))
    assert missing.result == "permerror"
    broken = FakeLookup({("s1._domainkey.a.test", "TXT"): [b"v=DKIM1; k=rsa; p=AAAA"]})
    [result] = verify_dkim(signed, dkim_dnsfunc(broken))
    assert result.result == "permerror"


def test_unparseable_signatures_are_permerror_and_do_not_stop_the_others():
    good = sign(MESSAGE, "s1", "a.test", rsa_key("a")[0])
    garbage = [b"DKIM-Signature: this is not a tag list\r\n",
               b"DKIM-Signature: v=1; a=rsa-sha256; d=x.test; s=s; h=from\r\n",  # no b=, bh=
               b"DKIM-Signature: v=1; a=rot13; d=x.test; s=s; h=from; bh=AAAA; b=AAAA\r\n"]
    results = verify_dkim(b"".join(garbage) + good + MESSAGE, dnsfunc())
    assert [r.result for r in results] == ["permerror", "permerror", "permerror", "pass"]
    assert props(results[1])["header.d"] == "x.test"


@pytest.mark.parametrize("message", [
    b"",
    b"no header at all",
    b"\xff\xfe: \x00\r\n\r\n",
    b"DKIM-Signature: \xff\xfe\x80; d=\xff\r\nFrom: a@a.test\r\n\r\nbody",
    b"DKIM-Signature: v=1; d=a.test; s=s1; h=" + b"from:" * 20000 + b"\r\n\r\n",
    b"From: a@a.test\r\n" + b"X-Long: " + b"a" * 200000 + b"\r\n\r\nbody",
    b"DKIM-Signature: v=1\r\n\tno colon line\r\nbroken header line\r\n\r\n",
], ids=lambda m: f"{len(m)}-bytes")
def test_hostile_messages_never_raise(message):
    results = verify_dkim(message, dnsfunc())
    assert results and all(r.result in ("none", "permerror", "neutral", "fail") for r in results)
    assert verify_arc(message, dnsfunc()).result in ("none", "fail")


def test_too_many_signatures_are_summarised():
    good = sign(MESSAGE, "s1", "a.test", rsa_key("a")[0])
    results = verify_dkim(good * 12 + MESSAGE, dnsfunc())
    assert [r.result for r in results] == ["pass"] * 10 + ["neutral"]


def test_dnsfunc_adaptor():
    lookup = FakeLookup({("s._domainkey.a.test", "TXT"): [b"v=DKIM1; p=first", b"second"],
                         ("t._domainkey.a.test", "TXT"): DnsTempError("timeout")})
    fn = dkim_dnsfunc(lookup, timeout=3)
    assert fn(b"s._domainkey.a.test.", timeout=5) == b"v=DKIM1; p=first"
    assert fn(b"none._domainkey.a.test.") is None
    assert fn(b"\xff._domainkey.a.test.") is None
    with pytest.raises(DkimDnsTempError):
        fn(b"t._domainkey.a.test.")


# -- ARC ---------------------------------------------------------------------------------------
def arc_zone():
    lookup = zone()
    lookup.add("arc._domainkey.relay.test", "TXT", [rsa_key("relay")[1]])
    lookup.add("arc._domainkey.list.test", "TXT", [rsa_key("list")[1]])
    return lookup


def seal_hop(message, authserv_id, domain, results):
    ar = build_header(authserv_id, results).encode() + b"\r\n"
    with_ar = ar + message
    return arc_seal(with_ar, "arc", domain, rsa_key(domain.split(".")[0])[0], authserv_id) \
        + with_ar


def test_arc_absent_is_none():
    assert verify_arc(MESSAGE, dkim_dnsfunc(arc_zone())) == AuthResult("arc", "none")


def test_arc_sealed_chain_validates_and_tampering_fails():
    signed = sign(MESSAGE, "s1", "a.test", rsa_key("a")[0]) + MESSAGE
    hop1 = seal_hop(signed, "relay.test", "relay.test",
                    [AuthResult("dkim", "pass", "", (("header.d", "a.test"),)),
                     AuthResult("arc", "none")])
    assert hop1.startswith(b"ARC-Seal: i=1; cv=none")
    assert b"ARC-Message-Signature: i=1" in hop1 and b"ARC-Authentication-Results: i=1" in hop1
    assert verify_arc(hop1, dkim_dnsfunc(arc_zone())).result == "pass"

    # A second hop validates the first and seals again with cv=pass.
    hop2 = seal_hop(hop1, "list.test", "list.test", [AuthResult("arc", "pass")])
    assert hop2.startswith(b"ARC-Seal: i=2; cv=pass")
    assert verify_arc(hop2, dkim_dnsfunc(arc_zone())).result == "pass"

    tampered = hop2.replace(b"see you", b"send money")
    result = verify_arc(tampered, dkim_dnsfunc(arc_zone()))
    assert result.result == "fail"


def test_arc_temp_dns_failure_is_fail_with_a_reason():
    signed = seal_hop(MESSAGE, "relay.test", "relay.test", [AuthResult("arc", "none")])
    lookup = FakeLookup({("arc._domainkey.relay.test", "TXT"): DnsTempError("timeout")})
    result = verify_arc(signed, dkim_dnsfunc(lookup))
    assert result.result == "fail" and "temporary" in result.reason


def test_arc_seal_needs_our_authentication_results():
    assert arc_seal(MESSAGE, "arc", "relay.test", rsa_key("relay")[0], "relay.test") == b""
    other = build_header("someone.else", [AuthResult("arc", "none")]).encode() + b"\r\n"
    assert arc_seal(other + MESSAGE, "arc", "relay.test", rsa_key("relay")[0],
                    "relay.test") == b""
    # The authserv-id is compared without regard to case.
    ours = build_header("Relay.Test", [AuthResult("arc", "none")]).encode() + b"\r\n"
    assert arc_seal(ours + MESSAGE, "arc", "relay.test", rsa_key("relay")[0],
                    "RELAY.test").startswith(b"ARC-Seal: i=1")
    with pytest.raises(dkim.KeyFormatError):
        arc_seal(ours + MESSAGE, "arc", "relay.test", b"not a key", "relay.test")

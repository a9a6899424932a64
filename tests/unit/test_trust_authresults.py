"""Authentication-Results: written by build_header, read back by authres; forged ones removed."""
from __future__ import annotations

import re

import authres
import pytest

from mailsuite.trust import AuthResult
from mailsuite.trust.authresults import authserv_id_of, build_header, strip_ours

RESULTS = [
    AuthResult("spf", "pass", "", (("smtp.mailfrom", "alice@a.test"),)),
    AuthResult("dkim", "pass", "", (("header.d", "a.test"), ("header.i", "@a.test"),
                                    ("header.s", "s1"), ("header.a", "rsa-sha256"),
                                    ("header.b", "abc+/def"))),
    AuthResult("dkim", "fail", "body hash did not verify",
               (("header.d", "b.test"), ("header.s", "s2"))),
    AuthResult("arc", "none"),
    AuthResult("dmarc", "pass", "p=reject", (("header.from", "a.test"),
                                             ("policy.dmarc", "none"))),
]


def unfold(field: str) -> str:
    return re.sub(r"\r\n(?=[ \t])", "", field)


def parse(field: str):
    return authres.AuthenticationResultsHeader.parse(unfold(field))


def test_written_field_parses_back_with_authres():
    field = build_header("mx.example.org", RESULTS)
    assert field.startswith("Authentication-Results: mx.example.org;")
    assert not field.endswith("\r\n")
    lines = field.split("\r\n")
    assert len(lines) > 1
    assert all(len(line) <= 78 for line in lines)
    assert all(line[0] in " \t" for line in lines[1:])
    header = parse(field)
    assert header.authserv_id == "mx.example.org"
    assert [(r.method, r.result) for r in header.results] == [
        ("spf", "pass"), ("dkim", "pass"), ("dkim", "fail"), ("arc", "none"), ("dmarc", "pass")]
    spf, dkim_ok, dkim_bad, _, dmarc = header.results
    assert spf.smtp_mailfrom == "alice@a.test"
    assert (dkim_ok.header_d, dkim_ok.header_s) == ("a.test", "s1")
    assert {(p.type, p.name): p.value for p in dkim_ok.properties}[("header", "b")] == "abc+/def"
    assert dkim_bad.reason == "body hash did not verify"
    props = {(p.type, p.name): p.value for p in dmarc.properties}
    assert props == {("header", "from"): "a.test", ("policy", "dmarc"): "none"}


def test_parse_value_works_too_and_all_features_know_dmarc_and_arc():
    field = build_header("mx.example.org", RESULTS)
    value = unfold(field).split(": ", 1)[1]
    assert authres.AuthenticationResultsHeader.parse_value(value).authserv_id == "mx.example.org"
    header = authres.all_features().parse(unfold(field))
    assert header.results[4].header_from == "a.test"


def test_no_results_is_none():
    field = build_header("mx.example.org", [])
    assert field == "Authentication-Results: mx.example.org; none"
    assert parse(field).results == []


@pytest.mark.parametrize("value", [
    '"evil; dkim=pass"@a.test', "a;dkim=pass@a.test", "x@y.test; dmarc=pass",
    "caf\u00e9@a.test", "(comment)@a.test", "a\r\nX-Injected: 1@a.test", "", "@",
])
def test_hostile_values_cannot_add_clauses_or_lines(value):
    results = [AuthResult("spf", "fail", 'reason "with" quotes; dmarc=pass',
                          (("smtp.mailfrom", value),)),
               AuthResult("dmarc", "fail", "", (("header.from", value),))]
    field = build_header("mx.example.org", results)
    assert "\n" not in unfold(field).replace("\r\n", "")
    assert all(line.isascii() for line in field.split("\r\n"))
    header = parse(field)
    assert [(r.method, r.result) for r in header.results] == [("spf", "fail"), ("dmarc", "fail")]


def test_bad_method_result_and_property_names_are_neutralised():
    field = build_header("mx.example.org", [
        AuthResult("spf; dkim", "pass; x", "", (("bogus.type", "v"), ("smtp", "v"),
                                                ("smtp.mail from", "v")))])
    header = parse(field)
    assert [(r.method, r.result, r.properties) for r in header.results] == [
        ("x-unknown", "permerror", [])]


def test_authserv_id_must_be_a_token():
    with pytest.raises(ValueError):
        build_header("mx example; org", RESULTS)


# -- strip_ours --------------------------------------------------------------------------------
SECTION = (
    b"Received: from a by b\r\n"
    b"Authentication-Results: MX.Example.Org;\r\n"
    b"\tspf=pass smtp.mailfrom=forged@a.test;\r\n"
    b"\tdkim=pass header.d=a.test\r\n"
    b"ARC-Authentication-Results: i=1; mx.example.org; arc=none\r\n"
    b"Authentication-Results: other.example.net; spf=fail smtp.mailfrom=x@y.test\r\n"
    b"authentication-results :(a comment (nested)) mx.example.org; dkim=pass\r\n"
    b'Authentication-Results: "mx.example.org"; dmarc=pass\r\n'
    b"Authentication-Results: mx.example.org garbage that is not a field\r\n"
    b"Authentication-Results: mx.example.org.\r\n"
    b"Authentication-Results: mx.example.org.evil.test; spf=pass\r\n"
    b"Authentication-Results: \xff\xfe mx.example.org\r\n"
    b"Authentication-Results:mx.example.org;spf=pass\r\n"
    b"Subject: hi\r\n"
    b"X-Authentication-Results: mx.example.org; spf=pass\r\n"
)


def test_strip_ours_removes_every_field_with_our_id_and_keeps_the_rest():
    out = strip_ours(SECTION, "mx.example.org")
    assert out == (
        b"Received: from a by b\r\n"
        b"ARC-Authentication-Results: i=1; mx.example.org; arc=none\r\n"
        b"Authentication-Results: other.example.net; spf=fail smtp.mailfrom=x@y.test\r\n"
        b"Authentication-Results: mx.example.org.evil.test; spf=pass\r\n"
        b"Authentication-Results: \xff\xfe mx.example.org\r\n"
        b"Subject: hi\r\n"
        b"X-Authentication-Results: mx.example.org; spf=pass\r\n")


def test_strip_ours_is_case_insensitive_on_our_id_and_leaves_the_body():
    message = SECTION + b"\r\nAuthentication-Results: mx.example.org; body line\r\n"
    out = strip_ours(message, "MX.EXAMPLE.ORG")
    assert out.endswith(b"Subject: hi\r\nX-Authentication-Results: mx.example.org; spf=pass"
                        b"\r\n\r\nAuthentication-Results: mx.example.org; body line\r\n")
    assert out.count(b"Authentication-Results: mx.example.org;") == 1 + 1  # X- and body


def test_strip_ours_with_bare_lf_and_a_last_folded_field():
    section = (b"Authentication-Results: mx.example.org;\n spf=pass\n"
               b"Subject: x\n"
               b"Authentication-Results: mx.example.org;\n\tdkim=none")
    assert strip_ours(section, "mx.example.org") == b"Subject: x\n"


def test_strip_ours_keeps_fields_without_an_id():
    section = (b"Authentication-Results: (unclosed comment mx.example.org\r\n"
               b"Authentication-Results:\r\n"
               b"Authentication-Results: ;spf=pass\r\n")
    assert strip_ours(section, "mx.example.org") == section
    assert strip_ours(section, "") == section


@pytest.mark.parametrize("value,expected", [
    (b" mx.example.org; spf=pass", b"mx.example.org"),
    (b"(c) (d (e)) MX.example.org (x); none", b"mx.example.org"),
    (b'"mx.example.org"; none', b"mx.example.org"),
    (b"mx.example.org(c); none", b"mx.example.org"),
    (b"  ", None),
    (b"(x", None),
])
def test_authserv_id_of(value, expected):
    assert authserv_id_of(value) == expected

"""The reports we build (mailsuite/reports/outbound.py): the aggregate XML in the shape of RFC
7489 appendix C's schema, the RFC 8460 JSON, and the two messages (subject, fields, parts,
attachment names); each read back by our own parser."""
from __future__ import annotations

import email
import email.policy
import gzip
import json
import xml.etree.ElementTree as ET

from mailsuite.reports.inbound import parse_dmarc, parse_tlsrpt, reports_in_message
from mailsuite.reports.outbound import (DmarcRow, Meta, TlsRow, dmarc_message, dmarc_xml,
                                        tlsrpt_json, tlsrpt_message)
from mailsuite.trust.dmarc import DmarcRecord

META = Meta("mx.a.test", "reports@a.test", "2026-11-27.b.test.mx.a.test", 1795737600,
            1795737600 + 86399)
ROWS = [
    DmarcRow("192.0.2.1", 5, "none", "pass", "pass", "", "b.test", "b.test",
             (("b.test", "mail-ed", "pass"),), ("b.test", "mfrom", "pass")),
    DmarcRow("198.51.100.9", 2, "reject", "fail", "fail", "", "b.test", "spoof.test", (),
             ("spoof.test", "mfrom", "fail")),
    DmarcRow("198.51.100.10", 1, "quarantine", "fail", "fail", "sampled_out", "sub.b.test",
             "x.test", (("x.test", "", "fail"),), ("x.test", "helo", "none")),
]

# RFC 7489 appendix C, as (element, children in order, which of them are required); "*" marks
# elements that may repeat. Checked by walking the document.
SCHEMA = {
    "feedback": (["version", "report_metadata", "policy_published", "record*"],
                 {"version", "report_metadata", "policy_published", "record"}),
    "report_metadata": (["org_name", "email", "extra_contact_info", "report_id", "date_range",
                         "error*"], {"org_name", "email", "report_id", "date_range"}),
    "date_range": (["begin", "end"], {"begin", "end"}),
    "policy_published": (["domain", "adkim", "aspf", "p", "sp", "pct", "fo"],
                         {"domain", "p", "sp", "pct", "fo"}),
    "record": (["row", "identifiers", "auth_results"], {"row", "identifiers", "auth_results"}),
    "row": (["source_ip", "count", "policy_evaluated"], {"source_ip", "count",
                                                          "policy_evaluated"}),
    "policy_evaluated": (["disposition", "dkim", "spf", "reason*"],
                         {"disposition", "dkim", "spf"}),
    "reason": (["type", "comment"], {"type"}),
    "identifiers": (["envelope_to", "envelope_from", "header_from"],
                    {"envelope_from", "header_from"}),
    "auth_results": (["dkim*", "spf*"], {"spf"}),
    "dkim": (["domain", "selector", "result", "human_result"], {"domain", "result"}),
    "spf": (["domain", "scope", "result"], {"domain", "scope", "result"}),
}
ENUMS = {"disposition": {"none", "quarantine", "reject"}, "p": {"none", "quarantine", "reject"},
         "sp": {"none", "quarantine", "reject"}, "adkim": {"r", "s"}, "aspf": {"r", "s"},
         "scope": {"helo", "mfrom"}, "type": {"forwarded", "sampled_out", "trusted_forwarder",
                                              "mailing_list", "local_policy", "other"}}


def check_shape(element: ET.Element, parent: str = "") -> None:
    name = element.tag
    if name in SCHEMA and not (name in ("dkim", "spf") and parent == "policy_evaluated"):
        order, required = SCHEMA[name]
        names = [n.rstrip("*") for n in order]
        children = [c.tag for c in element]
        assert set(children) <= set(names), (name, children)
        positions = [names.index(c) for c in children]
        assert positions == sorted(positions), f"<{name}> children out of order: {children}"
        assert required <= set(children), f"<{name}> lacks {required - set(children)}"
        for c in children:
            assert f"{c}*" in order or children.count(c) == 1, f"<{c}> repeated in <{name}>"
    elif name in ("dkim", "spf") and parent == "policy_evaluated":
        assert element.text in ("pass", "fail")
    if name in ENUMS and parent != "auth_results":
        assert element.text in ENUMS[name], (name, element.text)
    if name in ("begin", "end", "count", "pct"):
        assert element.text.isdigit()
    for child in element:
        check_shape(child, name)


def test_dmarc_xml_has_the_schema_shape():
    document = dmarc_xml(META, "b.test", DmarcRecord(p="reject", sp="quarantine", pct=50,
                                                     adkim="s"), ROWS)
    root = ET.fromstring(document)
    check_shape(root)
    assert document.startswith(b"<?xml version='1.0' encoding='utf-8'?>")
    assert root.findtext("policy_published/sp") == "quarantine"
    assert root.findtext("policy_published/pct") == "50"
    assert [r.findtext("row/count") for r in root.findall("record")] == ["5", "2", "1"]
    assert root.find("record[3]/row/policy_evaluated/reason/type").text == "sampled_out"
    assert root.find("record[2]/auth_results/dkim") is None  # no signature, no <dkim>


def test_the_shape_check_can_fail():
    """The checker above finds a missing element and a wrong order."""
    import pytest

    broken = ET.fromstring(b"<feedback><version>1.0</version><report_metadata><email>x"
                           b"</email><org_name>o</org_name></report_metadata></feedback>")
    with pytest.raises(AssertionError):
        check_shape(broken)


def test_dmarc_xml_escapes_what_it_is_given():
    row = DmarcRow("192.0.2.1", 1, "none", "pass", "pass", "", "b.test",
                   "a<b>&c.test", (), ("a<b>&c.test", "mfrom", "pass"))
    document = dmarc_xml(META, "b.test", DmarcRecord(p="none"), [row])
    assert b"a&lt;b&gt;&amp;c.test" in document
    assert parse_dmarc(document).records[0].envelope_from == "a<b>&c.test"


def test_dmarc_xml_reads_back():
    report = parse_dmarc(dmarc_xml(META, "b.test", DmarcRecord(p="reject"), ROWS))
    assert (report.org_name, report.report_id, report.domain) == (
        "mx.a.test", META.report_id, "b.test")
    assert [(r.source_ip, r.count) for r in report.records] == [
        ("192.0.2.1", 5), ("198.51.100.9", 2), ("198.51.100.10", 1)]


def test_dmarc_message():
    raw = dmarc_message(META, "reports@a.test", ["dmarc@b.test"], "b.test",
                        dmarc_xml(META, "b.test", DmarcRecord(p="none"), ROWS), META.end + 600)
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message["Subject"] == (f"Report Domain: b.test Submitter: a.test "
                                  f"Report-ID: <{META.report_id}>")
    assert message["From"] == "reports@a.test" and message["To"] == "dmarc@b.test"
    [attachment] = list(message.iter_attachments())
    assert attachment.get_content_type() == "application/gzip"
    assert attachment.get_filename() == f"a.test!b.test!{META.begin}!{META.end}.xml.gz"
    assert gzip.decompress(attachment.get_content()).startswith(b"<?xml")
    [report] = reports_in_message(raw)
    assert report.domain == "b.test"


def test_tlsrpt_json_fields():
    rows = [TlsRow("mx.b.test", "192.0.2.7", "success", 7),
            TlsRow("mx.b.test", "192.0.2.7", "starttls-not-supported", 2),
            TlsRow("mx2.b.test", "192.0.2.8", "certificate-expired", 1)]
    data = json.loads(tlsrpt_json(META, {"b.test": rows}))
    assert data["organization-name"] == "mx.a.test"
    assert data["date-range"] == {"start-datetime": "2026-11-27T00:00:00Z",
                                  "end-datetime": "2026-11-27T23:59:59Z"}
    [policy] = data["policies"]
    assert policy["policy"] == {"policy-type": "no-policy-found", "policy-domain": "b.test",
                                "mx-host": ["mx.b.test", "mx2.b.test"]}
    assert policy["summary"] == {"total-successful-session-count": 7,
                                 "total-failure-session-count": 3}
    assert [(f["result-type"], f["failed-session-count"]) for f in policy["failure-details"]] == [
        ("starttls-not-supported", 2), ("certificate-expired", 1)]
    report = parse_tlsrpt(tlsrpt_json(META, {"b.test": rows}))
    assert sum(r.sessions for r in report.results if r.result_type != "success") == 3


def test_tlsrpt_message_follows_rfc8460_section_5_3():
    report = tlsrpt_json(META, {"b.test": [TlsRow("mx.b.test", "192.0.2.7", "success", 1)]})
    raw = tlsrpt_message(META, "reports@a.test", ["tls@b.test"], "b.test", report, META.end)
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    assert message["TLS-Report-Domain"] == "b.test"
    assert message["TLS-Report-Submitter"] == "a.test"
    assert message["Subject"].startswith("Report Domain: b.test Submitter: a.test Report-ID: <")
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "application/tlsrpt+gzip"]
    assert parts[1].get_filename() == (f"a.test!b.test!{META.begin}!{META.end}!"
                                       f"{META.report_id}.json.gz")
    assert json.loads(gzip.decompress(parts[1].get_content()))["report-id"] == META.report_id

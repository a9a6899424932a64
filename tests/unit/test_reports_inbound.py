"""Reading received reports (mailsuite/reports/inbound.py): real-world-shaped samples (written
by hand after what large receivers send) and hostile input, which must end in a ReportError
within the bounds, never in memory blow-up, a network fetch or a traceback."""
from __future__ import annotations

import gzip
import io
import zipfile
from email.message import EmailMessage

import pytest

from mailsuite.reports import ReceivedDmarc, ReceivedTls
from mailsuite.reports import inbound
from mailsuite.reports.inbound import ReportError, parse_dmarc, parse_tlsrpt, reports_in_message

# Shaped like a large mailbox provider's report: a namespace on the root, extra whitespace,
# two records, one failing from an address that is not ours, two DKIM results.
DMARC_XML = b"""<?xml version="1.0" encoding="UTF-8" ?>
<feedback xmlns="urn:ietf:params:xml:ns:dmarc-2.0">
  <report_metadata>
    <org_name>big-provider.example</org_name>
    <email>noreply-dmarc-support@big-provider.example</email>
    <extra_contact_info>https://support.big-provider.example/dmarc</extra_contact_info>
    <report_id>16436352112345678901</report_id>
    <date_range><begin>1700006400</begin><end>1700092799</end></date_range>
  </report_metadata>
  <policy_published>
    <domain>Example.ORG</domain><adkim>r</adkim><aspf>r</aspf>
    <p>quarantine</p><sp>quarantine</sp><pct>100</pct><np>quarantine</np>
  </policy_published>
  <record>
    <row>
      <source_ip>192.0.2.25</source_ip><count>12</count>
      <policy_evaluated><disposition>none</disposition><dkim>pass</dkim><spf>pass</spf>
      </policy_evaluated>
    </row>
    <identifiers><header_from>example.org</header_from></identifiers>
    <auth_results>
      <dkim><domain>example.org</domain><selector>mail-ed</selector><result>pass</result></dkim>
      <dkim><domain>example.org</domain><selector>mail-rsa</selector><result>pass</result></dkim>
      <spf><domain>example.org</domain><result>pass</result></spf>
    </auth_results>
  </record>
  <record>
    <row>
      <source_ip>2001:db8::bad</source_ip><count>3</count>
      <policy_evaluated><disposition>quarantine</disposition><dkim>fail</dkim><spf>fail</spf>
      </policy_evaluated>
    </row>
    <identifiers><envelope_from>spoof.example</envelope_from><header_from>example.org</header_from>
    </identifiers>
    <auth_results><spf><domain>spoof.example</domain><scope>mfrom</scope><result>softfail</result>
    </spf></auth_results>
  </record>
</feedback>
"""

# RFC 8460 §4.4's example, shortened: one policy with successes and two failure details.
TLSRPT_JSON = b"""{
  "organization-name": "Company-X",
  "date-range": {"start-datetime": "2016-04-01T00:00:00Z",
                 "end-datetime": "2016-04-01T23:59:59Z"},
  "contact-info": "sts-reporting@company-x.example",
  "report-id": "5065427c-23d3-47ca-b6e0-946ea0e8c4be",
  "policies": [{
    "policy": {"policy-type": "sts", "policy-string": ["version: STSv1", "mode: testing"],
               "policy-domain": "company-y.example", "mx-host": ["*.mail.company-y.example"]},
    "summary": {"total-successful-session-count": 5326, "total-failure-session-count": 303},
    "failure-details": [
      {"result-type": "certificate-expired", "sending-mta-ip": "2001:db8:abcd:0012::1",
       "receiving-mx-hostname": "mx1.mail.company-y.example", "failed-session-count": 100},
      {"result-type": "starttls-not-supported", "sending-mta-ip": "2001:db8:abcd:0013::1",
       "receiving-mx-hostname": "mx2.mail.company-y.example",
       "receiving-ip": "203.0.113.56", "failed-session-count": 200,
       "additional-information": "https://reports.company-x.example/report_info?id=5065427c"}]
  }]
}"""


def mail_with(attachment: bytes, maintype: str, subtype: str, filename: str) -> bytes:
    message = EmailMessage()
    message["From"] = "noreply@big-provider.example"
    message["To"] = "reports@example.org"
    message["Subject"] = "Report Domain: example.org Submitter: big-provider.example"
    message.set_content("This is an aggregate report.\n")
    message.add_attachment(attachment, maintype=maintype, subtype=subtype, filename=filename)
    return message.as_bytes()


def zipped(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return buffer.getvalue()


# -- real-world shapes -------------------------------------------------------------------------
def test_dmarc_report_fields_and_records():
    report = parse_dmarc(DMARC_XML)
    assert (report.org_name, report.report_id, report.domain, report.policy) == (
        "big-provider.example", "16436352112345678901", "example.org", "quarantine")
    assert (report.begin, report.end) == (1700006400, 1700092799)
    good, bad = report.records
    assert (good.source_ip, good.count, good.dkim, good.spf) == ("192.0.2.25", 12, "pass", "pass")
    assert "mail-ed" in good.auth_results and "mail-rsa" in good.auth_results
    assert (bad.source_ip, bad.count, bad.disposition) == ("2001:db8::bad", 3, "quarantine")
    assert bad.envelope_from == "spoof.example" and bad.header_from == "example.org"


@pytest.mark.parametrize("wrap", [
    lambda x: mail_with(gzip.compress(x), "application", "gzip",
                        "big-provider.example!example.org!1700006400!1700092799.xml.gz"),
    lambda x: mail_with(zipped("report.xml", x), "application", "zip",
                        "big-provider.example!example.org!1700006400!1700092799.zip"),
    # Some reporters send application/octet-stream and rely on the file name.
    lambda x: mail_with(gzip.compress(x), "application", "octet-stream", "r.xml.gz"),
    lambda x: mail_with(x, "text", "xml", "r.xml"),
])
def test_dmarc_report_in_each_attachment_form(wrap):
    [report] = reports_in_message(wrap(DMARC_XML))
    assert isinstance(report, ReceivedDmarc) and len(report.records) == 2


def test_tlsrpt_report_summary_and_failures():
    report = parse_tlsrpt(TLSRPT_JSON)
    assert (report.org_name, report.contact) == ("Company-X", "sts-reporting@company-x.example")
    assert report.begin == 1459468800 and report.end == 1459468800 + 86399
    rows = {(r.result_type, r.receiving_mx_hostname): r.sessions for r in report.results}
    assert rows == {("success", ""): 5326,
                    ("certificate-expired", "mx1.mail.company-y.example"): 100,
                    ("starttls-not-supported", "mx2.mail.company-y.example"): 200,
                    ("unspecified", ""): 3}  # the summary counts 303 failures, details 300
    assert {r.policy_domain for r in report.results} == {"company-y.example"}


def test_tlsrpt_report_as_rfc8460_mail():
    [report] = reports_in_message(mail_with(gzip.compress(TLSRPT_JSON), "application",
                                            "tlsrpt+gzip", "x!company-y.example!1!2.json.gz"))
    assert isinstance(report, ReceivedTls)


def test_a_message_without_report_gives_nothing():
    message = EmailMessage()
    message["Subject"] = "hello"
    message.set_content("no report here")
    assert reports_in_message(message.as_bytes()) == []


# -- hostile input -----------------------------------------------------------------------------
BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<feedback><report_metadata><org_name>&lol3;</org_name></report_metadata></feedback>"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE feedback [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<feedback><report_metadata><org_name>&secret;</org_name></report_metadata></feedback>"""


@pytest.mark.parametrize("document", [BILLION_LAUGHS, EXTERNAL_ENTITY], ids=["laughs", "xxe"])
def test_entities_and_dtds_are_refused(document):
    # defusedxml's refusal, before any expansion or fetch (not expat's own amplification limit)
    with pytest.raises(ReportError, match="not acceptable XML: DTDForbidden"):
        parse_dmarc(document)


def test_gzip_bomb_stops_at_the_limit(monkeypatch):
    bomb = gzip.compress(b"<" + b" " * (8 * 1024 * 1024))  # 8 MiB of spaces, ~8 KiB sent
    with pytest.raises(ReportError, match="larger than 1048576 octets uncompressed"):
        inbound.gunzip(bomb, limit=1024 * 1024)
    monkeypatch.setattr(inbound, "MAX_DOCUMENT", 1024 * 1024)
    with pytest.raises(ReportError, match="uncompressed"):
        reports_in_message(mail_with(bomb, "application", "gzip", "bomb.xml.gz"))


def test_zip_bomb_stops_at_the_limit():
    bomb = zipped("report.xml", b" " * (4 * 1024 * 1024))
    with pytest.raises(ReportError, match="uncompressed"):
        inbound.unzip(bomb, limit=1024 * 1024)


def test_zip_whose_directory_lies_about_the_size():
    """The size in the zip directory is the sender's word: the real member is read only up to
    the limit, whatever the directory claims."""
    data = bytearray(zipped("r.xml", b"x" * 100_000))
    # Patch the central directory's uncompressed size (offset 24 in the entry) to 10 octets.
    central = data.rfind(b"PK\x01\x02")
    data[central + 24:central + 28] = (10).to_bytes(4, "little")
    with pytest.raises(ReportError):
        inbound.unzip(bytes(data), limit=50_000)


def test_oversized_message_and_attachment(monkeypatch):
    monkeypatch.setattr(inbound, "MAX_MESSAGE", 1000)
    with pytest.raises(ReportError, match="message larger"):
        reports_in_message(b"Subject: x\r\n\r\n" + b"a" * 2000)
    monkeypatch.setattr(inbound, "MAX_MESSAGE", 10 * 1024 * 1024)
    monkeypatch.setattr(inbound, "MAX_COMPRESSED", 100)
    with pytest.raises(ReportError, match="attachment larger"):
        reports_in_message(mail_with(gzip.compress(DMARC_XML), "application", "gzip", "r.gz"))


def test_too_many_records(monkeypatch):
    monkeypatch.setattr(inbound, "MAX_RECORDS", 1)
    with pytest.raises(ReportError, match="more than 1 records"):
        parse_dmarc(DMARC_XML)
    with pytest.raises(ReportError, match="more than 1 policies"):
        parse_tlsrpt(TLSRPT_JSON)


@pytest.mark.parametrize("document, why", [
    (b"<html><body>hi</body></html>", "not <feedback>"),
    (b"<feedback><report_metadata/></feedback>", "no <policy_published>"),
    (DMARC_XML.replace(b"192.0.2.25", b"not-an-ip"), "not an IP address"),
    (DMARC_XML.replace(b"<count>12", b"<count>-12"), "out of range"),
    (DMARC_XML.replace(b"<count>12", b"<count>lots"), "not a number"),
    (b"<feedback", "not acceptable XML"),
    (b"\xff\xfe<\x00", "not acceptable XML"),
])
def test_malformed_dmarc(document, why):
    with pytest.raises(ReportError, match=why):
        parse_dmarc(document)


@pytest.mark.parametrize("document, why", [
    (b"[1, 2]", "JSON object"),
    (b"{", "not JSON"),
    (b"[" * 100000, "not JSON|JSON object"),
    (TLSRPT_JSON.replace(b'"report-id"', b'"x"'), "report-id"),
    (TLSRPT_JSON.replace(b"5326", b"-1"), "session count"),
    (TLSRPT_JSON.replace(b"5326", b"true"), "session count"),
    (TLSRPT_JSON.replace(b"2016-04-01T00:00:00Z", b"yesterday"), "RFC 3339"),
    (TLSRPT_JSON.replace(b'"company-y.example"', b'"bad domain"'), "not a domain"),
])
def test_malformed_tlsrpt(document, why):
    with pytest.raises(ReportError, match=why):
        parse_tlsrpt(document)


def test_control_characters_are_not_kept():
    report = parse_dmarc(DMARC_XML.replace(b"big-provider.example</org_name>",
                                           b"evil&#x85;[31m</org_name>"))
    assert "\x85" not in report.org_name and report.org_name.startswith("evil?")

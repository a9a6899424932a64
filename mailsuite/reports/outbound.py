"""Building the reports we send: the DMARC aggregate XML (RFC 7489 appendix C) and the TLS-RPT
JSON (RFC 8460 §4.4), gzipped, each in the message its RFC describes (RFC 7489 §7.2.1.1,
RFC 8460 §5.3). Pure functions over plain data; the sender decides what goes in.
"""
from __future__ import annotations

import gzip
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timezone
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid

from mailsuite.trust.dmarc import DmarcRecord


@dataclass(frozen=True)
class DmarcRow:
    """One <record>: the evaluations that agree on everything but the message, and how many."""

    source_ip: str
    count: int
    disposition: str
    dkim: str
    spf: str
    reason: str
    header_from: str
    envelope_from: str
    dkim_results: tuple[tuple[str, str, str], ...]
    spf_result: tuple[str, str, str]


@dataclass(frozen=True)
class TlsRow:
    """Sessions to one policy domain's MX address with one result."""

    mx_host: str
    receiving_ip: str
    result_type: str
    count: int


@dataclass(frozen=True)
class Meta:
    """Who reports, about which period: what both kinds of report begin with."""

    org_name: str
    contact: str  # our report address
    report_id: str
    begin: int  # Unix seconds, inclusive
    end: int  # Unix seconds, the last second of the period


# -- DMARC ---------------------------------------------------------------------------------------
def dmarc_xml(meta: Meta, domain: str, record: DmarcRecord, rows: list[DmarcRow]) -> bytes:
    """The aggregate report: elements in the order and with the names of the RFC's schema."""
    root = ET.Element("feedback")
    _sub(root, "version", "1.0")
    metadata = _sub(root, "report_metadata")
    _sub(metadata, "org_name", meta.org_name)
    _sub(metadata, "email", meta.contact)
    _sub(metadata, "report_id", meta.report_id)
    dates = _sub(metadata, "date_range")
    _sub(dates, "begin", str(meta.begin))
    _sub(dates, "end", str(meta.end))
    policy = _sub(root, "policy_published")
    _sub(policy, "domain", domain)
    _sub(policy, "adkim", record.adkim)
    _sub(policy, "aspf", record.aspf)
    _sub(policy, "p", record.p)
    _sub(policy, "sp", record.sp or record.p)
    _sub(policy, "pct", str(record.pct))
    _sub(policy, "fo", "0")  # failure reports are not sent (docs/design/reports.md)
    for row in rows:
        rec = _sub(root, "record")
        line = _sub(rec, "row")
        _sub(line, "source_ip", row.source_ip)
        _sub(line, "count", str(row.count))
        evaluated = _sub(line, "policy_evaluated")
        _sub(evaluated, "disposition", row.disposition)
        _sub(evaluated, "dkim", row.dkim)
        _sub(evaluated, "spf", row.spf)
        if row.reason:
            _sub(_sub(evaluated, "reason"), "type", row.reason)
        identifiers = _sub(rec, "identifiers")
        _sub(identifiers, "envelope_from", row.envelope_from)
        _sub(identifiers, "header_from", row.header_from)
        auth = _sub(rec, "auth_results")
        for d, selector, result in row.dkim_results:
            dkim = _sub(auth, "dkim")
            _sub(dkim, "domain", d)
            if selector:
                _sub(dkim, "selector", selector)
            _sub(dkim, "result", result)
        spf = _sub(auth, "spf")
        _sub(spf, "domain", row.spf_result[0])
        _sub(spf, "scope", row.spf_result[1])
        _sub(spf, "result", row.spf_result[2])
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _sub(parent: ET.Element, name: str, text: str | None = None) -> ET.Element:
    element = ET.SubElement(parent, name)
    if text is not None:
        element.text = text
    return element


# -- TLS-RPT -------------------------------------------------------------------------------------
def tlsrpt_json(meta: Meta, policies: dict[str, list[TlsRow]]) -> bytes:
    """The TLS report over `policies` (policy domain -> its sessions). We apply no MTA-STS or
    DANE policy, so each domain is reported as "no-policy-found" (RFC 8460 §4.3)."""
    entries = []
    for domain, rows in sorted(policies.items()):
        mx_hosts = sorted({r.mx_host for r in rows if r.mx_host})
        ok = sum(r.count for r in rows if r.result_type == "success")
        failures = [r for r in rows if r.result_type != "success"]
        entry: dict = {
            "policy": {"policy-type": "no-policy-found", "policy-domain": domain,
                       "mx-host": mx_hosts},
            "summary": {"total-successful-session-count": ok,
                        "total-failure-session-count": sum(r.count for r in failures)}}
        if failures:
            entry["failure-details"] = [
                {"result-type": r.result_type, "receiving-mx-hostname": r.mx_host,
                 "receiving-ip": r.receiving_ip, "failed-session-count": r.count}
                for r in failures]
        entries.append(entry)
    report = {"organization-name": meta.org_name,
              "date-range": {"start-datetime": _rfc3339(meta.begin),
                             "end-datetime": _rfc3339(meta.end)},
              "contact-info": meta.contact, "report-id": meta.report_id, "policies": entries}
    return json.dumps(report, indent=1).encode("utf-8")


def _rfc3339(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the messages --------------------------------------------------------------------------------
def dmarc_message(meta: Meta, sender: str, recipients: list[str], domain: str, xml: bytes,
                  now: float) -> bytes:
    """RFC 7489 §7.2.1.1: the gzipped XML as an attachment named
    receiver!policy-domain!begin!end.xml.gz, and the subject that names both domains."""
    submitter = _domain_of(sender)
    message = _message(meta, sender, recipients, now,
                       f"Report Domain: {domain} Submitter: {submitter} "
                       f"Report-ID: <{meta.report_id}>")
    message.set_content(f"DMARC aggregate report for {domain} from {meta.org_name}, "
                        f"{_rfc3339(meta.begin)} to {_rfc3339(meta.end)}.\r\n")
    message.add_attachment(gzip.compress(xml, mtime=0), maintype="application", subtype="gzip",
                           filename=f"{submitter}!{domain}!{meta.begin}!{meta.end}.xml.gz")
    return message.as_bytes(policy=SMTP)


def tlsrpt_message(meta: Meta, sender: str, recipients: list[str], domain: str, report: bytes,
                   now: float) -> bytes:
    """RFC 8460 §5.3: multipart/report; report-type="tlsrpt", the TLS-Report-Domain and
    TLS-Report-Submitter fields, a text part, then application/tlsrpt+gzip named
    submitter!policy-domain!begin!end!id.json.gz (§5.1)."""
    submitter = _domain_of(sender)
    message = _message(meta, sender, recipients, now,
                       f"Report Domain: {domain} Submitter: {submitter} "
                       f"Report-ID: <{meta.report_id}>")
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = submitter
    message.set_content(f"SMTP TLS report for {domain} from {meta.org_name}, "
                        f"{_rfc3339(meta.begin)} to {_rfc3339(meta.end)}.\r\n")
    unique = meta.report_id.replace("!", "-").replace("/", "-")
    message.add_attachment(gzip.compress(report, mtime=0), maintype="application",
                           subtype="tlsrpt+gzip",
                           filename=f"{submitter}!{domain}!{meta.begin}!{meta.end}!{unique}"
                                    f".json.gz")
    message.set_type("multipart/report")
    message.set_param("report-type", "tlsrpt")
    return message.as_bytes(policy=SMTP)


def _message(meta: Meta, sender: str, recipients: list[str], now: float,
             subject: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = subject
    message["Date"] = format_datetime(datetime.fromtimestamp(now, timezone.utc))
    message["Message-ID"] = make_msgid(domain=_domain_of(sender))
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to a report
    return message


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()

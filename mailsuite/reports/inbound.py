"""Reading the reports other organisations send us: DMARC aggregate XML (RFC 7489 appendix C)
and TLS-RPT JSON (RFC 8460 §4.4), as attachments of a message, raw, gzip or zip.

Everything a sender controls is bounded (docs/design/reports.md, "Hostile reports"): the
message, each attachment compressed and uncompressed (decompressed in steps, never trusting a
size a header claims), the number of parts, zip members, records and policies, every string.
XML goes through defusedxml with DTDs, entities and external references refused, so a billion
laughs or an external entity is an error, not a memory or network problem. Blocking: run it in
a worker pool. Every problem is a ReportError with one line.
"""
from __future__ import annotations

import email
import email.policy
import io
import ipaddress
import json
import zipfile
import zlib
from datetime import datetime, timezone
from typing import Any, Iterator

from mailsuite.reports import (ReceivedDmarc, ReceivedDmarcRow, ReceivedTls, ReceivedTlsRow)

MAX_MESSAGE = 10 * 1024 * 1024  # a report message larger than this is not read
MAX_COMPRESSED = 5 * 1024 * 1024  # one attachment, as sent
MAX_DOCUMENT = 20 * 1024 * 1024  # one report, uncompressed
MAX_PARTS = 50  # MIME parts looked at in one message
MAX_RECORDS = 10000  # DMARC <record>s, TLS-RPT policies and failure details of one report
MAX_TEXT = 255  # characters kept of any string

_GZIP_TYPES = {"application/gzip", "application/x-gzip", "application/tlsrpt+gzip"}
_ZIP_TYPES = {"application/zip", "application/x-zip-compressed", "application/x-zip"}
_RAW_TYPES = {"text/xml", "application/xml", "application/tlsrpt+json", "application/json"}


class ReportError(Exception):
    """A report we cannot read, in one line."""


def reports_in_message(message: bytes) -> list[ReceivedDmarc | ReceivedTls]:
    """Every report attached to (or forming) `message`. Raises ReportError when a part that
    looks like a report cannot be read; a message without any report gives []."""
    if len(message) > MAX_MESSAGE:
        raise ReportError(f"message larger than {MAX_MESSAGE} octets")
    parsed = email.message_from_bytes(message, policy=email.policy.compat32)
    found: list[ReceivedDmarc | ReceivedTls] = []
    for number, part in enumerate(parsed.walk()):
        if number >= MAX_PARTS:
            break
        if part.is_multipart():
            continue
        document = _document(part)
        if document is not None:
            found.append(parse_report(document))
    return found


def parse_report(document: bytes) -> ReceivedDmarc | ReceivedTls:
    """A DMARC XML or TLS-RPT JSON document, told apart by its first character."""
    start = document.lstrip()[:1]
    if start == b"{":
        return parse_tlsrpt(document)
    if start == b"<":
        return parse_dmarc(document)
    raise ReportError("neither an XML nor a JSON report")


# -- attachments -------------------------------------------------------------------------------
def _document(part: Any) -> bytes | None:
    """The uncompressed report in a MIME part, or None when the part is not a report."""
    ctype = part.get_content_type().lower()
    name = (part.get_filename() or "").lower()
    if ctype in _GZIP_TYPES or name.endswith(".gz"):
        kind = "gzip"
    elif ctype in _ZIP_TYPES or name.endswith(".zip"):
        kind = "zip"
    elif ctype in _RAW_TYPES or name.endswith((".xml", ".json")):
        kind = "raw"
    else:
        return None
    payload = part.get_payload(decode=True) or b""
    if len(payload) > MAX_COMPRESSED:
        raise ReportError(f"attachment larger than {MAX_COMPRESSED} octets")
    if kind == "gzip":
        return gunzip(payload)
    if kind == "zip":
        return unzip(payload)
    if len(payload) > MAX_DOCUMENT:
        raise ReportError(f"report larger than {MAX_DOCUMENT} octets")
    return payload


def gunzip(data: bytes, limit: int | None = None) -> bytes:
    """gzip data, stopping as soon as the output would pass `limit` (a gzip bomb costs at most
    `limit` octets of memory, whatever its header says)."""
    limit = MAX_DOCUMENT if limit is None else limit
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as e:
        raise ReportError(f"not gzip data: {e}")
    if len(out) > limit or inflater.unconsumed_tail:
        raise ReportError(f"report larger than {limit} octets uncompressed")
    return out


def unzip(data: bytes, limit: int | None = None) -> bytes:
    """The one report of a zip archive (its first .xml or .json member), read at most `limit`
    octets far: the sizes in the archive's directory are the sender's word and not trusted."""
    limit = MAX_DOCUMENT if limit is None else limit
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist()[:MAX_PARTS] if not m.is_dir()]
        wanted = [m for m in members if m.filename.lower().endswith((".xml", ".json"))]
        if not (wanted or members):
            raise ReportError("empty zip archive")
        with archive.open((wanted or members)[0]) as member:
            out = member.read(limit + 1)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError,
            EOFError, zlib.error, ValueError) as e:
        raise ReportError(f"unreadable zip archive: {e}")
    if len(out) > limit:
        raise ReportError(f"report larger than {limit} octets uncompressed")
    return out


# -- DMARC aggregate XML -----------------------------------------------------------------------
def parse_dmarc(document: bytes) -> ReceivedDmarc:
    from defusedxml import DefusedXmlException
    from defusedxml.ElementTree import fromstring
    from xml.etree.ElementTree import ParseError

    if len(document) > MAX_DOCUMENT:
        raise ReportError(f"report larger than {MAX_DOCUMENT} octets")
    try:
        root = fromstring(document, forbid_dtd=True, forbid_entities=True,
                          forbid_external=True)
    except (DefusedXmlException, ParseError, ValueError) as e:
        raise ReportError(f"not acceptable XML: {type(e).__name__}: {_clip(str(e), 100)}")
    _strip_namespaces(root)
    if root.tag != "feedback":
        raise ReportError(f"XML root is <{_clip(root.tag, 40)}>, not <feedback>")
    meta = _need(root, "report_metadata")
    policy = _need(root, "policy_published")
    dates = _need(meta, "date_range")
    report = ReceivedDmarc(
        org_name=_need_text(meta, "org_name"), email=_text(meta, "email"),
        report_id=_need_text(meta, "report_id"), domain=_domain(_need_text(policy, "domain")),
        policy=_text(policy, "p").lower()[:10], begin=_int(_need_text(dates, "begin")),
        end=_int(_need_text(dates, "end")))
    records = root.findall("record")
    if len(records) > MAX_RECORDS:
        raise ReportError(f"more than {MAX_RECORDS} records")
    for record in records:
        row = _need(record, "row")
        evaluated = _need(row, "policy_evaluated")
        ids = _need(record, "identifiers")
        auth = record.find("auth_results")
        results: dict[str, list[list[str]]] = {"dkim": [], "spf": []}
        if auth is not None:
            for d in auth.findall("dkim")[:20]:
                results["dkim"].append([_text(d, "domain"), _text(d, "selector"),
                                        _text(d, "result")])
            for s in auth.findall("spf")[:20]:
                results["spf"].append([_text(s, "domain"), _text(s, "scope"), _text(s, "result")])
        report.records.append(ReceivedDmarcRow(
            source_ip=_ip(_need_text(row, "source_ip")), count=_int(_need_text(row, "count")),
            disposition=_text(evaluated, "disposition").lower()[:10],
            dkim=_text(evaluated, "dkim").lower()[:10], spf=_text(evaluated, "spf").lower()[:10],
            header_from=_clip(_text(ids, "header_from").lower(), 253),
            envelope_from=_clip(_text(ids, "envelope_from").lower(), 253),
            auth_results=_clip(json.dumps(results), 2000)))
    return report


def _strip_namespaces(root: Any) -> None:
    """Some reporters put the elements in a namespace; the names are what matter."""
    for element in root.iter():
        if isinstance(element.tag, str) and element.tag.startswith("{"):
            element.tag = element.tag.split("}", 1)[1]


def _need(parent: Any, name: str) -> Any:
    child = parent.find(name)
    if child is None:
        raise ReportError(f"<{parent.tag}> has no <{name}>")
    return child


def _need_text(parent: Any, name: str) -> str:
    value = _text(_need(parent, name), None)
    if not value:
        raise ReportError(f"<{name}> is empty")
    return value


def _text(parent: Any, name: str | None) -> str:
    element = parent if name is None else parent.find(name)
    if element is None or element.text is None:
        return ""
    return _clip(element.text.strip())


# -- TLS-RPT JSON ------------------------------------------------------------------------------
def parse_tlsrpt(document: bytes) -> ReceivedTls:
    if len(document) > MAX_DOCUMENT:
        raise ReportError(f"report larger than {MAX_DOCUMENT} octets")
    try:
        data = json.loads(document)
    except (ValueError, RecursionError) as e:
        raise ReportError(f"not JSON: {_clip(str(e), 100)}")
    if not isinstance(data, dict):
        raise ReportError("a TLS report is a JSON object")
    dates = _field(data, "date-range", dict)
    report = ReceivedTls(
        org_name=_clip(_field(data, "organization-name", str)),
        report_id=_clip(_field(data, "report-id", str)),
        contact=_clip(str(data.get("contact-info", "")), 320),
        begin=_timestamp(_field(dates, "start-datetime", str)),
        end=_timestamp(_field(dates, "end-datetime", str)))
    if not report.org_name or not report.report_id:
        raise ReportError("organization-name and report-id must not be empty")
    policies = _field(data, "policies", list)
    count = 0
    for entry in policies:
        for row in _policy_rows(entry):
            count += 1
            if count > MAX_RECORDS:
                raise ReportError(f"more than {MAX_RECORDS} policies and failure details")
            report.results.append(row)
    return report


def _policy_rows(entry: Any) -> Iterator[ReceivedTlsRow]:
    if not isinstance(entry, dict):
        raise ReportError("a policy entry is a JSON object")
    policy = _field(entry, "policy", dict)
    summary = _field(entry, "summary", dict)
    policy_type = _clip(_field(policy, "policy-type", str), 20)
    domain = _domain(_field(policy, "policy-domain", str))
    ok = _count(summary.get("total-successful-session-count", 0))
    failed = _count(summary.get("total-failure-session-count", 0))
    yield ReceivedTlsRow(policy_type, domain, "success", ok)
    details = entry.get("failure-details", [])
    if not isinstance(details, list):
        raise ReportError("failure-details is a list")
    listed = 0
    for detail in details[:MAX_RECORDS]:
        if not isinstance(detail, dict):
            raise ReportError("a failure detail is a JSON object")
        sessions = _count(detail.get("failed-session-count", 0))
        listed += sessions
        yield ReceivedTlsRow(policy_type, domain, _clip(_field(detail, "result-type", str), 40),
                             sessions, _clip(str(detail.get("sending-mta-ip", "")), 45),
                             _clip(str(detail.get("receiving-mx-hostname", "")), 253))
    if failed > listed:  # the summary may count failures it does not detail
        yield ReceivedTlsRow(policy_type, domain, "unspecified", failed - listed)


def _field(data: dict, name: str, kind: type) -> Any:
    value = data.get(name)
    if not isinstance(value, kind):
        raise ReportError(f"{name!r} missing or not a {kind.__name__}")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 53:
        raise ReportError(f"not a session count: {_clip(repr(value), 40)}")
    return value


def _timestamp(text: str) -> int:
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ReportError(f"not an RFC 3339 date-time: {_clip(text, 40)!r}")
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp())


# -- values ------------------------------------------------------------------------------------
def _clip(text: str, limit: int = MAX_TEXT) -> str:
    """Printable text of at most `limit` characters (reports are shown on terminals)."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ReportError(f"not a number: {_clip(text, 40)!r}")
    if not 0 <= value < 2 ** 53:
        raise ReportError(f"number out of range: {value}")
    return value


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ReportError(f"not an IP address: {_clip(text, 40)!r}")


def _domain(text: str) -> str:
    value = text.strip().rstrip(".").lower()
    if not value or len(value) > 253 or any(c.isspace() or not c.isprintable() for c in value):
        raise ReportError(f"not a domain: {_clip(text, 40)!r}")
    return value

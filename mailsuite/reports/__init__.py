"""DMARC aggregate reports (RFC 7489 §7.2) and SMTP TLS reports (RFC 8460), both ways.

docs/design/reports.md describes the whole; the pieces:
- `record`: what the gate (DMARC verdicts) and the courier (outbound TLS) note for the reports
  we send, written to SQL in the db pool;
- `inbound`: reading the reports other organisations send us (bounded, defusedxml);
- `outbound`: building the reports we send (XML/JSON, gzip, the message);
- `store`: the SQL side (blocking; run it in the db pool);
- `sender`: once a day, who asked for a report, the claim of (kind, domain, day), the queue;
- `inbox`: the periodic look at the reports address's INBOX.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The failure types of RFC 8460 §4.3 the courier can tell apart ("success" for a good session).
SUCCESS = "success"
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
CERTIFICATE_EXPIRED = "certificate-expired"
CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"


@dataclass(frozen=True)
class DmarcEvaluation:
    """One inbound message's DMARC outcome as an aggregate report row needs it (RFC 7489
    appendix C: row, identifiers, auth_results)."""

    day: str  # YYYY-MM-DD, UTC
    policy_domain: str  # where the DMARC record was found: the report goes to its rua
    header_from: str
    envelope_from: str  # MAIL FROM's domain, or the HELO name for <>
    source_ip: str
    disposition: str  # none | quarantine | reject: what we did
    dkim: str  # pass | fail: an aligned DKIM signature passed
    spf: str  # pass | fail: aligned SPF passed
    reason: str = ""  # "sampled_out" when pct spared a failing message
    # (domain, selector, result) per DKIM signature; (domain, scope, result) for SPF.
    dkim_results: tuple[tuple[str, str, str], ...] = ()
    spf_result: tuple[str, str, str] = ("", "mfrom", "none")


@dataclass(frozen=True)
class TlsOutcome:
    """One outbound SMTP session to a recipient domain (RFC 8460 counts sessions)."""

    day: str
    policy_domain: str
    mx_host: str
    receiving_ip: str
    result_type: str  # SUCCESS or one of the failure types above


@dataclass
class ReceivedDmarc:
    """An aggregate report another organisation sent us, validated and bounded."""

    org_name: str
    email: str
    report_id: str
    domain: str
    policy: str
    begin: int
    end: int
    records: list["ReceivedDmarcRow"] = field(default_factory=list)


@dataclass
class ReceivedDmarcRow:
    source_ip: str
    count: int
    disposition: str
    dkim: str
    spf: str
    header_from: str
    envelope_from: str
    auth_results: str  # JSON: {"dkim": [[domain, selector, result]...], "spf": [[...]]}


@dataclass
class ReceivedTls:
    """A TLS-RPT report another organisation sent us, validated and bounded."""

    org_name: str
    report_id: str
    contact: str
    begin: int
    end: int
    results: list["ReceivedTlsRow"] = field(default_factory=list)


@dataclass
class ReceivedTlsRow:
    policy_type: str
    policy_domain: str
    result_type: str  # "success" for the summary's successful sessions
    sessions: int
    sending_mta_ip: str = ""
    receiving_mx_hostname: str = ""


def check_settings(section: Any) -> None:
    """Refuse at start-up, in one line, a [reports] address we could not use."""
    from mailsuite.config import ConfigError

    for key in ("address", "sender"):
        value = getattr(section, key)
        local, at, domain = value.rpartition("@")
        if value and (not at or not local or not domain or any(c.isspace() for c in value)):
            raise ConfigError(f"[reports] {key} must be an address like reports@example.org, "
                              f"not {value!r}")
    if section.scan_interval <= 0:
        raise ConfigError("[reports] scan_interval must be more than 0")
    if not 0 <= section.send_at < 86400:
        raise ConfigError("[reports] send_at must be between 0 and 86399 seconds")

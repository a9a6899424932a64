"""Test material for the inbound trust checks: sender domains with SPF, DKIM and DMARC records
for the loopback DNS server (tests/dnsserver.py), and messages signed by them with dkimpy.

Each `SenderDomain` owns a 1024-bit RSA key (small: fast to make, still verifiable) and the
records that say who may send for it. The helpers build complete zones for the cases the
trust tests need: pass, fail, softfail, neutral, none, permerror, temperror, and DMARC
p=reject / p=quarantine.
"""
from __future__ import annotations

import email.utils
from dataclasses import dataclass, field

import dkim

from tests.unit.trustkit import rsa_key

SELECTOR = "s1"


@dataclass
class SenderDomain:
    name: str
    spf: str | None = None  # the SPF record, None for none
    dmarc: str | None = None  # the _dmarc record, None for none
    key: bytes = b""
    public: str = ""
    extra: list[tuple[str, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.key:
            self.key, record = rsa_key(self.name)  # one key per domain name, made once
            self.public = record.decode().rpartition("p=")[2]

    def records(self) -> list[tuple[str, str, str]]:
        rs = [(f"{SELECTOR}._domainkey.{self.name}", "TXT",
               f"v=DKIM1; k=rsa; p={self.public}")]
        if self.spf is not None:
            rs.append((self.name, "TXT", self.spf))
        if self.dmarc is not None:
            rs.append((f"_dmarc.{self.name}", "TXT", self.dmarc))
        return rs + self.extra

    def sign(self, message: bytes) -> bytes:
        signature = dkim.sign(message, SELECTOR.encode(), self.name.encode(), self.key,
                              canonicalize=(b"relaxed", b"relaxed"),
                              include_headers=[b"from", b"to", b"subject", b"date",
                                               b"message-id"], linesep=b"\r\n")
        return signature + message


def message(from_addr: str, to_addr: str, subject: str = "trust test", body: str = "Hello.\r\n",
            extra_headers: str = "") -> bytes:
    return (f"From: {from_addr}\r\nTo: {to_addr}\r\nSubject: {subject}\r\n"
            f"Date: {email.utils.formatdate()}\r\nMessage-ID: {email.utils.make_msgid()}\r\n"
            f"{extra_headers}\r\n{body}").encode()


def zones(*domains: SenderDomain) -> dict[str, list[tuple[str, str, str]]]:
    return {d.name: d.records() for d in domains}


def auth_results(raw_message: bytes, authserv_id: str) -> list:
    """Every Authentication-Results field of `raw_message` with our authserv-id, parsed by
    authres (so the header we write must be one the field's own library reads)."""
    import authres
    from email import message_from_bytes, policy

    parsed = message_from_bytes(raw_message, policy=policy.compat32)
    found = []
    for value in parsed.get_all("Authentication-Results") or []:
        text = " ".join(str(value).split())
        header = authres.AuthenticationResultsHeader.parse(
            f"Authentication-Results: {text}")
        if header.authserv_id.lower() == authserv_id.lower():
            found.append(header)
    return found


def result_of(header, method: str) -> list[str]:
    return [r.result for r in header.results if r.method == method]

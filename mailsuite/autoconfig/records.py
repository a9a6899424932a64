"""The DNS records a hosted domain should publish, derived from the configuration.

Used by `mailsuite dns` (printing and checking) and by the HTTP listener (the MTA-STS policy).
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from mailsuite.autoconfig.settings import endpoint_port
from mailsuite.config import Config, ConfigError

TTL = 3600
MX_PREFERENCE = 10
MTA_STS_MODES = ("testing", "enforce", "none")

# RFC 6186 service name -> [listen] key. Priorities follow RFC 8314 §5.1 (implicit TLS first) and
# RFC 6186 §3.4 (the client may compare priorities across IMAP and POP3: IMAP first).
SRV_SERVICES: list[tuple[str, str, int]] = [
    ("_submissions._tcp", "submissions", 0),
    ("_submission._tcp", "submission", 10),
    ("_imaps._tcp", "imaps", 0),
    ("_imap._tcp", "imap", 10),
    ("_pop3s._tcp", "pop3s", 20),
    ("_pop3._tcp", "pop3", 30),
]


@dataclass(frozen=True)
class DNSRecord:
    """One record: `name` fully qualified without the trailing dot; `data` per type:
    MX (preference, exchange), TXT (text,), CNAME (target,), SRV (priority, weight, port, target).
    Host names in data have no trailing dot; "." is the RFC 6186 "service not offered" target.
    """

    name: str
    rtype: str
    data: tuple
    why: str

    def rdata_text(self) -> str:
        if self.rtype == "MX":
            return f"{self.data[0]} {_fqdn(self.data[1])}"
        if self.rtype == "CNAME":
            return _fqdn(self.data[0])
        if self.rtype == "SRV":
            priority, weight, port, target = self.data
            return f"{priority} {weight} {port} {_fqdn(target)}"
        if self.rtype == "TXT":
            return txt_strings(self.data[0])
        raise ValueError(self.rtype)

    def zone_line(self, name_width: int = 0) -> str:
        return f"{_fqdn(self.name):<{name_width}} {TTL} IN {self.rtype:<5} {self.rdata_text()}"


def records_for(config: Config, domain: str) -> list[DNSRecord]:
    """Every record to publish for `domain` (lower-case), in the order they are printed."""
    host = config.hostname.rstrip(".").lower()
    dns = config.dns
    records = [
        DNSRecord(domain, "MX", (MX_PREFERENCE, host), "mail for the domain goes to this server"),
        # Only the MX hosts may send for the domain; everything else fails SPF (RFC 7208).
        DNSRecord(domain, "TXT", ("v=spf1 mx -all",), "SPF: who may send mail from the domain"),
    ]
    for selector, text in dkim_keys(config, domain):
        records.append(DNSRecord(f"{selector}._domainkey.{domain}", "TXT", (text,),
                                 f"DKIM public key, selector {selector}"))
    dmarc = f"v=DMARC1; p={dns.dmarc_policy}"
    if dns.dmarc_rua:
        dmarc += f"; rua={dns.dmarc_rua}"
    records.append(DNSRecord(f"_dmarc.{domain}", "TXT", (dmarc,), "DMARC policy (RFC 7489)"))
    if config.listen.autoconfig:
        records.append(DNSRecord(f"autoconfig.{domain}", "CNAME", (host,),
                                 "Thunderbird autoconfig (HTTP listener)"))
        records.append(DNSRecord(f"autodiscover.{domain}", "CNAME", (host,),
                                 "Outlook Autodiscover (HTTP listener)"))
    for service, listener, priority in SRV_SERVICES:
        port = endpoint_port(getattr(config.listen, listener))
        if port is None:
            # RFC 6186 §4: publish "." to say the service is not offered.
            records.append(DNSRecord(f"{service}.{domain}", "SRV", (0, 0, 0, "."),
                                     f"{listener}: not offered"))
        else:
            records.append(DNSRecord(f"{service}.{domain}", "SRV", (priority, 1, port, host),
                                     f"{listener} for mail clients (RFC 6186)"))
    policy = mta_sts_policy(config)
    if policy is not None:
        policy_id = hashlib.sha256(policy.encode()).hexdigest()[:20]
        records.append(DNSRecord(f"_mta-sts.{domain}", "TXT", (f"v=STSv1; id={policy_id}",),
                                 "MTA-STS: a policy exists, and its version (RFC 8461)"))
        records.append(DNSRecord(f"mta-sts.{domain}", "CNAME", (host,),
                                 "MTA-STS policy host (served over HTTPS by the autoconfig "
                                 "listener; its certificate must name this host)"))
    if dns.tlsrpt_rua:
        records.append(DNSRecord(f"_smtp._tls.{domain}", "TXT",
                                 (f"v=TLSRPTv1; rua={dns.tlsrpt_rua}",),
                                 "TLS-RPT: where senders report TLS failures (RFC 8460)"))
    return records


def mta_sts_policy(config: Config) -> str | None:
    """The RFC 8461 §3.2 policy text, None when MTA-STS is not configured."""
    mode = config.dns.mta_sts_mode
    if not mode:
        return None
    if mode not in MTA_STS_MODES:
        raise ConfigError(f"[dns] mta_sts_mode must be one of {', '.join(MTA_STS_MODES)} or \"\", "
                          f"not {mode!r}")
    host = config.hostname.rstrip(".").lower()
    return (f"version: STSv1\r\nmode: {mode}\r\nmx: {host}\r\n"
            f"max_age: {config.dns.mta_sts_max_age}\r\n")


def dkim_keys(config: Config, domain: str) -> list[tuple[str, str]]:
    """(selector, TXT value) for each `<dkim_dir>/<domain>/<selector>.txt`, configured selector
    first (older selectors stay published while mail signed with them may still be verified)."""
    directory = os.path.join(config.dkim_dir, domain)
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".txt"))
    except OSError:
        return []
    keys = []
    for name in names:
        try:
            with open(os.path.join(directory, name), encoding="ascii", errors="replace") as f:
                text = _txt_value(f.read())
        except OSError:
            continue
        if text:
            keys.append((name[:-4], text))
    keys.sort(key=lambda k: k[0] != config.dkim.selector)
    return keys


def txt_strings(text: str) -> str:
    """Zone-file form of a TXT value: quoted strings of at most 255 octets (RFC 1035 §3.3)."""
    data = text.encode("ascii", errors="replace")
    chunks = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
    return " ".join('"' + c.decode().replace("\\", "\\\\").replace('"', '\\"') + '"'
                    for c in chunks)


def normalize_txt(text: str) -> str:
    """For comparing TXT values: tag lists ignore whitespace around ';' and repeated spaces."""
    text = re.sub(r"\s+", " ", text.strip())
    return re.sub(r"\s*;\s*", ";", text).rstrip(";")


def _txt_value(content: str) -> str:
    """The value in a .txt key file: either the bare value or a zone-file line with quotes."""
    if '"' in content:
        return "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', content)).replace('\\"', '"')
    return " ".join(content.split())


def _fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."

"""DMARC (RFC 7489) evaluation: policy discovery, identifier alignment, pct sampling.

docs/design/trust-authentication.md, "DMARC". Blocking (worker threads): DNS is a
fn(name, qtype, timeout) -> list such as `DnsClient.blocking(reactor)`.

Choices, each explained in the design document:
- several From: fields, or one with several addresses: every distinct domain (at most
  MAX_FROM_DOMAINS) is evaluated and the strictest outcome applies (RFC 7489 §6.6.1 leaves
  this to the receiver; we fail closed); no From: field, or no usable domain in it: permerror.
- pct: a failing message not selected by sampling gets the next milder policy, reject ->
  quarantine -> none (§6.6.4); the AR reason says so.
- temperror: the record lookup failed, or nothing aligned passed while an identifier that
  would have aligned hit a temporary error (its result is not known yet).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from email.headerregistry import HeaderRegistry
from email.utils import getaddresses
from typing import Any, Callable

from mailsuite.trust import AuthResult
from mailsuite.trust.dns import DnsTempError, normalize_name
from mailsuite.trust.spf import identity_domain

Lookup = Callable[[str, str, float], list]

POLICIES = ("none", "quarantine", "reject")
MAX_FROM_DOMAINS = 5
MAX_FROM_VALUE = 4096  # longer From: values are searched for "@domain" instead of parsed
DEFAULT_TIMEOUT = 10.0

_VERSION = re.compile(r"^v[ \t]*=[ \t]*DMARC1[ \t]*(;|$)")  # §6.4: "DMARC1", case-sensitive
_DOMAIN = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")
_psl: Any = None


@dataclass(frozen=True)
class DmarcRecord:
    p: str
    sp: str | None = None
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"
    rua: tuple[str, ...] = ()


@dataclass
class DmarcOutcome:
    """result: the AR result (method "dmarc"). policy: what DMARC says to do with this message
    after pct sampling ("none" unless the result is fail). requested: the p= (or sp=) that
    applied, "" without a record. domain: the From: domain that decided. sampled_out: a failing
    message that pct sampling spared (policy is then the next milder one)."""

    result: AuthResult
    policy: str = "none"
    requested: str = ""
    domain: str = ""
    sampled_out: bool = False
    spf_aligned: bool = False
    dkim_aligned: bool = False
    record_domain: str = ""
    domains: list[str] = field(default_factory=list)

    @property
    def keyword(self) -> str:
        return self.result.result


# -- records -----------------------------------------------------------------------------------
def parse_record(text: bytes | str) -> DmarcRecord | None:
    """A DMARC record from one TXT value; None when it is not one we can apply (§6.6.3: no
    valid p= nor sp= and no valid rua= means no DMARC processing; with rua=, p=none)."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    text = text.strip()
    if not _VERSION.match(text):
        return None
    tags: dict[str, str] = {}
    for part in text.split(";")[1:]:
        name, eq, value = part.partition("=")
        name = name.strip().lower()
        if eq and name and name not in tags:  # unknown tags are ignored (§6.3)
            tags[name] = value.strip()
    rua = tuple(u.strip() for u in tags.get("rua", "").split(",") if _URI.match(u.strip()))
    p = tags.get("p", "").lower()
    sp = tags.get("sp", "").lower() if "sp" in tags else None
    if p not in POLICIES or (sp is not None and sp not in POLICIES):
        if not rua:
            return None
        p, sp = "none", None
    try:
        pct = int(tags.get("pct", "100"))
        if not 0 <= pct <= 100:
            raise ValueError
    except ValueError:
        pct = 100  # a syntax error gives the default (§6.3)
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    return DmarcRecord(p=p, sp=sp, pct=pct, adkim=adkim if adkim in ("r", "s") else "r",
                       aspf=aspf if aspf in ("r", "s") else "r", rua=rua)


def organizational_domain(domain: str) -> str:
    """The registrable domain by the Public Suffix List (§3.2); the domain itself when the list
    has no answer (a public suffix, or a single label)."""
    global _psl
    if _psl is None:
        from publicsuffixlist import PublicSuffixList

        _psl = PublicSuffixList()
    try:
        org = _psl.privatesuffix(domain)
    except Exception:
        org = None
    return org or domain


def _discover(domain: str, lookup: Lookup, timeout: float) -> tuple[DmarcRecord | None, str]:
    """(record, where it was found) for a From: domain: the domain's own _dmarc record, else the
    organizational domain's (§6.6.3). Several DMARC records, or an invalid one, mean no DMARC
    (record None, where set). Raises DnsTempError."""
    for candidate in dict.fromkeys([domain, organizational_domain(domain)]):
        texts = [_text(t) for t in lookup("_dmarc." + candidate, "TXT", timeout)]
        dmarc = [t for t in texts if _VERSION.match(t)]
        if not dmarc:
            continue
        if len(dmarc) > 1:
            return None, candidate
        return parse_record(dmarc[0]), candidate
    return None, ""


def _text(value: bytes | str) -> str:
    return value.decode("ascii", "replace").strip() if isinstance(value, bytes) else value.strip()


# -- evaluation --------------------------------------------------------------------------------
def evaluate_domain(domain: str, spf: AuthResult, dkim: list[AuthResult], lookup: Lookup,
                    rng: Any, timeout: float = DEFAULT_TIMEOUT) -> DmarcOutcome:
    """DMARC for one (normalized) From: domain."""
    def outcome(keyword: str, reason: str = "", **kw: Any) -> DmarcOutcome:
        properties = [("header.from", domain)]
        if kw.get("requested"):
            properties.append(("policy.dmarc", kw.get("policy", "none")))
        return DmarcOutcome(AuthResult("dmarc", keyword, reason, tuple(properties)),
                            domain=domain, domains=[domain], **kw)

    try:
        record, where = _discover(domain, lookup, timeout)
    except DnsTempError as e:
        return outcome("temperror", f"DMARC record lookup failed: {e}")
    if record is None:
        return outcome("none", "no DMARC record" if not where else "no usable DMARC record")
    subdomain = where != domain
    requested = (record.sp or record.p) if subdomain else record.p

    org = organizational_domain(domain)
    spf_domain = identity_domain(spf)
    spf_could_align = bool(spf_domain) and _aligned(spf_domain, domain, org, record.aspf)
    spf_aligned = spf.result == "pass" and spf_could_align
    dkim_aligned = False
    dkim_pending = False
    for r in dkim:
        d = dict(r.properties).get("header.d", "")
        d = (normalize_name(d) or "") if d else ""
        if not d or not _aligned(d, domain, org, record.adkim):
            continue
        if r.result == "pass":
            dkim_aligned = True
        elif r.result == "temperror":
            dkim_pending = True
    tags = f"p={record.p}" + (f" sp={record.sp}" if record.sp else "") + f" pct={record.pct}"
    common = dict(requested=requested, spf_aligned=spf_aligned, dkim_aligned=dkim_aligned,
                  record_domain=where)
    if spf_aligned or dkim_aligned:
        return outcome("pass", tags, **common)
    if dkim_pending or (spf_could_align and spf.result == "temperror"):
        return outcome("temperror", f"{tags}; an aligned identifier hit a temporary error",
                       **common)
    policy, sampled_out = _sample(requested, record.pct, rng)
    reason = tags + (f"; not sampled, applied {policy}" if sampled_out else "")
    return outcome("fail", reason, policy=policy, sampled_out=sampled_out, **common)


def _aligned(identifier: str, from_domain: str, from_org: str, mode: str) -> bool:
    identifier = identifier.rstrip(".").lower()
    if mode == "s":
        return identifier == from_domain
    return organizational_domain(identifier) == from_org


def _sample(requested: str, pct: int, rng: Any) -> tuple[str, bool]:
    """The policy to apply to a failing message and whether pct sampling spared it (§6.6.4)."""
    if requested == "none" or pct >= 100:
        return requested, False
    if pct > 0 and (rng or random).random() * 100 < pct:
        return requested, False
    return {"reject": "quarantine", "quarantine": "none"}.get(requested, "none"), True


_RANK = {"pass": 0, "none": 1, "permerror": 2, "temperror": 4}


def _severity(o: DmarcOutcome) -> int:
    if o.keyword == "fail":
        return {"reject": 6, "quarantine": 5}.get(o.policy, 3)
    return _RANK.get(o.keyword, 2)


def evaluate_message(message: bytes, spf: AuthResult, dkim: list[AuthResult],
                     dns_blocking: Lookup, rng: Any,
                     timeout: float = DEFAULT_TIMEOUT) -> DmarcOutcome:
    """DMARC for a whole message: its From: domain(s), the SPF result and the DKIM results.
    Never raises; hostile headers give permerror."""
    try:
        domains, problem = from_domains(message)
        if problem:
            return DmarcOutcome(AuthResult("dmarc", "permerror", problem))
        outcomes = [evaluate_domain(d, spf, dkim, dns_blocking, rng, timeout)
                    for d in domains[:MAX_FROM_DOMAINS]]
    except Exception as e:
        return DmarcOutcome(AuthResult("dmarc", "permerror",
                                       f"DMARC evaluation failed: {type(e).__name__}"))
    worst = max(outcomes, key=_severity)  # first of equals: header order
    worst.domains = list(domains)
    if len(domains) > 1:
        r = worst.result
        note = f"{len(domains)} From domains, strictest applied"
        worst.result = AuthResult(r.method, r.result, f"{r.reason}; {note}" if r.reason else note,
                                  r.properties)
    return worst


# -- the From: domain --------------------------------------------------------------------------
def from_domains(message: bytes) -> tuple[list[str], str]:
    """(distinct From: domains in order, "") or ([], why there is none). Never raises."""
    values = _from_values(message)
    if not values:
        return [], "no From: field"
    domains: list[str] = []
    for value in values:
        for raw in _addresses_domains(value):
            domain = _normalize_domain(raw)
            if domain and domain not in domains:
                domains.append(domain)
    if not domains:
        return [], "no usable domain in From:"
    return domains, ""


def _from_values(message: bytes) -> list[str]:
    head = re.split(rb"\r?\n\r?\n", message, maxsplit=1)[0]
    values: list[list[bytes]] = []
    current: list[bytes] | None = None
    for line in re.split(rb"\r?\n", head):
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                current.append(line)
            continue
        name, colon, rest = line.partition(b":")
        if colon and name.strip().lower() == b"from":
            current = [rest]
            values.append(current)
        else:
            current = None
    return [b" ".join(p.strip() for p in parts).decode("utf-8", "replace")
            for parts in values[:MAX_FROM_DOMAINS * 2]]


def _addresses_domains(value: str) -> list[str]:
    """Domains of the addresses in one From: value, by two parsers; the union is used so that a
    value the parsers read differently is judged by every domain either saw."""
    found: list[str] = []
    if len(value) > MAX_FROM_VALUE:
        return re.findall(r"@\s*([^\s<>()\[\],;:\"@]+)", value)[:MAX_FROM_DOMAINS]
    try:
        header = HeaderRegistry()("From", value)
        found += [a.domain for a in header.addresses if a.domain]
    except Exception:
        pass
    try:
        found += [addr.rpartition("@")[2] for _, addr in getaddresses([value]) if "@" in addr]
    except Exception:
        pass
    return found


def _normalize_domain(raw: str) -> str:
    raw = raw.strip().strip(">").strip()
    if not raw or raw.startswith("["):
        return ""  # an address literal has no DMARC
    name = normalize_name(raw)
    if not name or not _DOMAIN.match(name):
        return ""
    return name

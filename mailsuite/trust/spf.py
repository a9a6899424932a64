"""SPF (RFC 7208) with pyspf, its DNS going through our DnsClient.

docs/design/trust-authentication.md, "SPF". pyspf is blocking: `check_spf` runs it in a worker
pool; its DNS questions come back to the reactor through `DnsClient.blocking`.

pyspf asks DNS through the module-level function `spf.DNSLookup(name, qtype, strict, timeout)`.
`install_dns` replaces that function for the whole process (every user of pyspf in this
process, ours or not, then asks our resolver). The replacement looks first at a per-thread
lookup set by `evaluate_spf` for the duration of one check, so several DnsClients (tests, or
one per service) can be used side by side; without either it raises spf.TempError and never
falls back to pyspf's own resolver.
"""
from __future__ import annotations

import ipaddress
import re
import threading
from typing import Any, Callable

import spf as pyspf
from twisted.internet import defer

from mailsuite.trust import AuthResult
from mailsuite.trust.dns import DnsTempError

Lookup = Callable[[str, str, float], list]  # DnsClient.blocking(reactor)

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

_local = threading.local()
_lock = threading.Lock()
_default_lookup: Lookup | None = None


def install_dns(dns: Any, reactor: Any) -> None:
    """Make pyspf ask `dns` (a DnsClient) through `reactor`: process-wide, see the module text."""
    global _default_lookup
    with _lock:
        _default_lookup = dns.blocking(reactor)
        pyspf.DNSLookup = _dns_lookup


def _ensure_hook() -> None:
    if pyspf.DNSLookup is not _dns_lookup:
        with _lock:
            pyspf.DNSLookup = _dns_lookup


def _dns_lookup(name: Any, qtype: str, strict: Any = True, timeout: float = 20) -> list:
    """pyspf's DNSLookup contract: [((name, qtype), value), ...] or spf.TempError."""
    lookup = getattr(_local, "lookup", None) or _default_lookup
    if lookup is None:
        raise pyspf.TempError("DNS: no resolver installed for SPF")
    qtype = str(qtype).upper()
    if qtype not in ("A", "AAAA", "MX", "PTR", "TXT"):
        return []  # type 99 (SPF) is obsolete (RFC 7208 §3.1); we do not ask for it
    name = str(name)
    try:
        records = lookup(name, qtype, timeout)
    except DnsTempError as e:
        raise pyspf.TempError(f"DNS {e}")
    out = []
    for value in records:
        if qtype == "TXT":
            value = [value]  # pyspf joins a record's strings itself; ours are joined already
        out.append(((name, qtype), value))
    return out


def check_spf(dns: Any, pool: Any, reactor: Any, ip: str, mail_from: str, helo: str,
              timeout: float) -> defer.Deferred:
    """Deferred[AuthResult] (method "spf"); never errbacks. pyspf runs in `pool`."""
    _ensure_hook()
    lookup = dns.blocking(reactor)
    d = pool.run(evaluate_spf, lookup, ip, mail_from, helo, timeout)
    d.addErrback(lambda f: _result("temperror", mail_from, helo,
                                   f"SPF check failed: {f.getErrorMessage()}"))
    return d


def evaluate_spf(lookup: Lookup, ip: str, mail_from: str, helo: str,
                 timeout: float) -> AuthResult:
    """The SPF check itself, blocking (worker threads only). Never raises.

    The identity is MAIL FROM; for the null reverse-path it is the HELO name as
    postmaster@<helo> (RFC 7208 §2.4), and a HELO that is not a domain gives "none" (§2.3)."""
    _ensure_hook()
    mail_from = mail_from or ""
    helo = (helo or "").strip()
    client = _client_address(ip)
    if client is None:
        return _result("permerror", mail_from, helo, "client address is not an IP address")
    if not mail_from and not _is_domain(helo):
        return _result("none", mail_from, helo, "HELO name is not a domain")
    if mail_from and "@" in mail_from and not _is_domain(mail_from.rpartition("@")[2]):
        return _result("none", mail_from, helo, "MAIL FROM domain is not a domain")
    previous = getattr(_local, "lookup", None)
    _local.lookup = lookup
    try:
        query = pyspf.query(i=client, s=mail_from, h=helo, querytime=timeout, timeout=timeout)
        result, _code, explanation = query.check()
    except pyspf.TempError as e:
        return _result("temperror", mail_from, helo, str(e))
    except Exception as e:  # pyspf on hostile input: a broken record is the sender's error
        return _result("permerror", mail_from, helo, f"{type(e).__name__}: {e}")
    finally:
        _local.lookup = previous
    result = str(result).lower()
    if result not in RESULTS:
        return _result("permerror", mail_from, helo, f"unexpected SPF result {result}")
    reason = explanation if result in ("temperror", "permerror") else ""
    return _result(result, mail_from, helo, reason)


def _result(result: str, mail_from: str, helo: str, reason: str = "") -> AuthResult:
    if mail_from:
        properties = (("smtp.mailfrom", mail_from),)
    else:
        properties = (("smtp.helo", helo),)
    return AuthResult("spf", result, _clean(reason), properties)


def identity_domain(result: AuthResult) -> str:
    """The domain SPF checked (MAIL FROM's, or HELO's for <>): what DMARC aligns (RFC 7489
    §3.1.2). "" when unknown."""
    for key, value in result.properties:
        if key == "smtp.mailfrom":
            return value.rpartition("@")[2].strip().rstrip(".").lower()
        if key == "smtp.helo":
            return value.strip().rstrip(".").lower()
    return ""


def _client_address(ip: str) -> str | None:
    try:
        address = ipaddress.ip_address(str(ip).strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return str(address)


_DOMAIN = re.compile(r"^(?=.{1,253}$)([^\s.@\[\]]{1,63}\.)+[^\s.@\[\]]{1,63}$")


def _is_domain(name: str) -> bool:
    return bool(_DOMAIN.match(name.rstrip(".")))


def _clean(text: str) -> str:
    text = re.sub(r"[^\x20-\x7e]", "?", str(text))
    return text[:120]

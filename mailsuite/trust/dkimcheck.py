"""DKIM (RFC 6376, RFC 8463) and ARC (RFC 8617) verification, and ARC sealing, with dkimpy.

docs/design/trust-authentication.md, "DKIM" and "ARC". Everything here is blocking and runs in a
worker thread (the gate calls it through `pool.run`). DNS comes from `dkim_dnsfunc`, which
adapts `DnsClient.blocking(reactor)` to dkimpy's `dnsfunc(name: bytes, timeout=...)`.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Callable

import dkim

from mailsuite.trust import AuthResult
from mailsuite.trust.dns import DnsTempError

# A message may carry many signatures; each costs a DNS query and a hash of the body. Past this
# many, the rest are reported together as one "neutral" result (not verified).
MAX_SIGNATURES = 10

_quiet = logging.getLogger("mailsuite.trust.dkim")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


class DkimDnsTempError(Exception):
    """The key could not be fetched for now. Deliberately not a dkim.DKIMException: dkimpy
    turns its own DNS errors into a plain "fail", and we want temperror (RFC 8601 §2.7.1)."""


def dkim_dnsfunc(blocking_query: Callable[[str, str, float], list],
                 timeout: float | None = None) -> Callable[..., bytes | None]:
    """dkimpy's dnsfunc over `DnsClient.blocking(reactor)` (or any fn(name, qtype, timeout)).

    Returns the first TXT record's value, None when there is none; DnsTempError becomes
    DkimDnsTempError. `timeout` overrides the per-query timeout dkimpy passes (5 s)."""

    override = timeout

    def dnsfunc(name: Any, timeout: float = 5) -> bytes | None:
        per_query = override if override is not None else timeout
        if isinstance(name, bytes):
            try:
                name = name.decode("utf-8")
            except UnicodeDecodeError:
                return None  # no such name can exist in DNS
        try:
            records = blocking_query(str(name), "TXT", per_query)
        except DnsTempError as e:
            raise DkimDnsTempError(str(e))
        return records[0] if records else None

    return dnsfunc


class _Recording:
    """Wraps a dnsfunc to remember the last answer: dkimpy reports a missing or unreadable key
    as a plain False, which RFC 8601 §2.7.1 calls permerror, not fail."""

    def __init__(self, dnsfunc: Callable[..., Any]):
        self.dnsfunc = dnsfunc
        self.asked = False
        self.name: Any = None
        self.answer: Any = None

    def __call__(self, name: Any, timeout: float = 5) -> Any:
        self.asked, self.name = True, name
        self.answer = self.dnsfunc(name, timeout=timeout)
        return self.answer

    def key_problem(self) -> str:
        if not self.asked:
            return ""
        if not self.answer:
            return "no key record for the selector"
        try:
            dkim.evaluate_pk(self.name, self.answer)
        except Exception as e:
            return f"unusable key record: {_clean(str(e), 60)}"
        return ""


def verify_dkim(message: bytes, dnsfunc: Callable[..., Any]) -> list[AuthResult]:
    """One AuthResult (method "dkim") per DKIM-Signature, in header order; never raises.

    pass / fail (a bad signature or an altered body) / permerror (an unparseable signature, no
    or a broken key) / temperror (the key lookup failed for now) / neutral (anything dkimpy
    cannot process otherwise); a single "none" when the message carries no signature."""
    try:
        verifier = dkim.DKIM(message, logger=_quiet, minkey=1024)
        signatures = [value for name, value in verifier.headers
                      if name.lower() == b"dkim-signature"]
    except Exception as e:
        if _has_field(message, b"dkim-signature"):
            return [AuthResult("dkim", "permerror",
                               f"message header unparseable: {_clean(str(e), 60)}")]
        return [AuthResult("dkim", "none")]
    if not signatures:
        return [AuthResult("dkim", "none")]
    results = [_verify_one(verifier, idx, value, dnsfunc)
               for idx, value in enumerate(signatures[:MAX_SIGNATURES])]
    if len(signatures) > MAX_SIGNATURES:
        results.append(AuthResult(
            "dkim", "neutral", f"{len(signatures) - MAX_SIGNATURES} more signatures not verified"))
    return results


def _verify_one(verifier: Any, idx: int, value: bytes, dnsfunc: Callable[..., Any]) -> AuthResult:
    properties = _signature_properties(value)
    recording = _Recording(dnsfunc)

    def result(keyword: str, reason: str = "") -> AuthResult:
        return AuthResult("dkim", keyword, _clean(reason, 100), properties)

    try:
        ok = verifier.verify(idx=idx, dnsfunc=recording)
    except DkimDnsTempError as e:
        return result("temperror", f"key lookup failed: {e}")
    except dkim.ValidationError as e:
        # dkimpy raises the body hash mismatch as a ValidationError; it is a failed
        # verification of a well-formed signature (RFC 6376 §6.1.3), so "fail".
        if "body hash mismatch" in str(e):
            return result("fail", "body hash did not verify")
        return result("permerror", str(e))
    except (dkim.KeyFormatError, dkim.MessageFormatError) as e:
        return result("permerror", str(e))
    except dkim.DKIMException as e:
        return result("neutral", str(e))
    except Exception as e:  # dkimpy on input it did not expect
        return result("neutral", f"{type(e).__name__}")
    if ok:
        return result("pass")
    problem = recording.key_problem()
    if problem:
        return result("permerror", problem)
    return result("fail", "signature did not verify")


def verify_arc(message: bytes, dnsfunc: Callable[..., Any]) -> AuthResult:
    """The ARC chain's validation (method "arc"): pass, fail or none; never raises.

    ARC has no temperror (RFC 8617 registers only none, pass and fail for "arc"): a key that
    could not be fetched makes the chain "fail" with a reason saying so."""
    try:
        arc = dkim.ARC(message, logger=_quiet, minkey=1024)
        cv, _data, reason = arc.verify(dnsfunc=dnsfunc)
    except DkimDnsTempError as e:
        return AuthResult("arc", "fail", _clean(f"temporary DNS failure: {e}", 100))
    except Exception as e:
        if any(_has_field(message, name) for name in dkim.ARC.ARC_HEADERS):
            return AuthResult("arc", "fail", _clean(f"{type(e).__name__}: {e}", 100))
        return AuthResult("arc", "none")
    if cv == dkim.CV_None:
        return AuthResult("arc", "none")
    if cv == dkim.CV_Pass:
        return AuthResult("arc", "pass")
    return AuthResult("arc", "fail", _clean(str(reason), 100))


def arc_seal(message: bytes, selector: str, domain: str, privkey: bytes,
             authserv_id: str) -> bytes:
    """The ARC-Seal, ARC-Message-Signature and ARC-Authentication-Results lines (CRLF-ended,
    in that order) to prepend to `message`; b"" when nothing can be sealed.

    dkimpy seals what our own Authentication-Results header says: `message` must already
    carry the field written by `authresults.build_header(authserv_id, ...)`, named exactly
    "Authentication-Results" and containing our arc= result (it becomes the seal's cv=; no arc
    result means cv=none). authres lower-cases the authserv-id it parses, so the id is compared
    in lower case. A key that cannot be used raises dkim.KeyFormatError (configuration error);
    anything wrong with the message gives b""."""
    try:
        lines = dkim.arc_sign(message, selector.encode("ascii"), domain.encode("ascii"),
                              privkey, authserv_id.lower().encode("ascii"), logger=_quiet)
    except dkim.KeyFormatError:
        raise
    except Exception:
        return b""
    return b"".join(line if line.endswith(b"\n") else line + b"\r\n" for line in lines)


def _signature_properties(value: bytes) -> tuple[tuple[str, str], ...]:
    """header.d/i/s/a/b (b: its first 8 characters, RFC 6008) read leniently from the raw
    DKIM-Signature value, so even an unparseable signature names its domain when it can."""
    tags: dict[str, str] = {}
    text = value.decode("ascii", "replace")
    for part in text.split(";"):
        name, eq, tag_value = part.partition("=")
        if not eq:
            continue
        name = name.strip().lower()
        if name in ("d", "i", "s", "a", "b") and name not in tags:
            tags[name] = re.sub(r"\s+", "", tag_value)
    out = []
    for name in ("d", "i", "s", "a", "b"):
        tag_value = tags.get(name, "")
        if name == "b":
            tag_value = tag_value[:8]
        if tag_value and re.fullmatch(r"[\x21-\x7e]{1,255}", tag_value) and \
                not re.search(r"[\";()\\]", tag_value):
            out.append((f"header.{name}", tag_value))
    return tuple(out)


def _has_field(message: bytes, name: bytes) -> bool:
    head = message.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    return re.search(rb"(?im)^" + re.escape(name) + rb"[ \t]*:", head) is not None


def _clean(text: str, limit: int) -> str:
    return re.sub(r"[^\x20-\x7e]", "?", text)[:limit]

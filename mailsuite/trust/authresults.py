"""The Authentication-Results header field (RFC 8601): writing ours, removing forged ones.

docs/design/trust-authentication.md, "Authentication-Results". The field is written with
authres (its result and property classes quote what needs quoting); values that come from the
sender (addresses, domains, reasons) are made safe first, so nothing a client sends can end
the field or add a clause of its own.
"""
from __future__ import annotations

import re

from authres.core import (AuthenticationResult, AuthenticationResultProperty,
                          AuthenticationResultsHeader)

from mailsuite.trust import AuthResult

FIELD_NAME = "Authentication-Results"
MAX_LINE = 78  # RFC 5322 §2.1.1 (without the CRLF)

_PTYPES = ("smtp", "header", "body", "policy")
_KEYWORD = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_ATEXT_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_DOMAIN = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?$")


def build_header(authserv_id: str, results: list[AuthResult]) -> str:
    """One complete "Authentication-Results: ..." field, folded to lines of at most 78
    characters where it can be (CRLF + space between lines, no CRLF at the end).

    With no results the field says "none" (RFC 8601 §2.2). The authserv-id is written in lower
    case (authres does so; the id compares without regard to case)."""
    header = AuthenticationResultsHeader(None, authserv_id=_authserv(authserv_id),
                                         version=None, results=[])
    clauses = [str(_to_authres(r)) for r in results if r is not None]
    first = f"{FIELD_NAME}: {header.authserv_id};"
    if not clauses:
        return first + " none"
    return _fold(first, clauses)


def _authserv(authserv_id: str) -> str:
    value = (authserv_id or "").strip()
    if not value or not re.fullmatch(r"[\x21-\x7e]+", value) or re.search(r"[;()\"\\]", value):
        raise ValueError(f"not a usable authserv-id: {authserv_id!r}")
    return value


def _to_authres(result: AuthResult) -> AuthenticationResult:
    method = result.method.lower() if _KEYWORD.match(result.method.lower()) else "x-unknown"
    keyword = result.result.lower() if _KEYWORD.match(result.result.lower()) else "permerror"
    properties = []
    for key, value in result.properties:
        ptype, dot, name = key.lower().partition(".")
        if not dot or ptype not in _PTYPES or not _KEYWORD.match(name):
            continue
        safe = _pvalue(value)
        if safe:
            properties.append(AuthenticationResultProperty(ptype, name, safe))
    reason = _printable(result.reason)[:200] or None
    return AuthenticationResult(method, result=keyword, reason=reason, properties=properties)


def _pvalue(value: str) -> str:
    """A property value that authres writes safely (RFC 8601 §2.2 pvalue), or "" to leave it out.

    authres writes anything with an "@" as it is, so an address is kept only when it is a plain
    dot-atom@domain; otherwise its domain alone is written (RFC 8601 §2.7.2 allows it)."""
    value = _printable(str(value)).strip()[:255]
    if not value:
        return ""
    if "@" in value:
        local, _, domain = value.rpartition("@")
        if not _DOMAIN.match(domain):
            return ""
        if local == "" or _ATEXT_LOCAL.match(local):
            return value
        return domain
    return value  # authres quotes it when it is not a token


def _printable(text: str) -> str:
    return re.sub(r"[^\x20-\x7e]", "?", text or "")


def _fold(first: str, clauses: list[str]) -> str:
    lines: list[str] = []
    current = first
    for i, clause in enumerate(clauses):
        words = [w for w in clause.split(" ") if w]
        if i < len(clauses) - 1:
            words[-1] += ";"
        for word in words:
            if len(current) + 1 + len(word) <= MAX_LINE or current.strip() == "":
                current += " " + word
            else:
                lines.append(current)
                current = " " + word  # the space is the folding whitespace (RFC 5322 §2.2.3)
    lines.append(current)
    return "\r\n".join(lines)


# -- removing fields that claim to be ours (RFC 8601 §5) ---------------------------------------
_AR_FIELD = re.compile(rb"^authentication-results[ \t]*:", re.IGNORECASE)


def strip_ours(header_section: bytes, authserv_id: str) -> bytes:
    """`header_section` without any Authentication-Results field (with its continuation lines)
    whose authserv-id is ours, compared without regard to case; every other byte is kept as it
    was. A field that cannot be parsed is removed when its first token is our id. Other
    fields, ARC-Authentication-Results included, are not touched. If a body follows the header
    section it is passed through unchanged."""
    ours = (authserv_id or "").strip().rstrip(".").lower().encode("utf-8", "replace")
    if not ours:
        return header_section
    lines = header_section.splitlines(keepends=True)
    out: list[bytes] = []
    field: list[bytes] = []
    i = 0

    def flush() -> None:
        if field and not _claims(field, ours):
            out.extend(field)
        field.clear()

    while i < len(lines):
        line = lines[i]
        if line in (b"\r\n", b"\n", b"\r"):  # the end of the header section
            break
        if line[:1] in (b" ", b"\t") and field:
            field.append(line)
        else:
            flush()
            field.append(line)
        i += 1
    flush()
    out.extend(lines[i:])
    return b"".join(out)


def _claims(field: list[bytes], ours: bytes) -> bool:
    first = field[0]
    match = _AR_FIELD.match(first)
    if not match:
        return False
    value = re.sub(rb"\r?\n|\r", b"", b"".join(field))[match.end():]
    return authserv_id_of(value) == ours


def authserv_id_of(value: bytes) -> bytes | None:
    """The authserv-id at the start of an Authentication-Results value, lower-cased and without
    a trailing dot: after optional CFWS (nested comments included), a quoted-string or the
    run of characters up to white space, ";" or "("; None if there is none."""
    i, n = 0, len(value)
    while i < n:
        c = value[i:i + 1]
        if c in (b" ", b"\t", b"\r", b"\n"):
            i += 1
        elif c == b"(":
            depth = 0
            while i < n:
                c = value[i:i + 1]
                if c == b"\\":
                    i += 2
                    continue
                if c == b"(":
                    depth += 1
                elif c == b")":
                    depth -= 1
                    if depth == 0:
                        i += 1
                        break
                i += 1
            else:
                return None  # an unclosed comment: no id
        else:
            break
    if i >= n:
        return None
    if value[i:i + 1] == b'"':
        j, chars = i + 1, []
        while j < n and value[j:j + 1] != b'"':
            if value[j:j + 1] == b"\\":
                j += 1
            chars.append(value[j:j + 1])
            j += 1
        token = b"".join(chars)
    else:
        m = re.match(rb"[^\s;(]+", value[i:])
        token = m.group(0) if m else b""
    token = token.strip().rstrip(b".").lower()
    return token or None

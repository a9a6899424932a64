"""Parsing of MAIL FROM / RCPT TO command arguments: the path and the ESMTP parameters.

RFC 5321 §4.1.2 paths and RFC 6531 (SMTPUTF8) UTF-8 local parts and domains. Our own small
grammar instead of `twisted.mail.smtp.Address` (docs/design/smtp.md): Twisted's atom is ASCII-only,
it rejects address literals (`x@[192.0.2.1]`) and silently appends a default domain to `<ab>`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


# RFC 5321 §4.5.3.1: local part 64, domain 255 octets.
MAX_LOCAL = 64
MAX_DOMAIN = 255
# ESMTP parameters on one MAIL/RCPT, and octets of one "keyword=value", at most (we know five
# keywords; RFC 5321 §4.5.3.1 leaves room for extensions, not for kilobytes of them).
MAX_PARAMS = 10
MAX_PARAM_LENGTH = 500

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x80-\U0010ffff]"
_DOT_ATOM = re.compile(rf"^{_ATEXT}+(\.{_ATEXT}+)*$")
_QUOTED = re.compile(r'^"([\x20\x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]|\\[\x20-\x7e])*"$')
_LABEL = re.compile(r"^[A-Za-z0-9\x80-\U0010ffff]([A-Za-z0-9\-\x80-\U0010ffff]*"
                    r"[A-Za-z0-9\x80-\U0010ffff])?$")
_ADDRESS_LITERAL = re.compile(r"^\[[\x21-\x5a\x5e-\x7e]+\]$")
_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-]*$")
_VALUE = re.compile(r"^[\x21-\x3c\x3e-\x7e]+$")  # esmtp-value: printable except "=" and space


class PathError(ValueError):
    """The argument is not a valid path; `.non_ascii` tells a missing SMTPUTF8 from bad syntax."""

    def __init__(self, message: str, non_ascii: bool = False):
        super().__init__(message)
        self.non_ascii = non_ascii


class ParamError(PathError):
    """The ESMTP parameters are malformed, too many, too long or repeated."""


@dataclass
class PathArgument:
    address: str  # "" for the null reverse path <>
    params: dict[str, str | None] = field(default_factory=dict)  # upper-case keyword -> value

    @property
    def is_null(self) -> bool:
        return self.address == ""


def parse_path_argument(arg: str, prefix: str, allow_utf8: bool = False,
                        allow_null: bool = False) -> PathArgument:
    """Parse `FROM:<a@b> SIZE=10` (prefix "FROM:") or `TO:<a@b>`.

    `allow_utf8` is true when the transaction asked for SMTPUTF8; for MAIL the caller passes True
    and checks the SMTPUTF8 parameter itself (it comes on the same line).
    """
    if arg[: len(prefix)].upper() != prefix:
        raise PathError("expected " + prefix)
    rest = arg[len(prefix):].lstrip(" ")  # a space after the colon is common (RFC says none)
    if rest.startswith("<"):
        end = _closing_bracket(rest)
        path, tail = rest[1:end], rest[end + 1:]
    else:
        # Some old clients send MAIL FROM:a@b without brackets; accept a lone word.
        path, _, tail = rest.partition(" ")
        if not path:
            raise PathError("empty path")
    if tail and not tail.startswith(" "):
        raise PathError("garbage after path")
    params = parse_params(tail.strip())
    if path == "":
        if not allow_null:
            raise PathError("null path not allowed here")
        return PathArgument("", params)
    if path.lower() == "postmaster" and prefix == "TO:":
        # RFC 5321 §4.1.1.3: "RCPT TO:<Postmaster>" without a domain must be accepted.
        return PathArgument("postmaster", params)
    return PathArgument(check_address(path, allow_utf8), params)


def parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    items = text.split()
    if len(items) > MAX_PARAMS:
        raise ParamError(f"{len(items)} parameters")
    for item in items:
        if len(item) > MAX_PARAM_LENGTH:
            raise ParamError("parameter too long")
        key, eq, value = item.partition("=")
        if not _KEYWORD.match(key) or (eq and not _VALUE.match(value)):
            raise ParamError(f"bad parameter {item[:50]!r}")
        if key.upper() in params:
            raise ParamError(f"repeated parameter {key[:50]!r}")
        params[key.upper()] = value if eq else None
    return params


def check_address(path: str, allow_utf8: bool) -> str:
    """The mailbox of a path (source route dropped), or PathError."""
    if ":" in path and path.startswith("@"):
        path = path.split(":", 1)[1]  # RFC 5321 §4.1.2: accept and ignore a source route
    local_part, _, domain_part = path.rpartition("@")
    if not local_part or not domain_part:
        raise PathError("address needs a local part and a domain")
    if not path.isascii() and not allow_utf8:
        raise PathError("non-ASCII address without SMTPUTF8", non_ascii=True)
    if not (_DOT_ATOM.match(local_part) or _QUOTED.match(local_part)):
        raise PathError("bad local part")
    _check_parts(local_part, domain_part)
    return f"{local_part}@{domain_part}"


def _check_parts(local: str, domain: str) -> None:
    if len(local.encode()) > MAX_LOCAL or len(domain.encode()) > MAX_DOMAIN:
        raise PathError("address too long")
    if not (local + domain).isprintable():
        # Unicode controls and separators (U+0085, U+2028...) would be line breaks elsewhere.
        raise PathError("unprintable characters in address")
    if _ADDRESS_LITERAL.match(domain):
        return
    labels = domain.split(".")
    if not all(_LABEL.match(label) and len(label.encode()) <= 63 for label in labels):
        raise PathError("bad domain")


def _closing_bracket(text: str) -> int:
    """Index of the '>' closing the path, skipping quoted-string content."""
    if '"' not in text:
        end = text.find(">")  # the usual path: no quoted local part to walk through
        if end < 0:
            raise PathError("missing '>'")
        return end
    quoted = escaped = False
    for i, c in enumerate(text):
        if escaped:
            escaped = False
        elif c == "\\" and quoted:
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
    raise PathError("missing '>'")

"""Mailbox names on the wire: modified UTF-7 (RFC 3501 §5.1.3), or UTF-8 in a session that
enabled IMAP4rev2 (RFC 9051 §5.1); INBOX case-insensitive."""
from __future__ import annotations

import functools
import re
import unicodedata

import twisted.mail.imap4  # noqa: F401  registers the "imap4-utf-7" codec (RFC 3501 §5.1.3)

from mailsuite.imap import message as mime
from mailsuite.imap import responses as R
from mailsuite.imap.responses import no


def encode_name(name: str, utf8: bool = False) -> bytes:
    """`utf8`: the session enabled IMAP4rev2 (RFC 9051 §5.1, docs/design/imap.md "IMAP4rev2")."""
    if utf8:
        return name.encode("utf-8", "surrogateescape")
    return _to_utf7(name)


def decode_name(raw: bytes, utf8: bool = False) -> str:
    """The folder name a client sent; NO [CANNOT] for bytes that are not modified UTF-7 (or,
    with `utf8`, not UTF-8): the syntax (an astring) is fine, no mailbox can have that name
    (docs/design/imap.md, "Conformance"). UTF-8 names are normalized to NFC (RFC 9051 §5.1)."""
    try:
        if utf8:
            name = unicodedata.normalize("NFC", raw.decode("utf-8"))
        else:
            name = _from_utf7(bytes(raw))
    except (UnicodeError, ValueError):
        raise no("mailbox name is not valid " + ("UTF-8" if utf8 else "modified UTF-7"),
                 R.CANNOT)
    if name.upper() == "INBOX":  # RFC 3501 §5.1: INBOX in any case is the INBOX
        return "INBOX"
    return name


# Twisted's codec is pure Python, and every LIST sends every folder name, every APPEND, COPY,
# STATUS and SELECT decodes one: the few names of a server's users are converted once.
@functools.lru_cache(maxsize=4096)
def _to_utf7(name: str) -> bytes:
    return name.encode("imap4-utf-7")


@functools.lru_cache(maxsize=4096)
def _from_utf7(raw: bytes) -> str:
    return raw.decode("imap4-utf-7")


_UTF8_QUOTABLE = re.compile(rb"^[^\x00-\x1f\x7f]*$")


def quote(b: bytes, utf8: bool = False) -> bytes:
    """A quoted string, or a literal when the bytes cannot be quoted. With `utf8` (IMAP4rev2),
    UTF-8 goes in a quoted string (RFC 9051 §9, QUOTED-CHAR takes UTF8-2/3/4)."""
    if utf8 and len(b) < 1024 and _UTF8_QUOTABLE.match(b):
        try:
            b.decode("utf-8")
        except UnicodeDecodeError:
            return mime.string(b)
        return b'"' + b.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return mime.string(b)

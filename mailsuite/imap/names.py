"""Mailbox names on the wire: modified UTF-7 (RFC 3501 §5.1.3), INBOX case-insensitive."""
from __future__ import annotations

import twisted.mail.imap4  # noqa: F401  registers the "imap4-utf-7" codec (RFC 3501 §5.1.3)

from mailsuite.imap import message as mime
from mailsuite.imap import responses as R
from mailsuite.imap.responses import no


def encode_name(name: str) -> bytes:
    return name.encode("imap4-utf-7")


def decode_name(raw: bytes) -> str:
    """The folder name a client sent; NO [CANNOT] for bytes that are not modified UTF-7: the
    syntax (an astring) is fine, no mailbox can have that name (docs/design/imap.md,
    "Conformance")."""
    try:
        name = raw.decode("imap4-utf-7")
    except (UnicodeError, ValueError):
        raise no("mailbox name is not valid modified UTF-7", R.CANNOT)
    if name.upper() == "INBOX":  # RFC 3501 §5.1: INBOX in any case is the INBOX
        return "INBOX"
    return name


def quote(b: bytes) -> bytes:
    """A quoted string, or a literal when the bytes cannot be quoted."""
    return mime.string(b)

"""IMAP folder names and their Maildir++ directories (split from store.py): validation,
INBOX normalisation, modified UTF-7 directory names as Dovecot writes them, and the tab
escaping of Dovecot's `subscriptions` file, and the special-use folders (RFC 6154)."""
from __future__ import annotations

import twisted.mail.imap4  # noqa: F401  (registers the "imap4-utf-7" codec for folder names)

from mailsuite.mailbox.errors import InvalidMailboxName

DELIMITER = "/"

# RFC 6154 attributes of the folders every account gets on first login.
SPECIAL_USE: dict[str, str] = {
    "Sent": "\\Sent",
    "Drafts": "\\Drafts",
    "Trash": "\\Trash",
    "Junk": "\\Junk",
    "Archive": "\\Archive",
}

_FORBIDDEN = set("\\*%") | {chr(c) for c in range(32)} | {"\x7f"}


def canonical_name(name: str) -> str:
    """Validate an IMAP folder name (already decoded from modified UTF-7) and return it with
    INBOX normalised. Raises InvalidMailboxName for anything that could leave the Maildir."""
    if not isinstance(name, str) or not name:
        raise InvalidMailboxName("empty mailbox name")
    if name.upper() == "INBOX":
        return "INBOX"
    parts = name.split(DELIMITER)
    if parts[0].upper() == "INBOX":
        parts[0] = "INBOX"
    for part in parts:
        if not part:
            raise InvalidMailboxName("empty hierarchy level in mailbox name")
        if part.startswith("."):
            raise InvalidMailboxName("mailbox names cannot begin with '.'")
        if any(c in _FORBIDDEN for c in part):
            raise InvalidMailboxName("mailbox name contains a forbidden character")
        if part.strip() != part:
            raise InvalidMailboxName("mailbox name begins or ends with a space")
    result = DELIMITER.join(parts)
    if len(encode_folder_dir(result)) > 250:
        raise InvalidMailboxName("mailbox name too long")
    return result


def encode_folder_dir(name: str) -> str:
    """IMAP name -> Maildir++ directory: "Archive/2026" -> ".Archive.2026" (modified UTF-7
    as Dovecot stores it; a '.' inside a name is written as its UTF-7 form '&AC4-')."""
    parts = []
    for part in name.split(DELIMITER):
        enc = part.encode("imap4-utf-7").decode("ascii")
        parts.append(enc.replace(".", "&AC4-"))
    return "." + ".".join(parts)


def decode_folder_dir(entry: str) -> str:
    parts = entry[1:].split(".")
    if not all(parts):
        raise ValueError(entry)
    return DELIMITER.join(p.encode("ascii").decode("imap4-utf-7") for p in parts)


_TAB_ESCAPES = {"\x01": "1", "\t": "t", "\r": "r", "\n": "n"}
_TAB_UNESCAPES = {v: k for k, v in _TAB_ESCAPES.items()}


def _tab_escape(text: str) -> str:
    """Dovecot's str_append_tabescaped()."""
    return "".join("\x01" + _TAB_ESCAPES[c] if c in _TAB_ESCAPES else c for c in text)


def _tab_unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\x01" and i + 1 < len(text):
            out.append(_TAB_UNESCAPES.get(text[i + 1], text[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)

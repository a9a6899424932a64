"""What the SMTP server needs to know about a message's header section while it streams past.

`HeaderScan` sees the stored lines one at a time (CRLF removed, dots unstuffed) and keeps only
what the server decides on, in bounded memory: the number of `Received:` fields (a mail loop,
RFC 5321 §6.3), whether `Message-ID:` and `Date:` are present (a submission server adds them,
RFC 6409 §8) and the first one's value (for the message's events, docs/design/events.md), and
the raw values of `From:` and `Sender:` (checked on submission against the
authenticated user, docs/design/smtp.md). `header_addresses` parses those values with the email
package, strictly: anything it cannot read as a list of addresses is refused, never guessed.
"""
from __future__ import annotations

import email.errors
import email.policy
import re

# From:/Sender: text kept at most (all such fields together); more is refused on submission.
MAX_ADDRESS_TEXT = 16 * 1024
MAX_ADDRESSES = 100
MAX_MESSAGE_ID = 400  # characters of a Message-ID kept (the events' column)

# The common From: of a mail client, `Display Name <local@domain>` or `local@domain`, with a
# display name of plain words and a dot-atom address (RFC 5322 §3.4): read as the email
# package reads it, without its parser (a tenth of the CPU of a submitted message). Anything
# else (quotes, comments, encoded words, groups, several addresses) goes to the email package.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_ADDR_SPEC = rf"({_ATOM}(?:\.{_ATOM})*)@({_LABEL}(?:\.{_LABEL})+)"
_PLAIN_ADDRESS = re.compile(rf"(?:[A-Za-z0-9]+(?: [A-Za-z0-9]+)* ?)?<{_ADDR_SPEC}>|{_ADDR_SPEC}",
                            re.ASCII)


# RFC 5322 §2.2: a field name is printable US-ASCII except ":" (partition took that off).
_FIELD_NAME = re.compile(rb"[\x21-\x7e]+")


class HeaderScan:
    def __init__(self) -> None:
        self.in_header = True
        self.received = 0
        self.has_message_id = False
        self.message_id = ""  # the first Message-ID's value, unfolded and stripped
        self._in_message_id = False
        self.has_date = False
        self.address_fields: list[tuple[str, bytearray]] = []  # ("from"|"sender", raw value)
        self.address_overflow = False  # more From:/Sender: text than MAX_ADDRESS_TEXT
        self._kept = 0
        self._current: bytearray | None = None  # the From:/Sender: value being unfolded

    def line(self, line: bytes) -> bool:
        """Look at one stored line; True when it is the first line after the header section
        (the blank separator or, in a malformed message, the first non-field line)."""
        if not self.in_header:
            return False
        if line[:1] in (b" ", b"\t"):
            if self._in_message_id:
                self._keep_message_id(line)
            if self._current is not None:
                self._keep(self._current, line)  # folded (RFC 5322 §2.2.3)
            return False
        self._current = None
        self._in_message_id = False
        name, colon, value = line.partition(b":")
        if not colon or not _FIELD_NAME.fullmatch(name):
            self.in_header = False
            return True
        name = name.lower()
        if name == b"received":
            self.received += 1
        elif name == b"message-id":
            self._in_message_id = not self.has_message_id
            self.has_message_id = True
            if self._in_message_id:
                self._keep_message_id(value)
        elif name == b"date":
            self.has_date = True
        elif name in (b"from", b"sender"):
            self._current = bytearray()
            self.address_fields.append((name.decode(), self._current))
            self._keep(self._current, value)
        return False

    def _keep(self, into: bytearray, data: bytes) -> None:
        if self._kept + len(data) > MAX_ADDRESS_TEXT:
            self.address_overflow = True
            return
        self._kept += len(data)
        into += data

    def _keep_message_id(self, data: bytes) -> None:
        text = (self.message_id + data.decode("utf-8", "replace").strip()).strip()
        self.message_id = text[:MAX_MESSAGE_ID]

    def values(self, name: str) -> list[bytes]:
        return [bytes(v) for n, v in self.address_fields if n == name]


def header_addresses(raw: bytes) -> list[str] | None:
    """The addr-specs of an address-list header value (groups flattened, comments and display
    names dropped, encoded words allowed); None when it is not a clean list of addresses."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.replace("\r", "").replace("\n", "").strip()
    if not text or "\0" in text:
        return None
    plain = _PLAIN_ADDRESS.fullmatch(text)
    if plain is not None:
        local, domain = (plain.group(1), plain.group(2)) if plain.group(1) is not None \
            else (plain.group(3), plain.group(4))
        return [f"{local}@{domain}"]
    try:
        header = email.policy.default.header_factory("from", text)
        groups = header.groups
    except (email.errors.HeaderParseError, ValueError, TypeError, IndexError, AttributeError,
            RecursionError):
        return None
    if any(isinstance(d, (email.errors.InvalidHeaderDefect, email.errors.HeaderDefect))
           and not isinstance(d, email.errors.ObsoleteHeaderDefect) for d in header.defects):
        return None
    found = []
    for group in groups:
        for address in group.addresses:
            if not address.username or not address.domain:
                return None
            found.append(f"{address.username}@{address.domain}")
            if len(found) > MAX_ADDRESSES:
                return None
    return found or None

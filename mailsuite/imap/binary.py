"""BINARY (RFC 3516): FETCH BINARY[part]<o.n>, BINARY.PEEK and BINARY.SIZE, the section's
content with its Content-Transfer-Encoding removed; literal8 (`~{n}`) where the content holds
NUL. See docs/design/imap.md, "BINARY".
"""
from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from typing import Optional, Union

from mailsuite.imap import message as mime
from mailsuite.imap import responses as R
from mailsuite.imap.parser import MAX_NUMBER_DIGITS, Atom, FetchAtt, ParseError, Token
from mailsuite.imap.responses import CommandError

UNKNOWN_CTE = b"UNKNOWN-CTE"
IDENTITY = {b"", b"7bit", b"8bit", b"binary"}
DECODED = {b"base64", b"quoted-printable"}

_BINARY_ATT = re.compile(rb"^(BINARY|BINARY\.PEEK|BINARY\.SIZE)\[([0-9.]*)\](?:<(\d+)\.(\d+)>)?$", re.I)


@dataclass
class BinaryAtt(FetchAtt):
    """A BINARY, BINARY.PEEK or BINARY.SIZE fetch attribute (`section` is the part path as
    sent; RFC 3516 §4.1 allows only part numbers, no HEADER/TEXT/MIME)."""

    def response_name(self) -> bytes:
        # BINARY.PEEK is answered as BINARY; the origin is named like BODY's (RFC 3516 §4.2).
        name = b"BINARY.SIZE" if self.name == b"BINARY.SIZE" else b"BINARY"
        out = name + b"[" + b".".join(b"%d" % p for p in self.path) + b"]"
        if self.partial and self.name != b"BINARY.SIZE":
            out += b"<%d>" % self.partial[0]
        return out


def is_binary_att(tok: Token) -> bool:
    return isinstance(tok, Atom) and tok[:6].upper() == b"BINARY"


def parse_att(tok: Token) -> BinaryAtt:
    """BINARY[section-part]<o.n>, BINARY.PEEK[...]<o.n>, BINARY.SIZE[...] (RFC 3516 §4.1)."""
    m = _BINARY_ATT.match(bytes(tok))
    if not m:
        raise ParseError("invalid BINARY attribute")
    name = m.group(1).upper()
    att = BinaryAtt(name, section=m.group(2))
    if m.group(2):
        parts = m.group(2).split(b".")
        if len(parts) > 128 or any(not p or len(p) > 9 for p in parts):
            raise ParseError("invalid BINARY section")
        att.path = [int(p) for p in parts]
        if 0 in att.path:
            raise ParseError("invalid section part 0")
    if m.group(3) is not None:
        if name == b"BINARY.SIZE":
            raise ParseError("BINARY.SIZE takes no partial range")
        if len(m.group(3)) > MAX_NUMBER_DIGITS or len(m.group(4)) > MAX_NUMBER_DIGITS:
            raise ParseError("invalid partial range")
        att.partial = (int(m.group(3)), int(m.group(4)))
    return att


# -- decoding (in the io pool) -------------------------------------------------------------------

def unknown_cte(cte: bytes) -> CommandError:
    # RFC 3516 §4.3: a CTE the server cannot decode fails the FETCH with [UNKNOWN-CTE].
    return CommandError(R.NO, "cannot decode content-transfer-encoding "
                        + cte[:40].decode("ascii", "replace"), UNKNOWN_CTE)


def part_range(buf: mime.Buffer, root: mime.Part, path: list[int], size: int
               ) -> tuple[Optional[mime.Part], int, int]:
    """(part, offset, length) of the encoded content a BINARY section names: the whole message
    for an empty path, else the part's body; (None, 0, 0) for a part that does not exist."""
    if not path:
        return None, 0, size
    try:
        part = mime.find_part(root, path)
    except mime.NoSuchPart:
        return None, 0, 0
    return part, part.body_start, part.end - part.body_start


def transfer_encoding(buf: mime.Buffer, part: Optional[mime.Part]) -> bytes:
    if part is None:
        return b""
    value = mime.field_value(buf, part, b"content-transfer-encoding") or b""
    return value.split(b";", 1)[0].strip().lower()


def decode(cte: bytes, data: bytes) -> bytes:
    if cte == b"base64":
        # Lenient like a mail reader: white space and stray characters are skipped (RFC 2045
        # §6.8: characters outside the alphabet are ignored).
        try:
            return binascii.a2b_base64(data)
        except binascii.Error:
            cleaned = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
            cleaned = cleaned[:len(cleaned) - len(cleaned) % 4]
            return binascii.a2b_base64(cleaned)
    if cte == b"quoted-printable":
        return decode_qp(data)
    return data


_QP_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")


def decode_qp(data: bytes) -> bytes:
    """Quoted-printable (RFC 2045 §6.7): trailing white space of a line is dropped, `=` at the
    end of a line (before white space) joins it with the next, hard line breaks keep their
    CRLF or LF, `=XX` is an octet; a malformed `=` stays as it is."""
    out = bytearray()
    for line in data.splitlines(keepends=True):
        body = line.rstrip(b"\r\n")
        eol = line[len(body):]
        body = body.rstrip(b" \t")
        if body.endswith(b"="):
            body, eol = body[:-1], b""
        out += _QP_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), body)
        out += eol
    return bytes(out)


def content(buf: mime.Buffer, root: mime.Part, att: FetchAtt, size: int
            ) -> Union[bytes, tuple[int, int]]:
    """The decoded section: bytes, or (offset, length) of the file when its encoding is an
    identity one (7bit, 8bit, binary: the bytes are the content). CommandError [UNKNOWN-CTE]
    for other encodings."""
    part, offset, length = part_range(buf, root, att.path, size)
    cte = transfer_encoding(buf, part)
    if part is not None and part.maintype in (b"multipart", b"message"):
        cte = b""  # RFC 2045 §6.4: composite types are never encoded
    if cte in IDENTITY:
        return (offset, length)
    if cte not in DECODED:
        raise unknown_cte(cte)
    return decode(cte, bytes(buf[offset:offset + length]))


def literal8(data: bytes) -> bytes:
    """A string for BINARY content: literal8 when it holds NUL, else a literal (RFC 3516
    §4.3, erratum 3978)."""
    return (b"~{%d}\r\n" if b"\0" in data else b"{%d}\r\n") % len(data) + data


def nul_safe(data: bytes) -> bytes:
    """BODY[] content for the wire: NUL is no CHAR8 (RFC 3501 §9), so it is sent as 0x80,
    as Dovecot does; BINARY[] gives the true octets."""
    return data.replace(b"\0", b"\x80") if b"\0" in data else data

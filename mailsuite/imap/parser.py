"""IMAP command syntax: tokens, sequence sets, FETCH attributes, dates (RFC 3501 §9).

A command arrives as segments: each is a line (without CRLF and without its trailing literal
marker) and the literal that followed it, if any. Tokens are `Atom`, `Str` (quoted or literal),
and Python lists for parenthesised lists.
"""
from __future__ import annotations

import bisect
import calendar
import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union


class ParseError(Exception):
    """The command is malformed: answer BAD with str(self)."""


class Atom(bytes):
    pass


class Str(bytes):
    pass


class LiteralStr(Str):
    """A string that arrived as a literal (`{n}`), not quoted; `binary` when it was a literal8
    (`~{n}`, RFC 3516 §4.2): APPEND tells a message from a date-time by it."""

    binary: bool = False


class FileLiteral(Str):
    """A literal spooled to a file instead of memory (APPEND, docs/design/imap.md, "Lines and
    literals"): empty as bytes; `spool` holds the file, `size` its length."""

    spool: Any = None  # a spool.LiteralSpool
    size: int = 0
    binary: bool = False  # a literal8 (see LiteralStr)


MAX_DEPTH = 64  # nested parentheses in one command (docs/design/imap.md, "Limits")
MAX_NUMBER_DIGITS = 19  # a number of more digits is no valid UID, size or offset


Token = Union[Atom, Str, list]

LITERAL_MARKER = re.compile(rb"\{(\d{1,20})(\+?)\}$")
# Runs the tokenizer takes in one step instead of a byte at a time.
_ATOM_RUN = re.compile(rb'[^ ()"\[]+')  # up to a delimiter or a `[`
_QUOTED_RUN = re.compile(rb'[^"\\]+')  # up to the closing quote or a backslash
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


def tokenize(segments: list[tuple[bytes, Optional[bytes]]]) -> list[Token]:
    top: list = []
    stack = [top]
    for line, literal in segments:
        binary = literal is not None and line.endswith(b"~")
        if binary:
            line = line[:-1]  # literal8, "~{n}" (RFC 3516 §4.2)
        pos, n = 0, len(line)
        while pos < n:
            c = line[pos:pos + 1]
            if c == b" ":
                pos += 1
            elif c == b"(":
                if len(stack) > MAX_DEPTH:
                    raise ParseError("too deeply nested")
                new: list = []
                stack[-1].append(new)
                stack.append(new)
                pos += 1
            elif c == b")":
                if len(stack) == 1:
                    raise ParseError("unbalanced parenthesis")
                stack.pop()
                pos += 1
            elif c == b'"':
                out = bytearray()
                pos += 1
                while True:
                    m = _QUOTED_RUN.match(line, pos)  # the characters needing no look
                    if m is not None:
                        out += m.group()
                        pos = m.end()
                    if pos >= n:
                        raise ParseError("unterminated quoted string")
                    ch = line[pos:pos + 1]
                    if ch == b"\\" and pos + 1 < n:
                        out += line[pos + 1:pos + 2]
                        pos += 2
                    elif ch == b'"':
                        pos += 1
                        break
                    else:
                        out += ch
                        pos += 1
                stack[-1].append(Str(bytes(out)))
            else:
                start = pos
                while True:
                    m = _ATOM_RUN.match(line, pos)
                    if m is not None:
                        pos = m.end()
                    if line[pos:pos + 1] != b"[":
                        break
                    # BODY[HEADER.FIELDS (FROM TO)]<0.100> is one fetch-att (RFC 3501 §9).
                    # Without a `]` the `[` is an ordinary ATOM-CHAR: mailbox names
                    # and LIST patterns may hold it (RFC 3501 §9, atom-specials).
                    close = line.find(b"]", pos)
                    pos = close + 1 if close >= 0 else pos + 1
                atom = line[start:pos]
                if _CONTROL.search(atom) is not None:
                    raise ParseError("control character in command")
                stack[-1].append(Atom(atom))
        if isinstance(literal, FileLiteral):
            literal.binary = binary
            stack[-1].append(literal)
        elif literal is not None:
            lit = LiteralStr(literal)
            lit.binary = binary
            stack[-1].append(lit)
    if len(stack) != 1:
        raise ParseError("unbalanced parenthesis")
    return top


# -- typed argument helpers ---------------------------------------------------------------------

def astring(tok: Token) -> bytes:
    if isinstance(tok, (Atom, Str)):
        return bytes(tok)
    raise ParseError("expected a string")


def atom(tok: Token) -> bytes:
    if isinstance(tok, Atom):
        return bytes(tok)
    raise ParseError("expected an atom")


def number(tok: Token) -> int:
    if isinstance(tok, Atom) and tok.isdigit() and len(tok) < 20:
        return int(tok)
    raise ParseError("expected a number")


# -- sequence sets ------------------------------------------------------------------------------

@dataclass
class SequenceSet:
    """A parsed sequence-set; `None` stands for `*` (the largest number in use)."""

    ranges: list[tuple[Optional[int], Optional[int]]]

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        out = []
        for lo, hi in self.ranges:
            lo = largest if lo is None else lo
            hi = largest if hi is None else hi
            if lo > hi:
                lo, hi = hi, lo
            out.append((lo, hi))
        return out

    def merged(self, largest: int) -> list[tuple[int, int]]:
        """The resolved ranges sorted and coalesced: `1:*,1:*,...` a thousand times is one
        range, so SEARCH and FETCH cost no more than for the set written plainly."""
        out: list[tuple[int, int]] = []
        for lo, hi in sorted(self.resolve(largest)):
            if out and lo <= out[-1][1] + 1:
                if hi > out[-1][1]:
                    out[-1] = (out[-1][0], hi)
            else:
                out.append((lo, hi))
        return out

    def contains(self, n: int, largest: int) -> bool:
        cached = self._cache
        if cached is None or cached[0] != largest:
            merged = self.merged(largest)
            cached = self._cache = (largest, [lo for lo, _ in merged], merged)
        i = bisect.bisect_right(cached[1], n) - 1
        return i >= 0 and n <= cached[2][i][1]

    def select(self, values: list[int], largest: int) -> list[int]:
        """Members of the ascending list `values` inside the set (each once, ascending)."""
        picked: list[int] = []
        for lo, hi in self.merged(largest):
            i = bisect.bisect_left(values, lo)
            j = bisect.bisect_right(values, hi)
            picked.extend(values[i:j])
        return picked

    _cache: Optional[tuple[int, list[int], list[tuple[int, int]]]] = field(
        default=None, repr=False, compare=False)


_SEQ_RANGE = re.compile(rb"^(\d+|\*)(?::(\d+|\*))?$")


def sequence_set(tok: Token) -> SequenceSet:
    if not isinstance(tok, (Atom, Str)) or not tok:
        raise ParseError("expected a sequence set")
    ranges = []
    for piece in bytes(tok).split(b","):
        m = _SEQ_RANGE.match(piece)
        if not m or any(len(g or b"") > MAX_NUMBER_DIGITS for g in m.groups()):
            raise ParseError("invalid sequence set")
        lo = None if m.group(1) == b"*" else int(m.group(1))
        hi = lo if m.group(2) is None else (None if m.group(2) == b"*" else int(m.group(2)))
        if lo == 0 or hi == 0:
            raise ParseError("invalid sequence number 0")
        ranges.append((lo, hi))
    return SequenceSet(ranges)


def format_set(values: list[int]) -> bytes:
    """1,2,3,7 -> 1:3,7 (for COPYUID/APPENDUID)."""
    out = []
    start = prev = None
    for v in values:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            out.append(f"{start}:{prev}" if start != prev else f"{start}")
            start = prev = v
    if start is not None:
        out.append(f"{start}:{prev}" if start != prev else f"{start}")
    return ",".join(out).encode()


# -- FETCH attributes ---------------------------------------------------------------------------

@dataclass
class FetchAtt:
    name: bytes  # FLAGS, UID, ..., BODY (with section), BODY.PEEK
    section: Optional[bytes] = None  # the text between [ and ] as sent, None without brackets
    path: list[int] = field(default_factory=list)
    text: Optional[bytes] = None  # HEADER, HEADER.FIELDS, HEADER.FIELDS.NOT, TEXT, MIME
    fields: list[bytes] = field(default_factory=list)
    partial: Optional[tuple[int, int]] = None

    @property
    def peek(self) -> bool:
        return self.name == b"BODY.PEEK" or self.name in (b"RFC822.HEADER", b"RFC822.SIZE")

    def response_name(self) -> bytes:
        """How the item is named in the response: BODY[...]<origin> (RFC 3501 §7.4.2)."""
        if self.section is None:
            return self.name
        out = b"BODY[" + self.section_text() + b"]"
        if self.partial:
            out += b"<%d>" % self.partial[0]
        return out

    def section_text(self) -> bytes:
        parts = [str(p).encode() for p in self.path]
        if self.text:
            parts.append(self.text)
        out = b".".join(parts)
        if self.fields:
            out += b" (" + b" ".join(self.fields) + b")"
        return out


SIMPLE_ATTS = {b"FLAGS", b"UID", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE", b"BODY",
               b"BODYSTRUCTURE", b"RFC822", b"RFC822.HEADER", b"RFC822.TEXT"}
MACROS = {
    b"ALL": [b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE"],
    b"FAST": [b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE"],
    b"FULL": [b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE", b"BODY"],
}
_BODY_ATT = re.compile(rb"^(BODY|BODY\.PEEK)\[([^\]]*)\](?:<(\d+)\.(\d+)>)?$", re.I)
_SECTION = re.compile(rb"^((?:\d+\.)*\d+)?(?:\.?(HEADER\.FIELDS\.NOT|HEADER\.FIELDS|HEADER|TEXT|MIME))?"
                      rb"(?:\s*\((.*)\))?$", re.I | re.S)


def fetch_atts(tok: Token) -> list[FetchAtt]:
    if isinstance(tok, Atom) and tok.upper() in MACROS:
        return [FetchAtt(n) for n in MACROS[tok.upper()]]
    items = tok if isinstance(tok, list) else [tok]
    if not items:
        raise ParseError("empty fetch attribute list")
    out: list[FetchAtt] = []
    for t in items:
        # Macros belong outside parentheses (RFC 3501 §6.4.5), but imapclient sends "(ALL)".
        if isinstance(t, Atom) and t.upper() in MACROS:
            out += [FetchAtt(n) for n in MACROS[t.upper()]]
        else:
            out.append(fetch_att(t))
    return out


def fetch_att(tok: Token) -> FetchAtt:
    if not isinstance(tok, Atom):
        raise ParseError("invalid fetch attribute")
    upper = tok.upper()
    if upper in SIMPLE_ATTS:
        return FetchAtt(bytes(upper))
    if upper.startswith(b"BINARY"):
        from mailsuite.imap import binary  # RFC 3516; binary.py imports this module
        return binary.parse_att(tok)
    m = _BODY_ATT.match(tok)
    if not m:
        raise ParseError(f"unknown fetch attribute {tok[:40].decode('ascii', 'replace')}")
    att = FetchAtt(m.group(1).upper(), section=m.group(2))
    if len(m.group(2)) > 4096:
        raise ParseError("section too long")
    if m.group(3) is not None:
        if len(m.group(3)) > MAX_NUMBER_DIGITS or len(m.group(4)) > MAX_NUMBER_DIGITS:
            raise ParseError("invalid partial range")
        att.partial = (int(m.group(3)), int(m.group(4)))
    if m.group(2):
        s = _SECTION.match(m.group(2).strip())
        if not s or (s.group(3) is not None and not (s.group(2) or b"").upper().startswith(b"HEADER.FIELDS")):
            raise ParseError("invalid section")
        if s.group(1):
            parts = s.group(1).split(b".")
            # Deeper than the MIME tree we build (message.MAX_DEPTH) can name no part.
            if len(parts) > 128 or any(len(p) > 9 for p in parts):
                raise ParseError("section part too deep or too large")
            att.path = [int(p) for p in parts]
            if 0 in att.path:
                raise ParseError("invalid section part 0")
        if s.group(2):
            att.text = s.group(2).upper()
            if att.text == b"MIME" and not att.path:
                raise ParseError("MIME needs a part number")
        if att.text and att.text.startswith(b"HEADER.FIELDS"):
            if s.group(3) is None:
                raise ParseError("HEADER.FIELDS needs a list")
            names = [n for n in re.split(rb"\s+", s.group(3).strip()) if n]
            if not names:
                raise ParseError("HEADER.FIELDS needs field names")
            att.fields = [n.strip(b'"').upper() for n in names]
    return att


# -- dates --------------------------------------------------------------------------------------

MONTHS = [b"JAN", b"FEB", b"MAR", b"APR", b"MAY", b"JUN", b"JUL", b"AUG", b"SEP", b"OCT",
          b"NOV", b"DEC"]
_DATE = re.compile(rb"^(\d{1,2})-([A-Za-z]{3})-(\d{4})$")
_DATE_TIME = re.compile(rb"^ ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)$")


def search_date(tok: Token) -> tuple[int, int, int]:
    m = _DATE.match(astring(tok))
    if not m or m.group(2).upper() not in MONTHS:
        raise ParseError("invalid date")
    return int(m.group(3)), MONTHS.index(m.group(2).upper()) + 1, int(m.group(1))


def date_time(tok: Token) -> float:
    """APPEND's date-time ("17-Jul-1996 02:44:25 -0700") as POSIX time."""
    m = _DATE_TIME.match(astring(tok))
    if not m or m.group(2).upper() not in MONTHS:
        raise ParseError("invalid date-time")
    day, mon, year = int(m.group(1)), MONTHS.index(m.group(2).upper()) + 1, int(m.group(3))
    hh, mm, ss = int(m.group(4)), int(m.group(5)), int(m.group(6))
    try:
        t = calendar.timegm((year, mon, day, hh, mm, ss, 0, 0, 0))
    except (ValueError, OverflowError):
        raise ParseError("invalid date-time")
    offset = (int(m.group(8)) * 3600 + int(m.group(9)) * 60) * (1 if m.group(7) == b"+" else -1)
    return float(t - offset)


def format_internaldate(t: float) -> bytes:
    tm = time.gmtime(t)
    return b'"%02d-%s-%04d %02d:%02d:%02d +0000"' % (
        tm.tm_mday, MONTHS[tm.tm_mon - 1].capitalize(), tm.tm_year, tm.tm_hour, tm.tm_min, tm.tm_sec)

"""SEARCH (RFC 3501 §6.4.4): parse the keys into a tree, evaluate it per message.

Keys that only need the index (flags, UID, sizes, INTERNALDATE) never open the message file;
the others load it once per message. String keys match case-insensitively after decoding
RFC 2047 encoded words, as Thunderbird expects for non-ASCII subjects (docs/design/imap.md,
"SEARCH").
"""
from __future__ import annotations

import base64
import binascii
import codecs
import datetime
import email.header
import email.utils
import quopri
import re
import time
import unicodedata
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

from mailsuite.imap import message as mimeparse
from mailsuite.imap.parser import Atom, ParseError, Token, astring, format_set, number, \
    search_date, sequence_set

FLAG_KEYS = {
    b"ANSWERED": ("\\Answered", True), b"UNANSWERED": ("\\Answered", False),
    b"DELETED": ("\\Deleted", True), b"UNDELETED": ("\\Deleted", False),
    b"DRAFT": ("\\Draft", True), b"UNDRAFT": ("\\Draft", False),
    b"FLAGGED": ("\\Flagged", True), b"UNFLAGGED": ("\\Flagged", False),
    b"SEEN": ("\\Seen", True), b"UNSEEN": ("\\Seen", False),
}


@dataclass
class Candidate:
    """What a search key may look at for one message."""

    seq: int
    uid: int
    flags: frozenset
    recent: bool
    size: int
    internaldate: float
    load: Callable[[], bytes]  # reads the message file (only called when a key needs it)
    _raw: Optional[bytes] = None
    modseq: int = 0  # RFC 7162 mod-sequence

    @property
    def raw(self) -> bytes:
        if self._raw is None:
            self._raw = self.load()
        return self._raw


Node = tuple


def parse(tokens: list[Token], charset_ok: bool = True) -> Node:
    """The search program (an AND of keys) from the tokens after SEARCH."""
    toks = list(tokens)
    if toks and isinstance(toks[0], Atom) and toks[0].upper() == b"CHARSET":
        if len(toks) < 2:
            raise ParseError("CHARSET needs a name")
        cs = astring(toks[1]).upper()
        if cs not in (b"UTF-8", b"US-ASCII"):
            raise BadCharset(cs)
        toks = toks[2:]
    if not toks:
        raise ParseError("SEARCH needs a key")
    keys = []
    queue = deque(toks)  # popped from the left: a long flat key list stays linear
    while queue:
        keys.append(_key(queue, 0))
    return ("AND", keys)


# NOT, OR and parenthesised groups nest; evaluating them recurses, so their depth is capped
# (docs/design/imap.md, "Limits"). Real clients nest a handful of levels.
MAX_DEPTH = 100


class BadCharset(ParseError):
    pass


def _key(toks: deque, depth: int) -> Node:
    if depth > MAX_DEPTH:
        raise ParseError("search keys nested too deeply")
    tok = toks.popleft()
    if isinstance(tok, list):
        if not tok:
            raise ParseError("empty search group")
        inner = deque(tok)
        keys = []
        while inner:
            keys.append(_key(inner, depth + 1))
        return ("AND", keys)
    if not isinstance(tok, Atom):
        raise ParseError("invalid search key")
    k = tok.upper()

    def arg() -> Token:
        if not toks:
            raise ParseError(f"{k.decode()} needs an argument")
        return toks.popleft()

    if k == b"ALL":
        return ("ALL",)
    if k in FLAG_KEYS:
        flag, want = FLAG_KEYS[k]
        return ("FLAG", flag, want)
    if k in (b"KEYWORD", b"UNKEYWORD"):
        return ("FLAG", astring(arg()).decode("ascii", "replace"), k == b"KEYWORD")
    if k == b"NEW":
        return ("AND", [("RECENT",), ("FLAG", "\\Seen", False)])
    if k == b"OLD":
        return ("NOT", ("RECENT",))
    if k == b"RECENT":
        return ("RECENT",)
    if k == b"NOT":
        if not toks:
            raise ParseError("NOT needs a key")
        return ("NOT", _key(toks, depth + 1))
    if k == b"OR":
        if not toks:
            raise ParseError("OR needs two keys")
        a = _key(toks, depth + 1)
        if not toks:
            raise ParseError("OR needs two keys")
        return ("OR", a, _key(toks, depth + 1))
    if k in (b"LARGER", b"SMALLER"):
        return (k.decode(), number(arg()))
    if k in (b"BEFORE", b"ON", b"SINCE", b"SENTBEFORE", b"SENTON", b"SENTSINCE"):
        return (k.decode(), search_date(arg()))
    if k in (b"FROM", b"TO", b"CC", b"BCC", b"SUBJECT"):
        return ("HEADER", k.lower(), _fold(astring(arg())))
    if k == b"HEADER":
        name = astring(arg()).lower()
        return ("HEADER", name, _fold(astring(arg())))
    if k in (b"BODY", b"TEXT"):
        return (k.decode(), _fold(astring(arg())))
    if k == b"UID":
        a = arg()
        if a == b"$":
            return ("SAVED",)
        return ("UID", sequence_set(a))
    if k == b"$":  # RFC 5182 §2: the saved result as a sequence set
        return ("SAVED",)
    if k in (b"OLDER", b"YOUNGER"):  # RFC 5032
        n = number(arg())
        if n == 0:
            raise ParseError(f"{k.decode()} needs a positive interval")
        return (k.decode(), n)
    if k == b"MODSEQ":
        return _modseq_key(toks)
    if re.match(rb"^[\d*:,]+$", k):
        return ("SEQ", sequence_set(tok))
    raise ParseError(f"unknown search key {k[:40].decode('ascii', 'replace')}")


def _modseq_key(toks: deque) -> Node:
    """MODSEQ [entry-name entry-type] n (RFC 7162 §3.1.5): flags are our only metadata, and
    a message's mod-sequence covers all of them, so the entry is checked and then ignored."""
    if len(toks) >= 3 and not (isinstance(toks[0], Atom) and toks[0].isdigit()):
        entry = astring(toks.popleft())
        kind = astring(toks.popleft()).lower()
        if kind not in (b"priv", b"shared", b"all") or not entry.lower().startswith(b"/flags/"):
            raise ParseError("invalid MODSEQ entry")
    if not toks:
        raise ParseError("MODSEQ needs a mod-sequence")
    return ("MODSEQ", number(toks.popleft()))


def _fold(b: bytes) -> str:
    """A search string as it is compared (docs/design/imap.md, "Conformance")."""
    try:
        return _norm(b.decode("utf-8"))
    except UnicodeDecodeError:
        return RawNeedle(b)


def _norm(text: str) -> str:
    """Dovecot's search form: canonically decomposed, each character in simple upper case
    (`u` is found in `ü`; `ß` stays `ß`, it is not `SS`)."""
    if text.isascii():
        return text.upper()
    text = unicodedata.normalize("NFD", text)
    up = text.upper()
    if len(up) == len(text):
        return up  # no character expanded (the common case: one C call)
    return "".join(u if len(u := c.upper()) == 1 else c for c in text)


class RawNeedle(str):
    """A search string that is not valid UTF-8 (imaptest cuts characters in half): compared
    as bytes against the text in Dovecot's form, decomposed and each character in simple upper
    case, with its valid runs put in the same form."""

    def __new__(cls, raw: bytes) -> "RawNeedle":
        self = super().__new__(cls, raw.decode("utf-8", "replace"))
        self.raw = b"".join(_norm(run.decode("utf-8")).encode("utf-8") if valid else run
                            for valid, run in _utf8_runs(raw))
        return self


def _utf8_runs(raw: bytes):
    """(valid?, bytes) runs of `raw`: valid UTF-8 and the bytes between."""
    pos = 0
    while pos < len(raw):
        try:
            raw[pos:].decode("utf-8")
            yield True, raw[pos:]
            return
        except UnicodeDecodeError as e:
            if e.start:
                yield True, raw[pos:pos + e.start]
            yield False, raw[pos + e.start:pos + e.end]
            pos += e.end


def _contains(needle: str, text: str) -> bool:
    if isinstance(needle, RawNeedle):
        return needle.raw in _norm(text).encode("utf-8", "replace")
    return needle in _norm(text)


def needs_file(node: Node) -> bool:
    op = node[0]
    if op == "AND":
        return any(needs_file(n) for n in node[1])
    if op == "OR":
        return needs_file(node[1]) or needs_file(node[2])
    if op == "NOT":
        return needs_file(node[1])
    return op in ("HEADER", "BODY", "TEXT", "SENTBEFORE", "SENTON", "SENTSINCE")


def needs_date(node: Node) -> bool:
    """Whether a program reads INTERNALDATEs (to date them in bulk first:
    docs/design/maildir.md, "Dates on demand")."""
    op = node[0]
    if op == "AND":
        return any(needs_date(n) for n in node[1])
    if op == "OR":
        return needs_date(node[1]) or needs_date(node[2])
    if op == "NOT":
        return needs_date(node[1])
    return op in ("BEFORE", "ON", "SINCE", "OLDER", "YOUNGER")


def uses_recent(node: Node) -> bool:
    """Whether a program has RECENT, NEW or OLD: no search keys of IMAP4rev2 (RFC 9051
    Appendix E)."""
    op = node[0]
    if op == "AND":
        return any(uses_recent(n) for n in node[1])
    if op == "OR":
        return uses_recent(node[1]) or uses_recent(node[2])
    if op == "NOT":
        return uses_recent(node[1])
    return op == "RECENT"


def matches(node: Node, c: Candidate, max_seq: int, max_uid: int) -> bool:
    op = node[0]
    if op == "AND":
        return all(matches(n, c, max_seq, max_uid) for n in node[1])
    if op == "OR":
        return matches(node[1], c, max_seq, max_uid) or matches(node[2], c, max_seq, max_uid)
    if op == "NOT":
        return not matches(node[1], c, max_seq, max_uid)
    if op == "ALL":
        return True
    if op == "FLAG":
        present = any(f.lower() == node[1].lower() for f in c.flags)
        return present == node[2]
    if op == "RECENT":
        return c.recent
    if op == "LARGER":
        return c.size > node[1]
    if op == "SMALLER":
        return c.size < node[1]
    if op == "UID":
        return node[1].contains(c.uid, max_uid)
    if op == "SEQ":
        return node[1].contains(c.seq, max_seq)
    if op == "UIDSET":  # "$" after with_saved()
        return c.uid in node[1]
    if op == "OLDER":  # RFC 5032 §3: INTERNALDATE at least n seconds ago
        return c.internaldate <= now() - node[1]
    if op == "YOUNGER":
        return c.internaldate > now() - node[1]
    if op == "MODSEQ":
        return c.modseq >= node[1]
    if op in ("BEFORE", "ON", "SINCE"):
        return _cmp_date(op, datetime.date.fromtimestamp(c.internaldate), node[1])
    if op in ("SENTBEFORE", "SENTON", "SENTSINCE"):
        d = _sent_date(c.raw)
        return d is not None and _cmp_date(op[4:], d, node[1])
    if op == "HEADER":
        return _header_contains(c.raw, node[1], node[2])
    if op == "BODY":
        return _contains(node[1], _body_text(c.raw)) or _in_raw_body(node[1], c.raw)
    if op == "TEXT":
        return (_contains(node[1], _header_text(c.raw)) or _contains(node[1], _body_text(c.raw))
                or _in_raw_body(node[1], c.raw))
    raise ParseError(op)


def with_saved(node: Node, saved: frozenset) -> Node:
    """The program with "$" (RFC 5182) replaced by the saved UIDs."""
    op = node[0]
    if op == "SAVED":
        return ("UIDSET", saved)
    if op == "AND":
        return ("AND", [with_saved(n, saved) for n in node[1]])
    if op == "OR":
        return ("OR", with_saved(node[1], saved), with_saved(node[2], saved))
    if op == "NOT":
        return ("NOT", with_saved(node[1], saved))
    return node


# -- ESEARCH (RFC 4731) and SEARCHRES (RFC 5182) ---------------------------------------------------

RETURN_OPTIONS = {b"MIN", b"MAX", b"ALL", b"COUNT", b"SAVE"}


def parse_return(tokens: list[Token]) -> tuple[Optional[set], list[Token]]:
    """(RETURN options or None without RETURN, the remaining tokens). `RETURN ()` means ALL
    (RFC 4731 §3.1)."""
    if not tokens or not isinstance(tokens[0], Atom) or tokens[0].upper() != b"RETURN":
        return None, list(tokens)
    if len(tokens) < 2 or not isinstance(tokens[1], list):
        raise ParseError("RETURN needs a parenthesised list of options")
    opts = set()
    for t in tokens[1]:
        if not isinstance(t, Atom) or t.upper() not in RETURN_OPTIONS:
            raise ParseError("unknown RETURN option")
        opts.add(t.upper())
    if not opts:
        opts = {b"ALL"}
    return opts, list(tokens[2:])


def asks_save(tokens: list[Token]) -> bool:
    """Whether a SEARCH asks to SAVE, even when it is malformed: a failing SEARCH with SAVE
    empties the saved result (RFC 5182 §2.1)."""
    return (len(tokens) >= 2 and isinstance(tokens[0], Atom) and tokens[0].upper() == b"RETURN"
            and isinstance(tokens[1], list)
            and any(isinstance(t, Atom) and t.upper() == b"SAVE" for t in tokens[1]))


def saved_result(opts: set, uids: list[int]) -> list[int]:
    """What SAVE keeps (RFC 5182 §2.1): MIN and/or MAX alone keep only those messages."""
    if not uids or opts & {b"ALL", b"COUNT"} or not opts & {b"MIN", b"MAX"}:
        return list(uids)
    keep = set()
    if b"MIN" in opts:
        keep.add(min(uids))
    if b"MAX" in opts:
        keep.add(max(uids))
    return sorted(keep)


def esearch_response(tag: bytes, uid: bool, opts: set, numbers: list[int]) -> Optional[bytes]:
    """The untagged ESEARCH line (RFC 4731 §3.1), None when only SAVE was asked (RFC 5182
    §2.1)."""
    if opts == {b"SAVE"}:
        return None
    out = b"* ESEARCH (TAG \"" + tag + b"\")"
    if uid:
        out += b" UID"
    if numbers:
        if b"MIN" in opts:
            out += b" MIN %d" % min(numbers)
        if b"MAX" in opts:
            out += b" MAX %d" % max(numbers)
        if b"ALL" in opts:
            out += b" ALL " + format_set(sorted(numbers))
    if b"COUNT" in opts:
        out += b" COUNT %d" % len(numbers)
    return out


def _cmp_date(op: str, d: datetime.date, ymd: tuple[int, int, int]) -> bool:
    try:
        want = datetime.date(*ymd)
    except ValueError:
        return False
    if op == "BEFORE":
        return d < want
    if op == "ON":
        return d == want
    return d >= want


def _root(raw: bytes) -> mimeparse.Part:
    return mimeparse.parse(raw)


def _sent_date(raw: bytes) -> Optional[datetime.date]:
    root = mimeparse.Part(0, 0, 0, mimeparse.parse_headers(raw, 0, mimeparse.header_end(raw)))
    v = mimeparse.field_value(raw, root, b"date")
    if not v:
        return None
    try:
        dt = email.utils.parsedate_to_datetime(v.decode("ascii", "replace"))
    except (TypeError, ValueError, IndexError):
        return None
    return dt.date() if dt else None


def decode_header(value: bytes) -> str:
    """Unfolded header value with RFC 2047 encoded words decoded (raw UTF-8 kept as is)."""
    text = value.decode("utf-8", "replace")
    if "=?" not in text:
        return text
    try:
        out = []
        for chunk, cs in email.header.decode_header(text):
            if isinstance(chunk, bytes):
                out.append(chunk.decode(cs or "utf-8", "replace") if _known(cs) else
                           chunk.decode("utf-8", "replace"))
            else:
                out.append(chunk)
        return "".join(out)
    except (ValueError, LookupError, UnicodeError):
        return text


def _known(cs: Optional[str]) -> bool:
    try:
        codecs.lookup(cs or "utf-8")
        return True
    except LookupError:
        return False


ADDRESS_FIELDS = {b"from", b"to", b"cc", b"bcc", b"sender", b"reply-to"}


def _header_contains(raw: bytes, name: bytes, needle: str) -> bool:
    end = mimeparse.header_end(raw)
    for n, s, e in mimeparse.parse_headers(raw, 0, end):
        if n == name:
            value = re.sub(rb"\r?\n(?=[ \t])", b"", raw[s:e].split(b":", 1)[1]).strip()
            if _contains(needle, decode_header(value)):
                return True
            # Address fields also match their addresses without comments and folding
            # (`<user (c)@ (c) domain>` is user@domain; docs/design/imap.md, "Conformance").
            if name in ADDRESS_FIELDS and any(
                    _contains(needle, decode_header(a))
                    for a in mimeparse.address_strings(value)):
                return True
    # RFC 3501: HEADER with an empty string matches every message that has the field.
    return False


def _header_text(raw: bytes) -> str:
    end = mimeparse.header_end(raw)
    return decode_header(raw[:end])


def _in_raw_body(needle: str, raw: bytes) -> bool:
    """The body as stored, transfer encoding and all: Dovecot's BODY finds `=` of a
    quoted-printable soft line break too, and imaptest expects it to."""
    return _contains(needle, raw[mimeparse.header_end(raw):].decode("utf-8", "replace"))


def _body_text(raw: bytes) -> str:
    """The text of every leaf part, transfer-decoded and charset-decoded, and the MIME
    headers of the parts below the top (Dovecot's BODY finds `charset=` there too)."""
    root = _root(raw)
    out: list[str] = []

    def walk(p: mimeparse.Part) -> None:
        if p is not root and p.body_start > p.start:
            out.append(_header_text(raw[p.start:p.body_start]))
        if p.children:
            for c in p.children:
                walk(c)
            return
        if p.message is not None:
            out.append(_header_text(raw[p.message.start:p.message.body_start]))
            walk(p.message)
            return
        body = raw[p.body_start:p.end]
        enc = (mimeparse.field_value(raw, p, b"content-transfer-encoding") or b"").strip().lower()
        if enc == b"base64":
            try:
                body = base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", body) + b"==", validate=False)
            except (binascii.Error, ValueError):
                pass
        elif enc == b"quoted-printable":
            body = quopri.decodestring(body)
        cs = (mimeparse.param(p.params, b"charset") or b"utf-8").decode("ascii", "replace")
        if not _known(cs):
            cs = "utf-8"
        out.append(body.decode(cs, "replace"))

    walk(root)
    return "\n".join(out)


def now() -> float:
    return time.time()

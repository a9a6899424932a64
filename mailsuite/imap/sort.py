"""SORT (RFC 5256 §3) and SORT=DISPLAY (RFC 5957): the header values the sort keys and the
THREAD algorithms (thread.py) look at, the base subject (RFC 5256 §2.1), and the ordering.

Header values are read once per message per command from the header block only, and kept in a
small process-wide cache keyed by the message's stable Maildir key: a webmail client sorts the
same folder on every page view (docs/design/imap.md, "SORT and THREAD").
"""
from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass
from typing import Optional, Sequence

from mailsuite.imap import message as mimeparse
from mailsuite.imap.parser import Atom, ParseError, Token
from mailsuite.imap.search import decode_header
from mailsuite.mailbox.memo import BoundedMemo

# -- base subject (RFC 5256 §2.1) ----------------------------------------------------------------

_WS = re.compile(r"[ \t\r\n]+")
_TRAILER = re.compile(r"(?:\(fwd\)|[ \t])$", re.I)
_BLOB = r"\[[^\[\]]*\][ \t]*"
_LEADER = re.compile(r"(?:" + _BLOB + r")*(?:re|fwd?)[ \t]*(?:" + _BLOB + r")?:|[ \t]", re.I)
_BLOB_RE = re.compile(_BLOB)


def base_subject(subject: str) -> tuple[str, bool]:
    """(base subject, was it a reply or forward?) of a decoded subject (RFC 5256 §2.1)."""
    s = _WS.sub(" ", subject)  # step 1: tabs and continuations to a single space
    reply = False
    while True:
        while True:  # step 2: trailing "(fwd)" and white space
            m = _TRAILER.search(s)
            if not m:
                break
            if m.group() != " ":
                reply = True
            s = s[:m.start()]
        while True:  # steps 3-5: leaders ("Re:", "Fwd:", "[list] Re:") and leading blobs
            changed = False
            m = _LEADER.match(s)
            while m and m.end() > 0:
                if m.group().strip():
                    reply = True
                s = s[m.end():]
                changed = True
                m = _LEADER.match(s)
            m = _BLOB_RE.match(s)
            if m and s[m.end():].strip():
                s = s[m.end():]
                changed = True
            if not changed:
                break
        if s[:5].lower() == "[fwd:" and s.endswith("]"):  # step 6
            s = s[5:-1]
            reply = True
            continue
        return s, reply


def fold(s: str) -> str:
    """The comparator's key: upper case, as Dovecot's i;unicode-casemap title case compares."""
    return s.upper()


# -- header values -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Fields:
    """What SORT and THREAD look at of one message (strings already folded for comparing)."""

    subject: str  # base subject, folded
    reply: bool  # the subject was a reply or forward (THREAD=REFERENCES §5)
    sent: Optional[float]  # Date: as POSIX time (UTC); None when missing or unparsable
    from_: str
    to: str
    cc: str
    display_from: str
    display_to: str
    message_id: Optional[str]
    references: tuple[str, ...]  # References, else the first In-Reply-To id


_MSGID = re.compile(rb"<([^<>\s]+)>")
_GROUP = re.compile(r'^\s*((?:"(?:[^"\\]|\\.)*"|[^:<>@",;()])+)\s*:')


def _first_address(value: Optional[bytes]) -> tuple[str, str]:
    """(addr-mailbox, display name or addr-spec) of the first address (RFC 5256 §3, RFC 5957).
    A group's first "address" is the group itself, as in ENVELOPE (RFC 3501 §7.4.2)."""
    if not value:
        return "", ""
    text = decode_header(value)
    g = _GROUP.match(text)
    if g:
        name = g.group(1).strip().strip('"')
        return name, name
    pairs = email.utils.getaddresses([text])
    for name, addr in pairs:
        if not name and not addr:
            continue
        local = addr.rpartition("@")[0] if "@" in addr else addr
        return local, (name.strip() or addr)
    return "", ""


def _ids(value: Optional[bytes]) -> list[str]:
    if not value:
        return []
    return [m.decode("utf-8", "replace") for m in _MSGID.findall(value)]


def fields_of(header: bytes) -> Fields:
    """The Fields of a message's header block (no I/O)."""
    end = mimeparse.header_end(header)
    root = mimeparse.Part(0, end, len(header), mimeparse.parse_headers(header, 0, end))

    def f(name: bytes) -> Optional[bytes]:
        return mimeparse.field_value(header, root, name)

    subj, reply = base_subject(decode_header(f(b"subject") or b""))
    sent: Optional[float] = None
    d = f(b"date")
    if d:
        try:
            t = email.utils.parsedate_tz(d.decode("ascii", "replace"))
            if t is not None:
                sent = float(email.utils.mktime_tz(t))
        except (TypeError, ValueError, OverflowError, IndexError):
            sent = None
    frm, dfrm = _first_address(f(b"from"))
    to, dto = _first_address(f(b"to"))
    cc, _ = _first_address(f(b"cc"))
    mid = _ids(f(b"message-id"))
    refs = _ids(f(b"references"))
    if not refs:
        refs = _ids(f(b"in-reply-to"))[:1]
    return Fields(fold(subj), reply, sent, fold(frm), fold(to), fold(cc), fold(dfrm), fold(dto),
                  mid[0] if mid else None, tuple(refs))


class FieldCache(BoundedMemo):
    """A bounded LRU of Fields by (folder directory, Maildir key): a message's file never
    changes, only its name (flags) does. Shared by the io pool's threads."""

    def __init__(self, size: int = 50_000):
        super().__init__(size)


CACHE = FieldCache()


def load_fields(folder, infos: Sequence, cache: FieldCache = CACHE) -> list[Optional[Fields]]:
    """Fields of each MessageInfo (None for a message whose file vanished); runs in the io
    pool. Only the header block is read."""
    from mailsuite.imap.fetch import read_header  # fetch imports the command modules
    from mailsuite.mailbox.store import LockBusy, NoSuchMessage
    out: list[Optional[Fields]] = []
    for info in infos:
        key = (info.cur_dir, info.key)
        v = cache.get(key)
        if v is None:
            try:
                with folder.open_message(info.uid) as fh:
                    v = fields_of(read_header(fh))
            except LockBusy:
                raise  # not a vanished message: the pool waits and runs the job again
            except (NoSuchMessage, OSError):
                out.append(None)
                continue
            cache.put(key, v)
        out.append(v)
    return out


# -- SORT ---------------------------------------------------------------------------------------

KEYS = {b"ARRIVAL", b"CC", b"DATE", b"FROM", b"SIZE", b"SUBJECT", b"TO",
        b"DISPLAYFROM", b"DISPLAYTO"}
HEADER_KEYS = {b"CC", b"DATE", b"FROM", b"SUBJECT", b"TO", b"DISPLAYFROM", b"DISPLAYTO"}


def parse_criteria(tok: Token) -> list[tuple[bytes, bool]]:
    """`(REVERSE SUBJECT DATE)` -> [(b"SUBJECT", True), (b"DATE", False)] (RFC 5256 §3)."""
    if not isinstance(tok, list) or not tok:
        raise ParseError("SORT needs a parenthesised list of sort criteria")
    out: list[tuple[bytes, bool]] = []
    reverse = False
    for t in tok:
        if not isinstance(t, Atom):
            raise ParseError("invalid sort criterion")
        k = t.upper()
        if k == b"REVERSE":
            if reverse:
                raise ParseError("REVERSE REVERSE")
            reverse = True
            continue
        if k not in KEYS:
            raise ParseError(f"unknown sort criterion {k[:40].decode('ascii', 'replace')}")
        out.append((k, reverse))
        reverse = False
    if reverse or not out:
        raise ParseError("REVERSE needs a sort key after it")
    return out


@dataclass
class Item:
    """One message to order: its number (sequence number or UID, as answered), UID, size,
    INTERNALDATE and header Fields (None when no header key is needed)."""

    num: int
    uid: int
    size: int
    internaldate: float
    fields: Optional[Fields]

    @property
    def date(self) -> float:
        """Sent date, INTERNALDATE when there is none (RFC 5256 §2.2)."""
        f = self.fields
        return f.sent if f is not None and f.sent is not None else self.internaldate


def _value(item: Item, key: bytes):
    if key == b"ARRIVAL":
        return item.internaldate
    if key == b"SIZE":
        return item.size
    if key == b"DATE":
        return item.date
    f = item.fields
    if f is None:
        return ""
    return {b"CC": f.cc, b"FROM": f.from_, b"SUBJECT": f.subject, b"TO": f.to,
            b"DISPLAYFROM": f.display_from, b"DISPLAYTO": f.display_to}[key]


def sort_items(items: list[Item], criteria: list[tuple[bytes, bool]]) -> list[int]:
    """The numbers of `items` in SORT order. Ties fall back to the sequence order (UID order)
    whatever REVERSE says (RFC 5256 §3: REVERSE reverses the key that follows it)."""
    ordered = sorted(items, key=lambda it: it.uid)
    # Stable sorts from the least significant key to the most significant.
    for key, reverse in reversed(criteria):
        ordered.sort(key=lambda it, k=key: _value(it, k), reverse=reverse)
    return [it.num for it in ordered]


def needs_headers(criteria: list[tuple[bytes, bool]]) -> bool:
    return any(k in HEADER_KEYS for k, _ in criteria)

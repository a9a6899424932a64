"""APPEND (RFC 3501 §6.3.11) with MULTIAPPEND (RFC 3502: several messages, all or none),
CATENATE (RFC 4469: a message built from literals and IMAP URLs to messages of the user's own
mailboxes, RFC 5092 subset) and literal8 messages (RFC 3516 §4.2). See docs/design/imap.md,
"APPEND: MULTIAPPEND and CATENATE".
"""
from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Optional, Union

from twisted.internet import defer

from mailsuite.imap import message as mime
from mailsuite.imap import responses as R
from mailsuite.imap.flags import parse_flags
from mailsuite.imap.messages import _keywords, check_keyword_room
from mailsuite.imap.names import decode_name
from mailsuite.imap.parser import Atom, FileLiteral, LiteralStr, ParseError, Str, Token, astring, \
    date_time, fetch_att, format_set
from mailsuite.imap.responses import CommandError, bad, no, no_for
from mailsuite.imap.selection import then_refresh
from mailsuite.imap.session import Session
from mailsuite.mailbox.errors import LockBusy
from mailsuite.mailbox.store import Account, Folder, MailboxError, NoSuchMessage

MAX_CAT_PARTS = 100  # TEXT and URL parts of one CATENATE
BADURL = b"BADURL"


@dataclass
class CatUrl:
    """An IMAP URL to a message or part in one of the user's mailboxes (RFC 5092 §6)."""

    raw: bytes
    mailbox: str
    uid: int
    uidvalidity: Optional[int] = None
    section: bytes = b""
    partial: Optional[tuple[int, Optional[int]]] = None


@dataclass
class AppendMessage:
    flags: list[str]
    date: Optional[float]
    parts: list[Union[Str, CatUrl]] = field(default_factory=list)  # one literal, or CATENATE's


class BadUrl(Exception):
    pass


# Relative ("/mailbox...") or absolute ("imap://[user@]host[:port]/mailbox...") forms of
# RFC 5092 §6 with ;UIDVALIDITY, ;UID, ;SECTION and ;PARTIAL; no ;URLAUTH, no search URLs.
_URL = re.compile(
    r"^(?:imap://(?:(?P<user>[^@/;]*)(?:;AUTH=[^@/]*)?@)?[^/]*)?"
    r"/(?P<mailbox>[^;?#]+?)(?:;UIDVALIDITY=(?P<validity>[1-9]\d{0,9}))?"
    r"/;UID=(?P<uid>[1-9]\d{0,9})"
    r"(?:/;SECTION=(?P<section>[^;?#]+?))?"
    r"(?:/;PARTIAL=(?P<origin>\d{1,10})(?:\.(?P<length>[1-9]\d{0,9}))?)?$", re.I)


def parse_url(raw: bytes, user: Optional[str]) -> CatUrl:
    """The URL of a CATENATE part; BadUrl for anything but a message (part) of this user."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise BadUrl("not an IMAP URL")
    m = _URL.match(text)
    if not m:
        raise BadUrl("not a supported IMAP URL")
    if m.group("user"):
        # An absolute URL names its user: only the session's own mailboxes can be read.
        who = urllib.parse.unquote(m.group("user"))
        if user is None or who.lower() != user.lower():
            raise BadUrl("another user's URL")
    try:
        mailbox = urllib.parse.unquote(m.group("mailbox"), errors="strict")
    except UnicodeDecodeError:
        raise BadUrl("mailbox name is not UTF-8")
    if mailbox.upper() == "INBOX":
        mailbox = "INBOX"
    section = urllib.parse.unquote_to_bytes(m.group("section") or "")
    url = CatUrl(raw, mailbox, int(m.group("uid")),
                 int(m.group("validity")) if m.group("validity") else None, section)
    if m.group("origin") is not None:
        url.partial = (int(m.group("origin")),
                       int(m.group("length")) if m.group("length") else None)
    if section:
        try:
            att = fetch_att(Atom(b"BODY.PEEK[" + section + b"]"))
        except ParseError:
            raise BadUrl("invalid section")
        if att.partial is not None:
            raise BadUrl("invalid section")
    return url


def parse_append(args: list[Token], user: Optional[str],
                 utf8: bool = False) -> tuple[str, list[AppendMessage]]:
    """APPEND mailbox 1*([flags] [date-time] (literal / CATENATE (cat-part...))) (RFC 3502 §6.3.11,
    RFC 4469 §5). A date-time is always quoted: a literal is a message."""
    args = list(args)
    if len(args) < 2:
        raise bad("APPEND needs a mailbox and a message")
    if isinstance(args[0], FileLiteral):
        raise bad("mailbox name too long")
    name = decode_name(astring(args.pop(0)), utf8)
    messages: list[AppendMessage] = []
    while args:
        flags: list[str] = []
        date: Optional[float] = None
        if isinstance(args[0], list):
            flags = [f for f in parse_flags(args.pop(0)) if f != "\\Recent"]
        if len(args) > 1 and _quoted(args[0]):
            date = date_time(args.pop(0))
        if not args:
            raise bad("APPEND needs the message as a literal")
        tok = args.pop(0)
        msg = AppendMessage(flags, date)
        if isinstance(tok, Atom) and tok.upper() == b"CATENATE":
            if not args or not isinstance(args[0], list) or not args[0]:
                raise bad("CATENATE needs a list of parts")
            msg.parts = _cat_parts(args.pop(0), user)
        elif isinstance(tok, Str):
            msg.parts = [tok]
        else:
            raise bad("APPEND needs the message as a literal")
        messages.append(msg)
    return name, messages


def _quoted(tok: Token) -> bool:
    return isinstance(tok, Str) and not isinstance(tok, (LiteralStr, FileLiteral))


def _cat_parts(items: list[Token], user: Optional[str]) -> list[Union[Str, CatUrl]]:
    if len(items) % 2 or len(items) > 2 * MAX_CAT_PARTS:
        raise bad("invalid CATENATE parts")
    parts: list[Union[Str, CatUrl]] = []
    for kind, value in zip(items[::2], items[1::2]):
        if not isinstance(kind, Atom) or not isinstance(value, Str):
            raise bad("invalid CATENATE part")
        if kind.upper() == b"TEXT":
            parts.append(value)
        elif kind.upper() == b"URL":
            if isinstance(value, FileLiteral):
                raise bad("URL too long")
            try:
                parts.append(parse_url(bytes(value), user))
            except BadUrl as e:
                raise _badurl(bytes(value), str(e))
        else:
            raise bad("CATENATE parts are TEXT or URL")
    return parts


def _badurl(raw: bytes, reason: str) -> CommandError:
    # RFC 4469 §6: [BADURL <url>]; the URL is printable text without "]" in the code.
    shown = bytes(c for c in raw[:200] if 0x20 < c < 0x7F and c != 0x5D)
    return CommandError(R.NO, f"cannot use this URL: {reason}", BADURL + b" " + shown)


# -- in the io pool ----------------------------------------------------------------------------

def resolve_url(account: Account, url: CatUrl, budget: int) -> bytes:
    """The octets a URL names, at most `budget` of them (TooBig past it)."""
    try:
        folder = account.folder(url.mailbox)
    except MailboxError:
        raise BadUrl("no such mailbox")
    if url.uidvalidity is not None and url.uidvalidity != folder.uidvalidity:
        raise BadUrl("UIDVALIDITY differs")
    try:
        f = folder.open_message(url.uid)
    except LockBusy:
        raise  # the folder is busy, not the message gone: the pool waits and retries
    except (NoSuchMessage, OSError):
        raise BadUrl("no such message")
    with f:
        buf = f.read()
    if url.section:
        att = fetch_att(Atom(b"BODY.PEEK[" + url.section + b"]"))
        root = mime.parse(buf)
        try:
            rng = mime.section(buf, root, att.path, att.text, att.fields)
        except mime.NoSuchPart:
            raise BadUrl("no such section")
        data = rng if isinstance(rng, bytes) else buf[rng[0]:rng[0] + rng[1]]
    else:
        data = buf
    if url.partial is not None:
        o, n = url.partial
        data = data[o:] if n is None else data[o:o + n]
    if len(data) > budget:
        raise TooBig()
    return bytes(data)


class TooBig(Exception):
    pass


class ChainReader:
    """One file-like view of a CATENATE message's pieces (bytes and spooled literal files),
    read by Folder.append_many without joining them in memory."""

    def __init__(self, pieces: list[Union[bytes, BinaryIO]]):
        self.pieces = list(pieces)
        self._start = [(p, p.tell()) for p in pieces if not isinstance(p, (bytes, bytearray))]
        self._all = list(pieces)

    def rewind(self) -> None:
        """Back to the first octet (io pool): the append runs again after a busy lock."""
        self.pieces = list(self._all)
        for f, offset in self._start:
            f.seek(offset)

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while self.pieces and (n < 0 or len(out) < n):
            p = self.pieces[0]
            want = -1 if n < 0 else n - len(out)
            if isinstance(p, (bytes, bytearray)):
                take = p if want < 0 else p[:want]
                rest = b"" if want < 0 else p[want:]
                out += take
                if rest:
                    self.pieces[0] = rest
                else:
                    self.pieces.pop(0)
            else:
                data = p.read(want)
                if data:
                    out += data
                else:
                    self.pieces.pop(0)
        return bytes(out)


def append_messages(folder: Folder, items: list, selected: Optional[tuple[Folder, object]],
                    keywords: Optional[list[str]] = None) -> tuple[tuple[int, list[int]], Any]:
    """((UIDVALIDITY, UIDs), the selection's refresh) after storing every message of `items` or
    none (runs in the io pool: one trip for the whole command, its keyword room check (the
    flags `keywords`) and its refresh, docs/design/imap.md, "Throughput", all three in one
    hold of the folder lock; `selected`: see selection.then_refresh)."""
    def check() -> None:
        if keywords:
            check_keyword_room(folder, keywords)

    def then(uids: list[int]) -> tuple[tuple[int, list[int]], Any]:
        return then_refresh((folder.uidvalidity, uids), selected)

    try:
        return folder.append_many(items, check, then)[1]
    except LockBusy:
        # Nothing was stored; the same job runs again when the folder is free (waits.py).
        for data, _, _ in items:
            if isinstance(data, ChainReader):
                data.rewind()
        raise


class AppendCommands(Session):
    """APPEND with MULTIAPPEND, CATENATE and literal8."""

    @defer.inlineCallbacks
    def do_APPEND(self, tag: bytes, args: list[Token]):
        name, messages = parse_append(args, self.user, self.rev2)
        limit = self.config.limits.max_message_size
        if self.sel is not None and self.sel.folder.name == name:
            folder = self.sel.folder
        else:
            try:
                folder = yield self.io(self.account.folder, name)
            except MailboxError as e:
                # RFC 3501 §6.3.11: the client may CREATE the folder and try again.
                raise no_for(e, "no such mailbox", R.TRYCREATE)
        flags = sorted({f for m in messages for f in m.flags})
        keywords = flags if _keywords(flags) else None
        if keywords and any(isinstance(p, CatUrl) for m in messages for p in m.parts):
            # The keyword room before any URL is read (docs/design/imap.md, "APPEND: ...").
            yield self.io(check_keyword_room, folder, keywords)
            keywords = None
        items = []
        for m in messages:
            source = yield self._assemble(m, limit)
            items.append((source, m.flags, m.date))
        # All or none (RFC 3502 §6.3.11): nothing is visible before every message is written.
        sel = self.sel
        (validity, uids), st = yield self.io(append_messages, folder, items,
                                             self.refresh_args(), keywords)
        self.metrics.maildir_writes("append", len(uids))
        # Untagged EXISTS only for the selected folder, through refresh (docs/design/imap.md,
        # "Selection and refresh").
        yield self.refreshed(sel, st)
        return R.code(b"APPENDUID", b"%d" % validity, format_set(sorted(uids))) + b"APPEND completed"

    @defer.inlineCallbacks
    def _assemble(self, m: AppendMessage, limit: int):
        """The message's octets as bytes or a file-like reader; URLs are read in the io pool."""
        pieces: list[Union[bytes, BinaryIO]] = []
        total = 0
        for p in m.parts:
            if isinstance(p, CatUrl):
                try:
                    data = yield self.io(resolve_url, self.account, p, limit - total)
                except BadUrl as e:
                    raise _badurl(p.raw, str(e))
                except TooBig:
                    raise no("message too large", R.TOOBIG)
                pieces.append(data)
                total += len(data)
            elif isinstance(p, FileLiteral):
                # Streamed to a file while it arrived (docs/design/imap.md, "Lines and literals").
                total += p.size
                if total > limit:
                    raise no("message too large", R.TOOBIG)
                f = yield p.spool.finish()
                pieces.append(f)
            else:
                total += len(p)
                if total > limit:
                    raise no("message too large", R.TOOBIG)
                pieces.append(bytes(p))
        if all(isinstance(p, bytes) for p in pieces):
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)  # type: ignore[arg-type]
        return ChainReader(pieces)

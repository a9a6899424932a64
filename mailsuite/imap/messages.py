"""Commands that change or look for messages: STORE, COPY, MOVE, SEARCH (selected state) and
APPEND (authenticated and selected states). RFC 3501 §6.3.11 and §6.4, RFC 4315 UIDPLUS,
RFC 6851 MOVE.
"""
from __future__ import annotations

from typing import Callable, Optional

from twisted.internet import defer

from mailsuite.imap import responses as R
from mailsuite.imap import search as searchmod
from mailsuite.imap.flags import flag_list, parse_flags
from mailsuite.imap.names import decode_name
from mailsuite.imap.parser import FileLiteral, Str, Token, astring, date_time, format_set
from mailsuite.imap.responses import bad, no, no_for
from mailsuite.imap.selection import uidvalidity
from mailsuite.imap.session import Session
from mailsuite.mailbox.maildir import MAX_KEYWORDS
from mailsuite.mailbox.store import Folder, MailboxError, NoSuchMessage

BATCH = 200  # messages per thread-pool call in SEARCH (and FETCH, see fetch.py)


class MessageCommands(Session):
    """STORE/COPY/MOVE/SEARCH/APPEND."""

    @defer.inlineCallbacks
    def do_STORE(self, tag: bytes, args: list[Token], uid: bool = False):
        if len(args) < 3:
            raise bad("STORE needs a set, an item and flags")
        sel = self.sel
        uids = self.resolve(args[0], uid)
        item = astring(args[1]).upper()
        silent = item.endswith(b".SILENT")
        if silent:
            item = item[:-7]
        if item not in (b"FLAGS", b"+FLAGS", b"-FLAGS"):
            raise bad("unknown STORE item")
        flags = parse_flags(args[2] if isinstance(args[2], list) else args[2:])
        if "\\Recent" in flags:
            flags.remove("\\Recent")
        if sel.readonly:
            raise no("mailbox is read-only", R.READ_ONLY)
        mode = item[:1] if item[:1] in (b"+", b"-") else b"="
        if mode != b"-" and _keywords(flags):
            yield self.io(check_keyword_room, sel.folder, flags)
        results = yield self.io(store_flags, sel.folder, uids, flags, mode)
        self.announce_keywords(sel, {f for _, new in results for f in new})
        for u, new in results:
            if not sel.has(u):
                continue
            sel.set_flags(u, new)
            if not silent:
                self.send(b"* %d FETCH (FLAGS %s%s)" % (sel.seq_of(u), flag_list(sel.flags(u)),
                                                        b" UID %d" % u if uid else b""))
        if uid:
            yield self.refresh()
        return b"STORE completed"

    @defer.inlineCallbacks
    def do_COPY(self, tag: bytes, args: list[Token], uid: bool = False, move: bool = False):
        if len(args) != 2:
            raise bad("COPY needs a set and a mailbox")
        sel = self.sel
        uids = self.resolve(args[0], uid)
        name = decode_name(astring(args[1]))
        verb = b"MOVE" if move else b"COPY"
        if move and sel.readonly:
            raise no("mailbox is read-only", R.READ_ONLY)
        try:
            dest = yield self.io(self.account.folder, name)
        except MailboxError as e:
            # RFC 3501 §6.4.7: the client may CREATE the folder and try again.
            raise no_for(e, "no such mailbox", R.TRYCREATE)
        if not uids:
            return verb + b" completed (nothing to do)"
        # The copies keep their keywords (RFC 3501 §6.4.7): refuse rather than drop any that
        # the destination has no room for.
        carried = sorted({f for u in uids if (info := sel.info(u)) is not None
                          for f in info.flags if not f.startswith("\\")})
        if carried:
            yield self.io(check_keyword_room, dest, carried)
        pairs = yield self.io(sel.folder.move if move else sel.folder.copy, uids, dest)
        pairs = sorted(pairs)
        validity = yield self.io(uidvalidity, dest)
        copyuid = R.code(b"COPYUID", b"%d" % validity, format_set([a for a, _ in pairs]),
                         format_set([b for _, b in pairs])) if pairs else b""
        if move:
            # RFC 6851 §4.3: COPYUID comes in an untagged OK before the EXPUNGEs.
            if copyuid:
                self.send(b"* OK " + copyuid + b"moved")
            self.report_expunged([a for a, _ in pairs])
            yield self.refresh()
            return verb + b" completed"
        if uid:
            yield self.refresh()
        return copyuid + verb + b" completed"

    def do_MOVE(self, tag: bytes, args: list[Token], uid: bool = False) -> defer.Deferred:
        return self.do_COPY(tag, args, uid=uid, move=True)

    @defer.inlineCallbacks
    def do_SEARCH(self, tag: bytes, args: list[Token], uid: bool = False):
        sel = self.sel
        try:
            program = searchmod.parse(args)
        except searchmod.BadCharset:
            raise no("unsupported charset", R.BADCHARSET + b" (UTF-8 US-ASCII)")
        found: list[int] = []
        everything = list(sel.infos())
        count, max_uid = len(sel), sel.last_uid
        recent = sel.recent
        needs = searchmod.needs_file(program)
        step = BATCH if needs else BATCH * 50
        for start in range(0, len(everything), step):
            cands = [searchmod.Candidate(seq, i.uid, i.flags, i.uid in recent, i.size, i.internaldate,
                                         _loader(sel.folder, i.uid))
                     for seq, i in everything[start:start + step]]
            if needs:
                hits = yield self.io(search_batch, program, cands, count, max_uid)
            else:
                hits = search_batch(program, cands, count, max_uid)
            found.extend(hits)
        numbers = [c_uid if uid else sel.seq_of(c_uid) for c_uid in found]
        self.send(b"* SEARCH" + b"".join(b" %d" % n for n in numbers))
        if uid:
            yield self.refresh()
        return b"SEARCH completed"

    @defer.inlineCallbacks
    def do_APPEND(self, tag: bytes, args: list[Token]):
        name, flags, date, data = parse_append(args)
        size = data.size if isinstance(data, FileLiteral) else len(data)
        if size > self.config.limits.max_message_size:
            raise no("message too large", R.TOOBIG)
        if self.sel is not None and self.sel.folder.name == name:
            folder = self.sel.folder
        else:
            try:
                folder = yield self.io(self.account.folder, name)
            except MailboxError as e:
                # RFC 3501 §6.3.11: the client may CREATE the folder and try again.
                raise no_for(e, "no such mailbox", R.TRYCREATE)
        if _keywords(flags):
            yield self.io(check_keyword_room, folder, flags)
        if isinstance(data, FileLiteral):
            # Streamed to a file while it arrived (docs/design/imap.md, "Lines and literals").
            source = yield data.spool.finish()
        else:
            source = data
        new_uid = yield self.io(folder.append, source, flags, date)
        validity = yield self.io(uidvalidity, folder)
        # Untagged EXISTS only for the selected folder, through refresh (docs/design/imap.md,
        # "Selection and refresh").
        yield self.refresh()
        return R.code(b"APPENDUID", b"%d" % validity, b"%d" % new_uid) + b"APPEND completed"


def parse_append(args: list[Token]) -> tuple[str, list[str], Optional[float], Str]:
    """APPEND mailbox [(flags)] [date-time] literal; the flag list and date are optional."""
    args = list(args)
    if len(args) < 2:
        raise bad("APPEND needs a mailbox and a message")
    if isinstance(args[0], FileLiteral):
        raise bad("mailbox name too long")
    name = decode_name(astring(args.pop(0)))
    flags: list[str] = []
    date: Optional[float] = None
    if args and isinstance(args[0], list):
        flags = parse_flags(args.pop(0))
    if len(args) == 2:
        date = date_time(args.pop(0))
    if len(args) != 1 or not isinstance(args[0], Str):
        raise bad("APPEND needs the message as a literal")
    # The literal as read: no further copy of a message of up to the size limit.
    return name, [f for f in flags if f != "\\Recent"], date, args[0]


def _keywords(flags: list[str]) -> list[str]:
    return [f for f in flags if not f.startswith("\\")]


def check_keyword_room(folder: Folder, flags: list[str]) -> None:
    """NO [LIMIT] when `flags` bring keywords the folder has no room for: a Maildir folder
    holds MAX_KEYWORDS (letters a..z), and a keyword past them would be lost (RFC 5530).
    Runs in the io pool."""
    known = {k.lower() for k in folder.keywords}
    new = {f.lower() for f in _keywords(flags)} - known
    if new and len(known) + len(new) > MAX_KEYWORDS:
        raise no(f"this folder already has {len(known)} keywords, the most it can hold is "
                 f"{MAX_KEYWORDS}", R.LIMIT)


def store_flags(folder: Folder, uids: list[int], flags: list[str],
                mode: bytes) -> list[tuple[int, frozenset]]:
    """Change the flags of `uids` (mode b"+", b"-" or b"="); runs in the io pool."""
    out = []
    for u in uids:
        try:
            if mode == b"+":
                new = folder.add_flags(u, flags)
            elif mode == b"-":
                new = folder.remove_flags(u, flags)
            else:
                new = folder.set_flags(u, flags)
        except NoSuchMessage:
            continue
        out.append((u, frozenset(new)))
    return out


def _loader(folder: Folder, uid: int) -> Callable[[], bytes]:
    def load() -> bytes:
        with folder.open_message(uid) as f:
            return f.read()
    return load


def search_batch(program: searchmod.Node, cands: list[searchmod.Candidate], max_seq: int,
                 max_uid: int) -> list[int]:
    hits = []
    for c in cands:
        try:
            if searchmod.matches(program, c, max_seq, max_uid):
                hits.append(c.uid)
        except (NoSuchMessage, OSError):
            continue
        finally:
            c._raw = None  # one message file in memory at a time, not a batch of them
    return hits

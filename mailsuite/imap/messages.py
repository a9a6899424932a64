"""Commands that change or look for messages: STORE, COPY, MOVE, SEARCH (selected state).
RFC 3501 §6.4, RFC 4315 UIDPLUS, RFC 6851 MOVE. APPEND is in append.py.
"""
from __future__ import annotations

from typing import Callable

from twisted.internet import defer

from mailsuite.imap import responses as R
from mailsuite.imap import search as searchmod
from mailsuite.imap.condstore import split_store, uses_modseq
from mailsuite.imap.flags import parse_flags
from mailsuite.imap.names import decode_name
from mailsuite.imap.parser import Token, astring, format_set
from mailsuite.imap.responses import bad, no, no_for
from mailsuite.imap.selection import uidvalidity
from mailsuite.imap.session import Session
from mailsuite.mailbox.info import UNDATED
from mailsuite.mailbox.maildir import MAX_KEYWORDS
from mailsuite.mailbox.store import Account, Folder, LockBusy, MailboxError, NoSuchMessage

BATCH = 200  # messages per thread-pool call in SEARCH (and FETCH, see fetch.py)


class MessageCommands(Session):
    """STORE/COPY/MOVE/SEARCH."""

    @defer.inlineCallbacks
    def do_STORE(self, tag: bytes, args: list[Token], uid: bool = False):
        if len(args) < 3:
            raise bad("STORE needs a set, an item and flags")
        sel = self.sel
        args, unchangedsince = split_store(args)  # RFC 7162 §3.1.3 (condstore.py)
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
        check = check_keyword_room if mode != b"-" and _keywords(flags) else None
        # Every STORE goes through the store's mod-sequences (RFC 7162; condstore.py), so
        # what this session reports later carries the right MODSEQ.
        result = yield self.condstore_store(uids, flags, mode, silent, uid, unchangedsince,
                                            check)
        return result

    @defer.inlineCallbacks
    def do_COPY(self, tag: bytes, args: list[Token], uid: bool = False, move: bool = False):
        if len(args) != 2:
            raise bad("COPY needs a set and a mailbox")
        sel = self.sel
        uids = self.resolve(args[0], uid)
        name = decode_name(astring(args[1]), self.rev2)
        verb = b"MOVE" if move else b"COPY"
        if move and sel.readonly:
            raise no("mailbox is read-only", R.READ_ONLY)
        # The copies keep their keywords (RFC 3501 §6.4.7): refuse rather than drop any that
        # the destination has no room for.
        carried = sorted({f for u in uids if (info := sel.info(u)) is not None
                          for f in info.flags if not f.startswith("\\")})
        missing, validity, pairs = yield self.io(copy_messages, self.account, name, sel.folder,
                                                 uids, carried, move)
        if missing is not None:
            # RFC 3501 §6.4.7: the client may CREATE the folder and try again.
            raise no_for(missing, "no such mailbox", R.TRYCREATE)
        if not uids:
            return verb + b" completed (nothing to do)"
        pairs = sorted(pairs)
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
        if searchmod.asks_save(args):
            # RFC 5182 §2.1: a SEARCH with SAVE that fails leaves "$" empty.
            saved, sel.searchres = sel.searchres, []
        else:
            saved = sel.searchres
        opts, rest = searchmod.parse_return(args)
        try:
            program = searchmod.parse(rest)
        except searchmod.BadCharset:
            raise no("unsupported charset", R.BADCHARSET + b" (UTF-8 US-ASCII)")
        if self.rev2:
            if searchmod.uses_recent(program):
                raise bad("RECENT, NEW and OLD are no IMAP4rev2 search keys")
            if opts is None:
                opts = {b"ALL"}  # RFC 9051 §6.4.4: the answer is ESEARCH, never SEARCH
        if uses_modseq(program):
            yield self.enable_condstore()  # RFC 7162 §3.1.5
        found = yield self.search_uids(searchmod.with_saved(program, frozenset(saved)))
        # RFC 7162 §3.1.5: with MODSEQ in the program, the highest mod-sequence found.
        highest = max((sel.info(u).modseq for u in found), default=0) \
            if uses_modseq(program) else None
        if opts is None:
            numbers = [c_uid if uid else sel.seq_of(c_uid) for c_uid in found]
            self.send(b"* SEARCH" + b"".join(b" %d" % n for n in numbers)
                      + (b" (MODSEQ %d)" % highest if highest else b""))
        else:
            if b"SAVE" in opts:
                sel.searchres = searchmod.saved_result(opts, found)
            numbers = found if uid else [sel.seq_of(c_uid) for c_uid in found]
            line = searchmod.esearch_response(tag, uid, opts, numbers)
            if line is not None:
                if highest is not None and found:
                    # RFC 7162 §3.1.5: the highest mod-sequence of the messages returned:
                    # with only MIN and/or MAX, just those.
                    returned = found
                    if opts and not opts & {b"ALL", b"COUNT"}:
                        returned = ([found[0]] if b"MIN" in opts else []) + \
                            ([found[-1]] if b"MAX" in opts else [])
                    line += b" MODSEQ %d" % max(sel.info(u).modseq for u in returned)
                self.send(line)
        if uid:
            yield self.refresh()
        return R.completed(b"SEARCH", found.vanished)

    @defer.inlineCallbacks
    def search_uids(self, program: searchmod.Node):
        """UIDs of the selected messages matching `program`, ascending; files are read in the
        io pool, BATCH messages per call."""
        sel = self.sel
        found = Hits()
        everything = list(sel.infos())
        count, max_uid = len(sel), sel.last_uid
        recent = sel.recent
        needs = searchmod.needs_file(program)
        dated = searchmod.needs_date(program)
        if dated:
            yield self.io(sel.folder.ensure_dates, [i for _, i in everything])
            # Still undated after ensure_dates (no stat here, on the reactor): expunged
            # elsewhere, its date unknown (MessageInfo.known_date). It cannot be judged by
            # date: left out, the answer says EXPUNGEISSUED (as for a file it cannot read).
            known = [(seq, i) for seq, i in everything if i.date != UNDATED]
            if len(known) < len(everything):
                found.vanished = True
                everything = known
        step = BATCH if needs else BATCH * 50
        for start in range(0, len(everything), step):
            # i.date: unread (and possibly not dated yet) unless the program has a date key.
            cands = [searchmod.Candidate(seq, i.uid, i.flags, i.uid in recent, i.size,
                                         i.internaldate if dated else i.date,
                                         _loader(sel.folder, i.uid), modseq=i.modseq)
                     for seq, i in everything[start:start + step]]
            if needs:
                hits = yield self.io(search_batch, program, cands, count, max_uid)
            else:
                hits = search_batch(program, cands, count, max_uid)
            found.extend(hits)
            found.vanished |= hits.vanished
        return found


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


def copy_messages(account: Account, name: str, source: Folder, uids: list[int],
                  carried: list[str], move: bool
                  ) -> tuple[MailboxError | None, int, list[tuple[int, int]]]:
    """COPY/MOVE in one io-pool job (each job may wait in the pool's queue under load):
    (the error if the destination does not exist, its UIDVALIDITY, (old, new) UID pairs)."""
    try:
        dest = account.folder(name)
    except MailboxError as e:
        return e, 0, []
    if not uids:
        return None, 0, []
    if carried:
        check_keyword_room(dest, carried)
    pairs = source.move(uids, dest) if move else source.copy(uids, dest)
    return None, uidvalidity(dest), pairs


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


class Hits(list):
    """Matching UIDs; `vanished`: a message the key had to read was expunged by another
    process before it could be (its file is gone: RFC 5530 EXPUNGEISSUED)."""

    vanished = False


def search_batch(program: searchmod.Node, cands: list[searchmod.Candidate], max_seq: int,
                 max_uid: int) -> Hits:
    hits = Hits()
    for c in cands:
        try:
            if searchmod.matches(program, c, max_seq, max_uid):
                hits.append(c.uid)
        except LockBusy:
            raise  # not a vanished message: the pool waits for the lock and runs the batch again
        except (NoSuchMessage, FileNotFoundError):
            hits.vanished = True
        except OSError:
            continue
        finally:
            c._raw = None  # one message file in memory at a time, not a batch of them
    return hits

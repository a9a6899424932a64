"""CONDSTORE and QRESYNC (RFC 7162): mod-sequences in SELECT, FETCH, STORE, SEARCH and STATUS,
ENABLE, and VANISHED instead of EXPUNGE. The mod-sequences come from the store
(mailbox/modseq.py); what the client sees is described in docs/design/imap.md, "CONDSTORE and
QRESYNC".
"""
from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

from twisted.internet import defer

from mailsuite.imap import responses as R
from mailsuite.imap.flags import flag_list
from mailsuite.imap.parser import Atom, ParseError, SequenceSet, Token, format_set, number, sequence_set
from mailsuite.imap.responses import bad
from mailsuite.imap.selection import then_refresh
from mailsuite.imap.session import Session
from mailsuite.mailbox.store import Folder, MessageInfo, NoSuchMessage

ENABLEABLE = (b"CONDSTORE", b"QRESYNC")


@dataclass
class SelectParams:
    """The parameters of SELECT/EXAMINE (RFC 7162 §3.1.8, §3.2.5)."""

    condstore: bool = False
    qresync: Optional[tuple[int, int, Optional[SequenceSet]]] = None  # uidvalidity, modseq, known


@dataclass
class FetchModifiers:
    """FETCH's modifiers and MODSEQ item (RFC 7162 §3.1.4, §3.2.6)."""

    modseq: bool = False
    changedsince: Optional[int] = None
    vanished: bool = False


def _number(tok: Token, what: str) -> int:
    try:
        return number(tok)
    except ParseError:
        raise bad(f"{what} must be a number")


def parse_select_params(args: list[Token], qresync_enabled: bool) -> SelectParams:
    params = SelectParams()
    if not args:
        return params
    if len(args) != 1 or not isinstance(args[0], list):
        raise bad("invalid SELECT parameters")
    items = list(args[0])
    while items:
        name = items.pop(0)
        if not isinstance(name, Atom):
            raise bad("invalid SELECT parameter")
        name = name.upper()
        if name == b"CONDSTORE":
            params.condstore = True
        elif name == b"QRESYNC":
            if not qresync_enabled:
                # RFC 7162 §3.2.5: QRESYNC must have been enabled first.
                raise bad("QRESYNC is not enabled")
            if not items or not isinstance(items[0], list):
                raise bad("QRESYNC needs (uidvalidity modseq [known-uids [seq-match]])")
            q = items.pop(0)
            if len(q) < 2 or len(q) > 4:
                raise bad("QRESYNC needs (uidvalidity modseq [known-uids [seq-match]])")
            validity = _number(q[0], "UIDVALIDITY")
            modseq = _number(q[1], "mod-sequence")
            if validity == 0 or modseq == 0:
                raise bad("QRESYNC: UIDVALIDITY and mod-sequence must not be 0")
            known = None
            if len(q) >= 3:
                if isinstance(q[2], list):
                    raise bad("QRESYNC: known UIDs must be a set")
                known = sequence_set(q[2])
            if len(q) == 4:
                # The sequence match data only narrows down what we report; we report every
                # change since the mod-sequence anyway (RFC 7162 §3.2.5.2 allows more).
                m = q[3]
                if not isinstance(m, list) or len(m) != 2:
                    raise bad("QRESYNC: invalid sequence match data")
                sequence_set(m[0])
                sequence_set(m[1])
            params.qresync = (validity, modseq, known)
        else:
            raise bad("unknown SELECT parameter")
    return params


def split_fetch(args: list[Token], uid: bool, qresync_enabled: bool
                ) -> tuple[list[Token], Optional[FetchModifiers]]:
    """FETCH's arguments without the MODSEQ item and the modifier list; the modifiers (None
    when there are none)."""
    mods = None
    rest = list(args)
    last = rest[-1] if len(rest) >= 3 else None
    if isinstance(last, list) and last and isinstance(last[0], Atom) \
            and last[0].upper() in (b"CHANGEDSINCE", b"VANISHED"):
        rest.pop()
        mods = FetchModifiers()
        items = list(last)
        while items:
            name = items.pop(0)
            name = name.upper() if isinstance(name, Atom) else b""
            if name == b"CHANGEDSINCE" and items and mods.changedsince is None:
                mods.changedsince = _number(items.pop(0), "CHANGEDSINCE")
            elif name == b"VANISHED" and not mods.vanished:
                mods.vanished = True
            else:
                raise bad("invalid FETCH modifier")
        if mods.vanished and (not uid or not qresync_enabled or mods.changedsince is None):
            # RFC 7162 §3.2.6: only UID FETCH, only with QRESYNC enabled, with CHANGEDSINCE.
            raise bad("VANISHED needs UID FETCH with CHANGEDSINCE and QRESYNC enabled")
        mods.modseq = True
    # The MODSEQ item, alone or in the list.
    items_tok = rest[1] if len(rest) == 2 else rest[1:]
    if isinstance(items_tok, Atom) and items_tok.upper() == b"MODSEQ":
        mods = mods or FetchModifiers()
        mods.modseq = True
        return [rest[0], []], mods
    if isinstance(items_tok, list):
        kept = [t for t in items_tok if not (isinstance(t, Atom) and t.upper() == b"MODSEQ")]
        if len(kept) != len(items_tok):
            mods = mods or FetchModifiers()
            mods.modseq = True
            if not kept and len(rest) != 2:
                raise bad("empty fetch attribute list")
            return [rest[0], kept], mods
    return rest, mods


def split_store(args: list[Token]) -> tuple[list[Token], Optional[int]]:
    """STORE's arguments without `(UNCHANGEDSINCE n)`, and n (RFC 7162 §3.1.3)."""
    if len(args) >= 4 and isinstance(args[1], list):
        mods = args[1]
        if len(mods) != 2 or not isinstance(mods[0], Atom) or mods[0].upper() != b"UNCHANGEDSINCE":
            raise bad("invalid STORE modifier")
        return [args[0]] + list(args[2:]), _number(mods[1], "UNCHANGEDSINCE")
    return args, None


def uses_modseq(node) -> bool:
    """Whether a SEARCH program has the MODSEQ key (RFC 7162 §3.1.5)."""
    op = node[0]
    if op == "MODSEQ":
        return True
    if op == "AND":
        return any(uses_modseq(n) for n in node[1])
    if op == "OR":
        return uses_modseq(node[1]) or uses_modseq(node[2])
    if op == "NOT":
        return uses_modseq(node[1])
    return False


def missing_uids(present: list[int], ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of `ranges` (sorted, merged) not covered by the ascending `present` UIDs."""
    out = []
    for lo, hi in ranges:
        i = bisect.bisect_left(present, lo)
        cur = lo
        while i < len(present) and present[i] <= hi:
            if present[i] > cur:
                out.append((cur, present[i] - 1))
            cur = present[i] + 1
            i += 1
        if cur <= hi:
            out.append((cur, hi))
    return out


def format_ranges(ranges: list[tuple[int, int]]) -> bytes:
    return b",".join(b"%d" % lo if lo == hi else b"%d:%d" % (lo, hi) for lo, hi in ranges)


def vanished_set(folder: Folder, modseq: int, ranges: list[tuple[int, int]],
                 present: list[int]) -> bytes:
    """In the io pool: the UIDs within `ranges` expunged after `modseq`, as a set."""
    gone = folder.vanished(modseq)
    if gone is None:
        # Older than what the log remembers: every UID not present (RFC 7162 §3.2.5.2 lets
        # VANISHED (EARLIER) name UIDs the client never saw).
        return format_ranges(missing_uids(present, ranges))
    picked = []
    for lo, hi in ranges:
        i = bisect.bisect_left(gone, lo)
        while i < len(gone) and gone[i] <= hi:
            picked.append(gone[i])
            i += 1
    return format_set(sorted(set(picked))) if picked else b""


def _uidnext(folder: Folder) -> int:
    return folder.uidnext


def store_modseq(folder: Folder, uids: list[int], flags: list[str], mode: bytes,
                 unchangedsince: Optional[int],
                 check: Optional[Callable[[Folder, list[str]], None]] = None,
                 selected: Optional[tuple[Folder, object]] = None
                 ) -> tuple[tuple[list[tuple[int, frozenset, int, bool]], list[int]], Any]:
    """In the io pool, under the folder's lock: the conditional STORE of RFC 7162 §3.1.3.
    Returns (([(uid, flags, modseq, changed)], [uids not stored because they changed after
    `unchangedsince`]), the refresh of `selected` (selection.then_refresh)). `check(folder,
    flags)` runs first, the refresh last, in the same io job and hold (the check may refuse
    the STORE by raising)."""
    with folder.held():
        if check is not None:
            check(folder, flags)
        before = folder.modseqs(uids)
        modified = []
        stored = []
        for u in uids:
            if u not in before:
                continue
            if unchangedsince is not None and before[u][0] > unchangedsince:
                modified.append(u)
                continue
            try:
                if mode == b"+":
                    folder.add_flags(u, flags)
                elif mode == b"-":
                    folder.remove_flags(u, flags)
                else:
                    folder.set_flags(u, flags)
            except NoSuchMessage:
                continue
            stored.append(u)
        after = folder.modseqs(stored)
        out = [(u, after[u][1], after[u][0], after[u][0] != before[u][0])
               for u in stored if u in after]
        return then_refresh((out, modified), selected)


class CondstoreCommands(Session):
    """ENABLE's extensions and the CONDSTORE/QRESYNC parts of SELECT, FETCH, STORE, SEARCH."""

    condstore = False  # RFC 7162 §3.1: enabled by ENABLE or a CONDSTORE-enabling command
    qresync = False

    # -- enabling ------------------------------------------------------------------------------
    def enable_extensions(self, names: list[bytes]) -> list[bytes]:
        """ENABLE (RFC 5161): the names newly enabled, in the order asked."""
        out = []
        for n in names:
            if n == b"QRESYNC" and not self.qresync:
                self.qresync = True  # RFC 7162 §3.2.3: implies CONDSTORE
                out.append(n)
            elif n == b"CONDSTORE" and not self.condstore:
                out.append(n)
        if out:
            self.condstore = True
        return out

    @defer.inlineCallbacks
    def enable_condstore(self):
        """A CONDSTORE-enabling command (RFC 7162 §3.1): the first one while a mailbox is
        selected tells the client the mailbox's HIGHESTMODSEQ."""
        if not self.condstore:
            self.condstore = True
            if self.sel is not None:
                yield self.send_highest()

    @defer.inlineCallbacks
    def send_highest(self):
        sel = self.sel
        highest = yield self.io(sel.folder.highest_modseq)
        if self.sel is sel:
            self.send(b"* OK [HIGHESTMODSEQ %d] highest mod-sequence" % highest)

    # -- SELECT -----------------------------------------------------------------------------------
    def select_params(self, args: list[Token]) -> SelectParams:
        params = parse_select_params(args, self.qresync)
        if params.condstore or params.qresync:
            self.condstore = True
        return params

    def announce_closed(self) -> None:
        """RFC 7162 §3.2.11: a SELECT that replaces a selected mailbox first says [CLOSED]."""
        self.send(b"* OK [CLOSED] previous mailbox closed")

    @defer.inlineCallbacks
    def announce_modseqs(self, sel, highest: int, uidvalidity: int, uidnext: int,
                         params: SelectParams):
        """After SELECT's other untagged data: HIGHESTMODSEQ and, for QRESYNC, what changed
        since the client's mod-sequence (RFC 7162 §3.2.5)."""
        self.send(b"* OK [HIGHESTMODSEQ %d] highest mod-sequence" % highest)
        if params.qresync is None:
            return
        validity, modseq, known = params.qresync
        if validity != uidvalidity:
            return
        last = max(sel.last_uid, uidnext - 1)
        present = [info.uid for info in sel.view]
        ranges = known.merged(last) if known is not None else [(1, last)] if last else []
        if ranges:
            text = yield self.io(vanished_set, sel.folder, modseq, ranges, present)
            if text:
                self.send(b"* VANISHED (EARLIER) " + text)
        for seq, info in sel.infos():
            if info.modseq > modseq and (known is None or known.contains(info.uid, last)):
                self.send(b"* %d FETCH (UID %d FLAGS %s MODSEQ (%d))" % (
                    seq, info.uid, flag_list(sel.flags(info.uid, info)), info.modseq))

    # -- responses --------------------------------------------------------------------------------
    def modseq_item(self, info: Optional[MessageInfo]) -> bytes:
        """` MODSEQ (n)` for an unsolicited FETCH once CONDSTORE is on (RFC 7162 §3.1.4.1)."""
        if not self.condstore or info is None:
            return b""
        return b" MODSEQ (%d)" % info.modseq

    def report_vanished(self, removed) -> bool:
        """With QRESYNC enabled, expunges are `* VANISHED uids` (RFC 7162 §3.2.10); returns
        whether it answered."""
        if not self.qresync:
            return False
        sel = self.sel
        gone = sorted(u for u in set(removed) if sel.has(u))
        if gone:
            sel.remove(gone)
            self.send(b"* VANISHED " + format_set(gone))
        return True

    def set_own(self, uid: int, flags: frozenset, modseq: int) -> None:
        sel = self.sel
        info = sel.info(uid)
        if info is not None:
            sel.own[uid] = dataclasses.replace(info, flags=frozenset(flags), modseq=modseq)

    @defer.inlineCallbacks
    def refresh_own_modseqs(self, uids: list[int]):
        """After this session changed flags: the mod-sequences the store gave the changes."""
        sel = self.sel
        if not uids or sel is None:
            return
        now = yield self.io(sel.folder.modseqs, uids)
        if self.sel is sel:
            for u, (ms, flags) in now.items():
                self.set_own(u, flags, ms)

    # -- FETCH ------------------------------------------------------------------------------------
    @defer.inlineCallbacks
    def condstore_fetch(self, cmd, mods: Optional[FetchModifiers], set_tok: Token):
        """Run a FetchCommand with MODSEQ, CHANGEDSINCE and VANISHED (RFC 7162 §3.1.4,
        §3.2.6)."""
        if mods is not None and mods.modseq:
            yield self.enable_condstore()
        names = {a.name for a in cmd.atts}
        cmd.modseq = bool(mods is not None and mods.modseq) or (
            self.condstore and (b"FLAGS" in names or cmd.sets_seen))
        sel = self.sel
        if mods is not None and mods.changedsince is not None:
            since = mods.changedsince
            if mods.vanished:
                s = sequence_set(set_tok)
                uidnext = yield self.io(_uidnext, sel.folder)
                # `*` is the highest UID given so far, so expunges at the end are found.
                ranges = s.merged(max(sel.last_uid, uidnext - 1))
                present = [info.uid for info in sel.view]
                if ranges:
                    text = yield self.io(vanished_set, sel.folder, since, ranges, present)
                    if text:
                        self.send(b"* VANISHED (EARLIER) " + text)
            cmd.uids = [u for u, _seq, info in sel.locate(cmd.uids) if info.modseq > since]
        result = yield cmd.run()
        return result

    # -- STORE ------------------------------------------------------------------------------------
    @defer.inlineCallbacks
    def condstore_store(self, uids: list[int], flags: list[str], mode: bytes, silent: bool,
                        uid: bool, unchangedsince: Optional[int],
                        check: Optional[Callable[[Folder, list[str]], None]] = None):
        """STORE with CONDSTORE on or UNCHANGEDSINCE (RFC 7162 §3.1.3): every FETCH carries
        MODSEQ, and messages changed after UNCHANGEDSINCE are left alone and named in
        [MODIFIED]. Without CONDSTORE: a plain STORE (RFC 3501 §6.4.6)."""
        if unchangedsince is not None:
            yield self.enable_condstore()
        sel = self.sel
        # UID STORE may report expunges (RFC 3501 §7.4.1): its refresh in the same job and hold.
        (results, modified), st = yield self.io(store_modseq, sel.folder, uids, flags, mode,
                                                unchangedsince, check,
                                                self.refresh_args() if uid else None)
        if self.sel is not sel:
            return b"STORE completed"
        with_uid = uid or self.qresync
        # A new keyword is announced in FLAGS before a FETCH shows it (RFC 3501 §7.2.6).
        self.announce_keywords(sel, {f for _, new, _, _ in results for f in new})
        for u, new, ms, changed in results:
            if not sel.has(u):
                continue
            self.set_own(u, new, ms)
            uid_item = b"UID %d " % u if with_uid else b""
            if not self.condstore:
                if not silent:
                    self.send(b"* %d FETCH (FLAGS %s%s)" % (
                        sel.seq_of(u), flag_list(sel.flags(u)), b" UID %d" % u if uid else b""))
            elif not silent:
                self.send(b"* %d FETCH (%sFLAGS %s MODSEQ (%d))" % (
                    sel.seq_of(u), uid_item, flag_list(sel.flags(u)), ms))
            elif changed:
                # .SILENT hides FLAGS, not the new mod-sequence (RFC 7162 §3.1.3).
                self.send(b"* %d FETCH (%sMODSEQ (%d))" % (sel.seq_of(u), uid_item, ms))
        if uid:
            yield self.refreshed(sel, st)
        if modified:
            numbers = modified if uid else sorted(sel.seq_of(u) for u in modified if sel.has(u))
            return R.code(b"MODIFIED", format_set(numbers)) + b"conditional STORE failed"
        return b"STORE completed"

"""The selected mailbox: SELECT, EXAMINE, CLOSE, UNSELECT, EXPUNGE, CHECK (authenticated and
selected states), and `refresh`, which tells the client what changed since it last looked
(`* n EXPUNGE`, `* n FETCH (FLAGS ...)`, `* n EXISTS`). When refresh runs is described in
docs/design/imap.md, "Selection and refresh".
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

from twisted.internet import defer
from twisted.logger import Logger

from mailsuite.imap import responses as R
from mailsuite.imap.flags import SYSTEM_FLAGS, flag_list, with_flags
from mailsuite.imap.names import decode_name, encode_name, quote
from mailsuite.imap.parser import SequenceSet, Token, astring, sequence_set
from mailsuite.imap.responses import bad, no, no_for
from mailsuite.imap.session import Session
from mailsuite.mailbox.maildir import MAX_KEYWORDS
from mailsuite.mailbox.errors import LockBusy
from mailsuite.mailbox.store import Folder, MailboxError, MessageInfo, NoSuchFolder

log = Logger()


def _uid(info: MessageInfo) -> int:
    return info.uid


class Selection:
    """The selected folder as this session's client knows it.

    `view` is the store's shared snapshot list (MessageInfo in UID order) as of the last
    refresh, so 200 sessions on one 100k folder share one list instead of holding 200 copies;
    `own` holds the flag changes this session made since (reported to its client already).
    Sequence number n is view[n - 1]."""

    def __init__(self, folder: Folder, readonly: bool):
        self.folder = folder
        self.readonly = readonly
        self.view: list[MessageInfo] = []
        self.own: dict[int, MessageInfo] = {}
        self.token: object = None
        # folder.recent copies a set on every access: keep our own copy, renewed at refresh.
        self.recent: frozenset = frozenset()
        # False in an IMAP4rev2 session: no \Recent flag in FLAGS (RFC 9051 Appendix E).
        self.recent_flag = True
        # SEARCHRES (RFC 5182): UIDs saved by SEARCH RETURN (SAVE), empty after SELECT.
        self.searchres: list[int] = []
        # Keywords the client has been told about in `* FLAGS` (RFC 3501 §7.2.6).
        self.keywords: list[str] = []
        # UIDs that appeared below one the client had already seen: never shown in this
        # selection (docs/design/imap.md, "A UID never appears below a seen one").
        self.hidden: set[int] = set()

    def __len__(self) -> int:
        return len(self.view)

    def index(self, uid: int) -> int:
        i = bisect.bisect_left(self.view, uid, key=_uid)
        return i if i < len(self.view) and self.view[i].uid == uid else -1

    def seq_of(self, uid: int) -> int:
        return self.index(uid) + 1

    def has(self, uid: int) -> bool:
        return self.index(uid) >= 0

    def info(self, uid: int) -> Optional[MessageInfo]:
        own = self.own.get(uid)
        if own is not None:
            return own
        i = self.index(uid)
        return self.view[i] if i >= 0 else None

    def infos(self) -> Iterator[tuple[int, MessageInfo]]:
        """(seq, info) for every message, with this session's own flag changes."""
        own = self.own
        for seq, info in enumerate(self.view, 1):
            yield seq, own.get(info.uid, info)

    @property
    def last_uid(self) -> int:
        return self.view[-1].uid if self.view else 0

    def select_uids(self, s: SequenceSet) -> list[int]:
        """UIDs of the messages a UID set names, ascending."""
        # Merged ranges: `1:*,1:*,...` costs one pass, not one per repetition.
        picked: list[int] = []
        view = self.view
        for lo, hi in s.merged(self.last_uid):
            i = bisect.bisect_left(view, lo, key=_uid)
            j = bisect.bisect_right(view, hi, key=_uid)
            picked.extend(view[k].uid for k in range(i, j))
        return picked

    def select_seqs(self, s: SequenceSet) -> list[int]:
        """UIDs of the messages a sequence set names; BAD for numbers beyond the count."""
        n = len(self.view)
        picked: list[int] = []
        if n == 0 and any(lo is None or hi is None for lo, hi in s.ranges):
            return []  # `1:*` in an empty mailbox names nothing (clients send it blindly)
        for lo, hi in s.merged(n):
            if hi > n or lo < 1:
                # RFC 3501 §9: sequence numbers beyond the message count are invalid.
                raise bad("invalid message sequence number")
            picked.extend(self.view[k].uid for k in range(lo - 1, hi))
        return sorted(picked)

    def remove(self, uids: Iterable[int]) -> list[int]:
        """Drop messages from the view; returns their old sequence numbers, descending."""
        gone = set(uids)
        seqs = [seq for seq, info in enumerate(self.view, 1) if info.uid in gone]
        if seqs:
            self.view = [info for info in self.view if info.uid not in gone]
            for u in gone:
                self.own.pop(u, None)
        return sorted(seqs, reverse=True)

    def set_flags(self, uid: int, flags: frozenset) -> None:
        info = self.info(uid)
        if info is not None:
            self.own[uid] = with_flags(info, flags)

    def flags(self, uid: int, info: Optional[MessageInfo] = None) -> frozenset:
        if info is None:
            info = self.info(uid)
        f = info.flags if info else frozenset()
        return f | {"\\Recent"} if self.recent_flag and uid in self.recent else f

    def locate(self, uids: list[int]) -> list[tuple[int, int, MessageInfo]]:
        """(uid, seq, info) for the ascending `uids` still in the view, in one merge walk."""
        out: list[tuple[int, int, MessageInfo]] = []
        view, own = self.view, self.own
        if not uids:
            return out
        k = bisect.bisect_left(view, uids[0], key=_uid)
        n = len(view)
        j = k + len(uids)
        if j <= n and view[j - 1].uid == uids[-1]:
            block = view[k:j]
            if [i.uid for i in block] == uids:
                # A gap-free run of the view (FETCH 1:*): no merge walk needed.
                if own:
                    return [(i.uid, seq, own.get(i.uid, i)) for seq, i in enumerate(block, k + 1)]
                return [(i.uid, seq, i) for seq, i in enumerate(block, k + 1)]
        for u in uids:
            while k < n and view[k].uid < u:
                k += 1
            if k < n and view[k].uid == u:
                out.append((u, k + 1, own.get(u, view[k])))
        return out


@dataclass
class FolderState:
    """Everything SELECT/STATUS/refresh need, read in one io-pool call: the store's
    properties take its folder lock, which must never be waited for on the reactor."""

    infos: list[MessageInfo]
    keywords: list[str]
    token: object
    uidvalidity: int
    uidnext: int
    recent: frozenset
    highestmodseq: int = 0


def sync_folder(folder: Folder) -> FolderState:
    """The folder's state in one io-pool job and one hold of its lock, with the state token
    of what the sync saw (Folder.synced_state), so a change during the sync is seen next
    time."""
    infos, keywords, uidvalidity, uidnext, recent, highest, token = folder.synced_state()
    if recent:
        # Only messages still there (an expunged one keeps no \Recent to count). After a first
        # SELECT of a large folder most are recent: one set beats a bisection per message.
        if len(recent) > 64:
            recent = recent & {i.uid for i in infos}
        else:
            recent = frozenset(u for u in recent if _present(infos, u))
    return FolderState(infos, keywords, token, uidvalidity, uidnext, recent, highest)


def refresh_folder(folder: Folder, known: object) -> Optional[FolderState]:
    """None if the folder's state_token is still `known`, else its synced state: the check
    and the sync are one io-pool job (each job may wait in the pool's queue under load).
    Either way the held files whose pins came back go (the sync drains them too). A token of
    another generation (this process changed the folder since, e.g. the job that calls this
    after its EXPUNGE or APPEND) cannot match: the sync at once, without the four stat()s of
    state_token."""
    if isinstance(known, tuple) and known and known[0] == folder.generation \
            and folder.state_token() == known:
        folder.drain_held()
        return None
    return sync_folder(folder)


# What a job that changed the folder answers instead of its refresh when the refresh could not
# run in the same job (the folder lock became busy, the folder vanished): refresh on its own.
REFRESH_APART = object()


def then_refresh(result: Any, sel: Optional[tuple[Folder, object]]) -> tuple[Any, Any]:
    """(result, the refresh of the selected folder) for a job that has just changed the store,
    so that EXPUNGE and APPEND make one io job, not two (docs/design/imap.md, "Selection and
    refresh"). `sel`: (folder, token) of the selection, None without one. The change is done:
    a failure of the refresh must not make the pool run the job again (waits.py)."""
    if sel is None:
        return result, None
    try:
        return result, refresh_folder(*sel)
    except (LockBusy, NoSuchFolder):
        return result, REFRESH_APART


def expunge_folder(folder: Folder, uids: Optional[list[int]], known: object
                   ) -> tuple[list[int], Any]:
    """EXPUNGE and the refresh after it in one io job and one hold of the folder lock."""
    with folder.held():
        return then_refresh(folder.expunge(uids), (folder, known))


def _present(infos: list[MessageInfo], uid: int) -> bool:
    i = bisect.bisect_left(infos, uid, key=_uid)
    return i < len(infos) and infos[i].uid == uid


def uidvalidity(folder: Folder) -> int:
    return folder.uidvalidity


def changes(old: list[MessageInfo], new: list[MessageInfo],
            own: dict[int, MessageInfo]) -> tuple[list[int], list[int], list[int]]:
    """Merge two views in UID order: (UIDs gone, UIDs whose flags changed, UIDs new to the
    view but below one of `old`)."""
    gone: list[int] = []
    changed: list[int] = []
    below: list[int] = []
    j, n = 0, len(new)
    for o in old:
        while j < n and new[j].uid < o.uid:
            below.append(new[j].uid)
            j += 1
        if j < n and new[j].uid == o.uid:
            if new[j].flags != own.get(o.uid, o).flags:
                changed.append(o.uid)
            j += 1
        else:
            gone.append(o.uid)
    return gone, changed, below


class SelectionCommands(Session):
    """SELECT/EXAMINE/CLOSE/UNSELECT/EXPUNGE/CHECK and the refresh after commands."""

    @defer.inlineCallbacks
    def do_SELECT(self, tag: bytes, args: list[Token], readonly: bool = False):
        if len(args) < 1:
            raise bad("SELECT needs a mailbox name")
        raw_name = astring(args[0])
        name = decode_name(raw_name, self.rev2)
        params = self.select_params(args[1:])  # RFC 7162 CONDSTORE / QRESYNC (condstore.py)
        if self.sel is not None:
            self.announce_closed()
        # Selecting (even a failing SELECT) deselects the current folder (RFC 3501 §6.3.1).
        self.sel = None
        self.state = "auth"
        try:
            folder = yield self.io(self.account.folder, name)
        except MailboxError as e:
            raise no_for(e, "no such mailbox", R.NONEXISTENT)
        sel = Selection(folder, readonly)
        sel.recent_flag = not self.rev2
        # A read-write selection takes the \Recent messages for itself (RFC 3501 §2.3.2).
        folder.claims_recent = not readonly
        folder.selected = True
        st = yield self.io(sync_folder, folder)
        sel.view = st.infos
        sel.recent = st.recent
        sel.token = st.token
        self._announce_selection(sel, st, raw_name)
        self.sel = sel
        self.state = "selected"
        yield self.announce_modseqs(sel, st.highestmodseq, st.uidvalidity, st.uidnext, params)
        mode = R.READ_ONLY if readonly else R.READ_WRITE
        return R.code(mode) + (b"EXAMINE" if readonly else b"SELECT") + b" completed"

    def _announce_selection(self, sel: Selection, st: FolderState, raw_name: bytes = b"") -> None:
        """The untagged data of SELECT (RFC 3501 §6.3.1)."""
        sel.keywords = [k for k in st.keywords if k not in SYSTEM_FLAGS]
        self._send_flags(sel)
        self.send(b"* %d EXISTS" % len(sel))
        if self.rev2:
            # RFC 9051 §6.3.2: a LIST response with the mailbox name; no RECENT, and the
            # UNSEEN response code is gone (Appendix E).
            # A name given in another Unicode form gets OLDNAME (§6.3.2, RFC 5465 §5.4).
            wire = encode_name(sel.folder.name, True)
            old = b' ("OLDNAME" (' + quote(raw_name, True) + b"))" \
                if raw_name != wire and sel.folder.name != "INBOX" else b""
            self.send(b'* LIST () "/" ' + quote(wire, True) + old)
        else:
            self.send(b"* %d RECENT" % len(sel.recent))
            for seq, info in sel.infos():
                if "\\Seen" not in info.flags:
                    self.send(b"* OK [UNSEEN %d] first unseen message" % seq)
                    break
        self.send(b"* OK [UIDVALIDITY %d] UIDs valid" % st.uidvalidity)
        self.send(b"* OK [UIDNEXT %d] predicted next UID" % st.uidnext)

    def _send_flags(self, sel: Selection) -> None:
        flags = list(SYSTEM_FLAGS) + sel.keywords
        self.send(b"* FLAGS " + flag_list(flags))
        # \* only while the folder has room for another keyword (RFC 3501 §7.1, PERMANENTFLAGS).
        room = ["\\*"] if len(sel.keywords) < MAX_KEYWORDS else []
        self.send(b"* OK [PERMANENTFLAGS " + flag_list(flags + room) + b"] flags permitted")

    def announce_keywords(self, sel: Selection, flags: Iterable[str]) -> None:
        """`* FLAGS` and PERMANENTFLAGS again before a FETCH shows a keyword the client has
        not been told about (RFC 3501 §7.2.6; docs/design/imap.md, "Conformance")."""
        known = sel.keywords
        new = [f for f in flags if not f.startswith("\\") and f not in known]
        if new:
            sel.keywords = known + sorted(set(new))
            self._send_flags(sel)

    def do_EXAMINE(self, tag: bytes, args: list[Token]) -> defer.Deferred:
        return self.do_SELECT(tag, args, readonly=True)

    @defer.inlineCallbacks
    def do_CHECK(self, tag: bytes, args: list[Token]):
        yield self.refresh()
        return b"CHECK completed"

    def do_CLOSE(self, tag: bytes, args: list[Token]) -> defer.Deferred | bytes:
        sel = self.sel
        self.sel = None
        self.state = "auth"
        if sel is not None and not sel.readonly:
            # RFC 3501 §6.4.2: remove \Deleted messages silently.
            d = self.io(sel.folder.expunge, None)
            d.addCallback(lambda _: b"CLOSE completed")
            return d
        return b"CLOSE completed"

    def do_UNSELECT(self, tag: bytes, args: list[Token]) -> bytes:
        self.sel = None
        self.state = "auth"
        return b"UNSELECT completed"

    @defer.inlineCallbacks
    def do_EXPUNGE(self, tag: bytes, args: list[Token], uid: bool = False):
        sel = self.sel
        if sel.readonly:
            raise no("mailbox is read-only", R.READ_ONLY)
        uids = None
        if uid:
            if len(args) != 1:
                raise bad("UID EXPUNGE needs a UID set")
            wanted = self.resolve(args[0], True)
            uids = [u for u in wanted if "\\Deleted" in sel.info(u).flags]
            # The flags may have changed in another session: check on disk, in the store.
            if not uids:
                yield self.refresh()
                return b"UID EXPUNGE completed"
        removed, st = yield self.io(expunge_folder, sel.folder, uids, sel.token)
        self.report_expunged(removed)
        yield self.refreshed(sel, st)
        return b"EXPUNGE completed"

    def report_expunged(self, removed: Iterable[int]) -> None:
        """`* n EXPUNGE`, highest sequence number first so earlier numbers stay valid."""
        removed = list(removed)
        if not self.report_vanished(removed):  # QRESYNC: VANISHED instead (condstore.py)
            for seq in self.sel.remove(removed):
                self.send(b"* %d EXPUNGE" % seq)
        # Announced: the store may drop the files it kept readable for us, at the next refresh
        # (docs/design/imap.md, "Expunged messages stay readable until announced").
        self.sel.folder.release(removed)

    def resolve(self, args_set: Token, uid: bool) -> list[int]:
        """UIDs a sequence set or UID set names, ascending."""
        if args_set == b"$":
            # RFC 5182 §2: the saved SEARCH result, less the messages expunged since.
            return [u for u in self.sel.searchres if self.sel.has(u)]
        s = sequence_set(args_set)
        return self.sel.select_uids(s) if uid else self.sel.select_seqs(s)

    @defer.inlineCallbacks
    def refresh(self, shared: bool = False):
        """Tell the client what changed in the selected folder: EXPUNGE, FETCH FLAGS, EXISTS.

        shared: IDLE polling; sessions idling on one folder share one state_token check per
        poll interval (idle.py)."""
        sel = self.sel
        if sel is None or self.closed:
            return
        try:
            if shared:
                token = yield self.shared_state_token(sel.folder)
                if token == sel.token:
                    return
                st = yield self.io(sync_folder, sel.folder)
            else:
                st = yield self.io(refresh_folder, sel.folder, sel.token)
                if st is None:
                    return
        except NoSuchFolder:
            # Deleted or renamed by another session: RFC 3501 §7.1.5 allows BYE here, and
            # sequence numbers could no longer be kept consistent.
            log.info("imap: selected folder {folder} of {user} vanished", folder=sel.folder.name,
                     user=self.user)
            self.send(b"* BYE the selected mailbox was deleted or renamed")
            self.hangup()
            self.closed = True
            return
        if self.sel is sel:
            self._announce_changes(sel, st)

    def refresh_args(self) -> Optional[tuple[Folder, object]]:
        """What then_refresh needs to refresh the selection inside another io job."""
        sel = self.sel
        return None if sel is None or self.closed else (sel.folder, sel.token)

    def refreshed(self, sel: Optional[Selection], st: Any) -> Optional[defer.Deferred]:
        """Announce what then_refresh found for `sel` (refresh apart if it could not)."""
        if st is REFRESH_APART:
            return self.refresh()
        if st is not None and sel is not None and self.sel is sel and not self.closed:
            self._announce_changes(sel, st)
        return None

    def _announce_changes(self, sel: Selection, st: FolderState) -> None:
        sel.token = st.token
        self.announce_keywords(sel, st.keywords)
        old, infos = sel.view, st.infos
        if sel.hidden:
            infos = [i for i in infos if i.uid not in sel.hidden]
        if infos is old and not sel.own:
            return  # the very list we already reported: nothing changed
        m = len(old)
        if not sel.own and len(infos) == m and infos == old:
            sel.view = infos
            return  # a new list with the same messages and flags
        if not sel.own and len(infos) > m and (m == 0 or infos[m - 1] is old[-1]) and infos[:m] == old:
            # Only new messages (the common case while idling): the store reuses the info
            # objects of unchanged messages, so this comparison runs at C speed on 100k.
            sel.view = infos
            sel.recent = st.recent
            self.send(b"* %d EXISTS" % len(sel))
            if not self.rev2:  # RFC 9051 Appendix E: no RECENT response
                self.send(b"* %d RECENT" % len(sel.recent))
            return
        gone, changed, below = changes(old, infos, sel.own)
        if below:
            # Sequence numbers would shift under the client (RFC 3501 §2.3.1.1: UIDs only
            # ascend); the store should never list such a message, so say so in the log.
            log.warn("imap: {n} message(s) of {folder} for {user} appeared below UIDs this "
                     "session has shown; left out of its view: {uids}", n=len(below),
                     folder=sel.folder.name, user=self.user, uids=below[:10])
            sel.hidden.update(below)
            infos = [i for i in infos if i.uid not in sel.hidden]
        self.report_expunged(gone)
        before = len(sel)
        sel.view = infos
        sel.own = {}
        sel.recent = st.recent
        for u in changed:
            self.send(b"* %d FETCH (UID %d FLAGS %s%s)" % (sel.seq_of(u), u, flag_list(sel.flags(u)),
                                                          self.modseq_item(sel.info(u))))
        if len(sel) != before:
            self.send(b"* %d EXISTS" % len(sel))
            if not self.rev2:
                self.send(b"* %d RECENT" % len(sel.recent))

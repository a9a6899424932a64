"""Folder commands of the authenticated (and selected) state: LIST, LSUB, CREATE, DELETE,
RENAME, SUBSCRIBE, UNSUBSCRIBE, STATUS, NAMESPACE (RFC 3501 §6.3, RFC 5258 LIST-EXTENDED,
RFC 6154 SPECIAL-USE, RFC 2342 NAMESPACE).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from twisted.internet import defer

from mailsuite.imap import responses as R
from mailsuite.imap.names import decode_name, encode_name, quote
from mailsuite.imap.parser import Atom, Token, astring
from mailsuite.imap.responses import CommandError, bad, no, no_for
from mailsuite.imap.selection import FolderState, sync_folder, then_refresh
from mailsuite.imap.session import Session
from mailsuite.imap.status import parse_items, status_line
from mailsuite.mailbox.store import Account, Folder, FolderExists, MailboxError

LIST_SELECT_OPTIONS = {b"SUBSCRIBED", b"REMOTE", b"RECURSIVEMATCH", b"SPECIAL-USE"}
# RFC 5258 §6 (SUBSCRIBED, CHILDREN), RFC 6154 §5 (SPECIAL-USE), RFC 5819 (STATUS); anything
# else is BAD.
LIST_RETURN_OPTIONS = {b"SUBSCRIBED", b"CHILDREN", b"SPECIAL-USE", b"STATUS"}


@dataclass
class ListRequest:
    """A LIST or LSUB command, parsed (RFC 5258 §3 for the selection and return options)."""

    lsub: bool
    ref: bytes
    patterns: list[bytes]
    select_opts: set[bytes] = field(default_factory=set)
    return_opts: set[bytes] = field(default_factory=set)
    status_items: list[bytes] = field(default_factory=list)  # RETURN (STATUS (...)), RFC 5819
    utf8: bool = False  # IMAP4rev2 session: UTF-8 names (RFC 9051 §5.1)

    @property
    def only_subscribed(self) -> bool:
        return self.lsub or b"SUBSCRIBED" in self.select_opts

    @property
    def show_subscribed(self) -> bool:
        return b"SUBSCRIBED" in self.select_opts or b"SUBSCRIBED" in self.return_opts


def parse_list(args: list[Token], lsub: bool, rev2: bool = False) -> ListRequest:
    args = list(args)
    select_opts: set[bytes] = set()
    if not lsub and args and isinstance(args[0], list):  # LIST-EXTENDED selection options
        select_opts = {astring(a).upper() for a in args.pop(0)}
    if len(args) < 2:
        raise bad("LIST needs a reference and a pattern")
    pats = args[1]
    patterns = [astring(p) for p in pats] if isinstance(pats, list) else [astring(pats)]
    req = ListRequest(lsub, astring(args[0]), patterns, select_opts, utf8=rev2)
    rest = args[2:]
    if rest:
        if len(rest) != 2 or not isinstance(rest[0], Atom) or rest[0].upper() != b"RETURN" \
                or not isinstance(rest[1], list):
            raise bad("invalid LIST return options")
        opts = list(rest[1])
        while opts:
            opt = astring(opts.pop(0)).upper()
            if opt == b"STATUS":
                if not opts:
                    raise bad("STATUS needs a list of items")
                req.status_items = parse_items(opts.pop(0), rev2)
            req.return_opts.add(opt)
    if select_opts - LIST_SELECT_OPTIONS:
        raise bad("unsupported LIST selection option")
    if b"RECURSIVEMATCH" in select_opts and not select_opts - {b"RECURSIVEMATCH", b"REMOTE"}:
        # RFC 5258 §3.1: RECURSIVEMATCH only together with another selection option.
        raise bad("RECURSIVEMATCH needs another selection option")
    if req.return_opts - LIST_RETURN_OPTIONS:
        raise bad("unsupported LIST return option")
    return req


def name_matcher(ref: bytes, patterns: list[bytes], utf8: bool = False) -> Callable[[str], bool]:
    """Whether a folder name matches one of the patterns (RFC 3501 §6.3.8: `*` matches across
    the delimiter, `%` does not; INBOX matches in any case)."""
    ref_s = decode_name(ref, utf8) if ref else ""
    matchers = []
    for p in patterns:
        try:
            pat = ref_s + decode_name(p, utf8) if p else ref_s
        except CommandError:
            continue  # not a valid name (modified UTF-7, or UTF-8 in rev2): matches none
        rx = "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in pat)
        matchers.append(re.compile("^" + rx + "$", re.I if pat.upper().startswith("INBOX") else 0))

    def matches(n: str) -> bool:
        return any(m.match(n) or (n == "INBOX" and m.match("inbox")) for m in matchers)
    return matches


def list_entries(req: ListRequest, existing: list[str], subscribed: list[str],
                 special: dict[str, str | None]) -> list[tuple[str, list[str], bytes]]:
    """(name, attributes, extended data) for every folder the LIST/LSUB answers with."""
    matches = name_matcher(req.ref, req.patterns, req.utf8)
    exist_set, sub_set = set(existing), set(subscribed)
    names = sorted(sub_set if req.only_subscribed else exist_set, key=lambda n: (n != "INBOX", n))
    lines: list[tuple[str, list[str], bytes]] = []
    emitted = set()
    recursive = b"RECURSIVEMATCH" in req.select_opts
    # Parents of subscribed folders that the patterns do not reach: RFC 3501 §6.3.9 (LSUB
    # with `%` returns such a parent \Noselect) and RFC 5258 §3.5 (CHILDINFO).
    hidden_parents: set[str] = set()
    if req.lsub or recursive:
        for n in sub_set:
            if matches(n):
                continue
            parts = n.split("/")
            hidden_parents.update("/".join(parts[:i]) for i in range(1, len(parts)))
    for n in names:
        if not matches(n):
            continue
        extra = b' (CHILDINFO ("SUBSCRIBED"))' if recursive and n in hidden_parents else b""
        lines.append((n, _attributes(req, n, exist_set, sub_set, special.get(n)), extra))
        emitted.add(n)
    for n in sorted(hidden_parents - emitted):
        if not matches(n):
            continue
        if req.lsub:
            lines.append((n, ["\\Noselect"], b""))
        else:
            attrs = _attributes(req, n, exist_set, sub_set, special.get(n))
            lines.append((n, [a for a in attrs if a != "\\Subscribed"],
                          b' (CHILDINFO ("SUBSCRIBED"))'))
        emitted.add(n)
    # `%` stops at the delimiter: a matching parent that exists only as a path is \Noselect.
    if not req.only_subscribed:
        for n in exist_set:
            parts = n.split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                if parent not in exist_set and parent not in emitted and matches(parent):
                    lines.append((parent, ["\\Noselect", "\\HasChildren"], b""))
                    emitted.add(parent)
    return lines


def _attributes(req: ListRequest, n: str, exist_set: set[str], sub_set: set[str],
                use: str | None) -> list[str]:
    attrs = []
    if n not in exist_set:
        # Never report a subscribed but missing folder as selectable (docs/design/imap.md,
        # "Folders").
        attrs.append("\\NonExistent" if b"SUBSCRIBED" in req.select_opts else "\\Noselect")
    else:
        children = any(o.startswith(n + "/") for o in exist_set)
        attrs.append("\\HasChildren" if children else "\\HasNoChildren")
    if use:  # RFC 6154 §3: attributes may always be returned, not only on request
        attrs.append(use)
    if req.show_subscribed and n in sub_set:
        attrs.append("\\Subscribed")
    return attrs


def folders_and_subscriptions(account: Account, selected: Optional[tuple[Folder, object]]
                              ) -> tuple[tuple[list[str], list[str]], Any]:
    """The folders and subscriptions, and the selection's refresh (selection.then_refresh)."""
    return then_refresh((account.list_folders(), account.subscriptions()), selected)


class FolderCommands(Session):
    """LIST/LSUB/CREATE/DELETE/RENAME/SUBSCRIBE/UNSUBSCRIBE/STATUS/NAMESPACE."""

    def do_NAMESPACE(self, tag: bytes, args: list[Token]) -> bytes:
        self.send(b'* NAMESPACE (("" "/")) NIL NIL')
        return b"NAMESPACE completed"

    @defer.inlineCallbacks
    def do_LIST(self, tag: bytes, args: list[Token], lsub: bool = False):
        req = parse_list(args, lsub, self.rev2)
        verb = b"LSUB" if lsub else b"LIST"
        if not lsub and req.patterns == [b""]:
            # RFC 3501 §6.3.8: the hierarchy delimiter and root name.
            self.send(b'* LIST (\\Noselect) "/" ""')
            yield self.refresh()
            return b"LIST completed"
        account, sel = self.account, self.sel
        # The refresh after LIST (RFC 3501 §5.5) is taken in the same io job, announced last.
        (existing, subscribed), news = yield self.io(folders_and_subscriptions, account,
                                                     self.refresh_args())
        special = {n: account.special_use(n) for n in existing}
        for n, attrs, extra in list_entries(req, existing, subscribed, special):
            self.send(b"* " + verb + b" (" + " ".join(attrs).encode() + b') "/" ' +
                      quote(encode_name(n, self.rev2), self.rev2) + extra)
            if req.status_items and not {"\\Noselect", "\\NonExistent"} & set(attrs):
                yield self._list_status(n, req.status_items)
        yield self.refreshed(sel, news)
        return verb + b" completed"

    def do_LSUB(self, tag: bytes, args: list[Token]) -> defer.Deferred:
        return self.do_LIST(tag, args, lsub=True)

    @defer.inlineCallbacks
    def do_CREATE(self, tag: bytes, args: list[Token]):
        if len(args) != 1:
            raise bad("CREATE needs a mailbox name")
        name = decode_name(astring(args[0]), self.rev2).rstrip("/")
        if name.upper() == "INBOX":
            raise no("INBOX always exists", R.ALREADYEXISTS)
        try:
            yield self.io(self.account.create_folder, name)
        except MailboxError as e:
            code = R.ALREADYEXISTS if isinstance(e, FolderExists) else R.CANNOT
            raise no_for(e, "cannot create that mailbox", code)
        return b"CREATE completed"

    @defer.inlineCallbacks
    def do_DELETE(self, tag: bytes, args: list[Token]):
        if len(args) != 1:
            raise bad("DELETE needs a mailbox name")
        name = decode_name(astring(args[0]), self.rev2)
        if name == "INBOX":
            raise no("INBOX cannot be deleted", R.CANNOT)
        if self.sel is not None and self.sel.folder.name == name:
            self.sel = None
            self.state = "auth"
        try:
            yield self.io(self.account.delete_folder, name)
        except MailboxError as e:
            code = R.NONEXISTENT
            if self.rev2:
                # RFC 9051 §6.3.5: a name that exists only as the parent of others.
                existing = yield self.io(self.account.list_folders)
                if any(n.startswith(name + "/") for n in existing):
                    code = R.HASCHILDREN
            raise no_for(e, "cannot delete that mailbox", code)
        # The subscription stays (RFC 3501 §6.3.6: never removed unilaterally); LIST and LSUB
        # show it \NonExistent / \Noselect (docs/design/imap.md, "Folders").
        return b"DELETE completed"

    @defer.inlineCallbacks
    def do_RENAME(self, tag: bytes, args: list[Token]):
        if len(args) != 2:
            raise bad("RENAME needs two mailbox names")
        old = decode_name(astring(args[0]), self.rev2)
        new = decode_name(astring(args[1]), self.rev2).rstrip("/")
        try:
            yield self.io(self.account.rename_folder, old, new)
        except MailboxError as e:
            raise no_for(e, "cannot rename that mailbox", R.CANNOT)
        return b"RENAME completed"

    @defer.inlineCallbacks
    def do_SUBSCRIBE(self, tag: bytes, args: list[Token]):
        if len(args) != 1:
            raise bad("SUBSCRIBE needs a mailbox name")
        try:
            yield self.io(self.account.subscribe, decode_name(astring(args[0]), self.rev2))
        except MailboxError as e:
            raise no_for(e, "cannot subscribe")
        return b"SUBSCRIBE completed"

    @defer.inlineCallbacks
    def do_UNSUBSCRIBE(self, tag: bytes, args: list[Token]):
        if len(args) != 1:
            raise bad("UNSUBSCRIBE needs a mailbox name")
        try:
            yield self.io(self.account.unsubscribe, decode_name(astring(args[0]), self.rev2))
        except MailboxError as e:
            raise no_for(e, "cannot unsubscribe")
        return b"UNSUBSCRIBE completed"

    @defer.inlineCallbacks
    def _list_status(self, name: str, items: list[bytes]):
        """The STATUS response that follows a LIST response (RFC 5819 §2): none for a folder
        that vanished meanwhile."""
        try:
            st, _ = yield self.io(named_state, self.account, name, None)
        except MailboxError:
            return
        self.send(status_line(name, st, items, self.rev2))

    @defer.inlineCallbacks
    def do_STATUS(self, tag: bytes, args: list[Token]):
        if len(args) != 2 or not isinstance(args[1], list):
            raise bad("STATUS needs a mailbox name and a list of items")
        name = decode_name(astring(args[0]), self.rev2)
        items = parse_items(args[1], self.rev2)
        sel = self.sel
        # One trip to the io pool for the state and the refresh after STATUS (docs/design/
        # imap.md, "Throughput").
        if sel is not None and sel.folder.name == name:
            st = yield self.io(sync_folder, sel.folder)
            news = None if st.token == sel.token else st  # the refresh's sync is this one
        else:
            try:
                st, news = yield self.io(named_state, self.account, name, self.refresh_args())
            except MailboxError as e:
                raise no_for(e, "no such mailbox", R.NONEXISTENT)
        if b"HIGHESTMODSEQ" in items:
            yield self.enable_condstore()  # RFC 7162 §3.1.6
        self.send(status_line(name, st, items, self.rev2))
        yield self.refreshed(sel, news)
        return b"STATUS completed"


def named_state(account: Account, name: str, selected: Optional[tuple[Folder, object]]
                ) -> tuple[FolderState, Any]:
    """The state of the folder `name` (runs in the io pool; MailboxError if there is none) and
    the selection's refresh (selection.then_refresh)."""
    return then_refresh(sync_folder(account.folder(name)), selected)

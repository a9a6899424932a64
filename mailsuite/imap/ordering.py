"""SORT and THREAD (RFC 5256), UID SORT and UID THREAD, SORT=DISPLAY (RFC 5957), in the
selected state. The searching is SEARCH's (messages.py); the algorithms are in sort.py and
thread.py. Header values are read in the io pool, and the ordering runs there too: a webmail
client sorts or threads a whole folder on every page (docs/design/imap.md, "SORT and THREAD").
"""
from __future__ import annotations

from twisted.internet import defer

from mailsuite.imap import responses as R
from mailsuite.imap import search as searchmod
from mailsuite.imap import sort as sortmod
from mailsuite.imap import thread as threadmod
from mailsuite.imap.parser import Atom, Token, astring
from mailsuite.imap.responses import bad, no
from mailsuite.imap.session import Session
from mailsuite.mailbox.info import UNDATED

HEADER_BATCH = 500  # messages per io-pool call when reading header values
THREAD_ALGORITHMS = {b"ORDEREDSUBJECT": threadmod.orderedsubject,
                     b"REFERENCES": threadmod.references}


def _program(charset: Token, keys: list[Token], rev2: bool = False) -> searchmod.Node:
    """The search program after the mandatory charset (RFC 5256 §3); `rev2`: no RECENT, NEW
    or OLD (RFC 9051 Appendix E)."""
    if not isinstance(charset, bytes):
        raise bad("a charset is required")
    try:
        program = searchmod.parse([Atom(b"CHARSET"), charset] + list(keys))
    except searchmod.BadCharset:
        raise no("unsupported charset", R.BADCHARSET + b" (UTF-8 US-ASCII)")
    if rev2 and searchmod.uses_recent(program):
        raise bad("RECENT, NEW and OLD are no IMAP4rev2 search keys")
    return program


def _order(criteria, items):
    return sortmod.sort_items(items, criteria)


def _threads(algorithm, items) -> bytes:
    return threadmod.format_threads(algorithm(items))


class OrderingCommands(Session):
    """SORT/THREAD."""

    @defer.inlineCallbacks
    def _items(self, program: searchmod.Node, uid: bool, headers: bool, dates: bool = True,
               arrival: bool = False):
        """(sort.Item for every matching message, with header Fields when `headers`, and real
        INTERNALDATEs when `dates` (docs/design/maildir.md, "Dates on demand"); whether one
        was left out because it was expunged elsewhere). `arrival`: INTERNALDATE itself is a
        key, not only the fallback of a missing Date: field."""
        sel = self.sel
        program = searchmod.with_saved(program, frozenset(sel.searchres))
        found = yield self.search_uids(program)
        vanished = found.vanished
        located = sel.locate(found)
        fields: list = [None] * len(located)
        if headers:
            fields = []
            for start in range(0, len(located), HEADER_BATCH):
                batch = [info for _, _, info in located[start:start + HEADER_BATCH]]
                got = yield self.io(sortmod.load_fields, sel.folder, batch)
                fields.extend(got)
        if dates:
            yield self.io(sel.folder.ensure_dates, [info for _, _, info in located])
        items = []
        for (u, seq, info), f in zip(located, fields):
            if headers and f is None:
                vanished = True  # the file vanished meanwhile (expunged elsewhere)
                continue
            if dates and info.date == UNDATED and (arrival or f is None or f.sent is None):
                # Expunged elsewhere before anyone here dated it (no stat here, on the
                # reactor: ensure_dates ran): its place in the order cannot be known.
                vanished = True
                continue
            items.append(sortmod.Item(u if uid else seq, u, info.size,
                                      info.internaldate if dates else info.date, f))
        return items, vanished

    @defer.inlineCallbacks
    def do_SORT(self, tag: bytes, args: list[Token], uid: bool = False):
        # ESORT (RFC 5267, SORT RETURN) is not offered.
        rest = list(args)
        if len(rest) < 3:
            raise bad("SORT needs sort criteria, a charset and search keys")
        criteria = sortmod.parse_criteria(rest[0])
        program = _program(rest[1], rest[2:], self.rev2)
        keys = {k for k, _ in criteria}
        items, vanished = yield self._items(program, uid, sortmod.needs_headers(criteria),
                                            bool(keys & {b"ARRIVAL", b"DATE"}),
                                            arrival=b"ARRIVAL" in keys)
        numbers = yield self.io(_order, criteria, items)
        self.send(b"* SORT" + b"".join(b" %d" % n for n in numbers))
        if uid:
            yield self.refresh()
        return R.completed(b"SORT", vanished)

    @defer.inlineCallbacks
    def do_THREAD(self, tag: bytes, args: list[Token], uid: bool = False):
        if len(args) < 3:
            raise bad("THREAD needs an algorithm, a charset and search keys")
        algorithm = THREAD_ALGORITHMS.get(astring(args[0]).upper()) \
            if not isinstance(args[0], list) else None
        if algorithm is None:
            raise bad("unknown threading algorithm")
        program = _program(args[1], args[2:], self.rev2)
        items, vanished = yield self._items(program, uid, True)
        text = yield self.io(_threads, algorithm, items)
        self.send(b"* THREAD " + text if text else b"* THREAD")
        if uid:
            yield self.refresh()
        return R.completed(b"THREAD", vanished)

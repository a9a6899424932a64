"""FETCH and UID FETCH (selected state, RFC 3501 §6.4.5): one `FetchCommand` per command.

Items that the index knows (FLAGS, UID, INTERNALDATE, RFC822.SIZE) never open a message file.
The others are computed from the raw file bytes in the io pool, a batch at a time, while the
previous batch is written; sections larger than STREAM_THRESHOLD are streamed from the file
with backpressure from the transport. See docs/design/imap.md, "FETCH".
"""
from __future__ import annotations

import bisect
import mmap
import os
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, BinaryIO, Callable, Optional, Sequence, Union

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from mailsuite.imap import binary as binmod
from mailsuite.imap import message as mime
from mailsuite.imap.condstore import split_fetch
from mailsuite.imap.flags import flag_list
from mailsuite.imap.messages import store_flags
from mailsuite.imap.parser import FetchAtt, Token, fetch_atts, format_internaldate
from mailsuite.imap.responses import bad
from mailsuite.imap.selection import Selection
from mailsuite.imap.session import Session
from mailsuite.mailbox.store import Folder, LockBusy, MessageInfo, NoSuchMessage
from mailsuite.mailbox.memo import FileMemo, content_id
from mailsuite.mailbox.info import UNDATED

STREAM_THRESHOLD = 256 * 1024  # sections larger than this are streamed from the file
CHUNK = 64 * 1024
BATCH = 200  # messages per thread-pool call
HEADER_BATCH = 1000  # the same when only header blocks are asked for (mailsuite-cache)
BATCH_BYTES = 4 * 1024 * 1024  # message octets per batch (see batches)
INDEX_ITEMS = (b"FLAGS", b"UID", b"INTERNALDATE", b"RFC822.SIZE")  # answered from the index
HEADER_TEXTS = (b"HEADER", b"HEADER.FIELDS", b"HEADER.FIELDS.NOT")


# What fills a slot of _write_fast's template (an int: the id() of a section's FetchAtt).
_UID, _FLAGS, _SIZE, _DATE, _MODSEQ = (object() for _ in range(5))
_INDEX_KINDS = (_UID, _FLAGS, _SIZE, _DATE, _MODSEQ)


class _Made(dict):
    """A memo of make(key) for the keys asked for."""

    def __init__(self, make: Callable[[Any], bytes]):
        super().__init__()
        self.make = make

    def __missing__(self, key: Any) -> bytes:
        value = self[key] = self.make(key)
        return value


class FileRange:
    """A large section to stream from a message file."""

    def __init__(self, uid: int, offset: int, length: int, binary: bool = False):
        self.uid, self.offset, self.length = uid, offset, length
        self.binary = binary  # BINARY[]: a literal8 of the true octets (binary.py)


Piece = Union[bytes, FileRange]


@implementer(IPushProducer)
class WriteGate:
    """Learns from the transport when its buffer is full, so FETCH can wait (backpressure)."""

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False
        self.resumes = 0  # how often the client made room: a stalled client makes none
        self._waiters: list[defer.Deferred] = []

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.resumes += 1
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def stopProducing(self) -> None:
        self.stopped = True
        self.resumeProducing()

    def wait(self) -> defer.Deferred:
        if not self.paused or self.stopped:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append(d)
        return d


class FetchCommands(Session):
    """The FETCH handler; the work is done by FetchCommand."""

    gate: WriteGate

    def do_FETCH(self, tag: bytes, args: list[Token], uid: bool = False) -> defer.Deferred:
        if len(args) < 2:
            raise bad("FETCH needs a set and items")
        # RFC 7162: the MODSEQ item and the CHANGEDSINCE/VANISHED modifiers (condstore.py).
        args, mods = split_fetch(args, uid, self.qresync)
        uids = self.resolve(args[0], uid)
        only_modseq = args[1] == [] and mods is not None
        atts = [] if only_modseq else fetch_atts(args[1] if len(args) == 2 else list(args[1:]))
        # With QRESYNC every FETCH response carries the UID (RFC 7162 §3.2.4).
        if (uid or self.qresync) and b"UID" not in {a.name for a in atts}:
            atts.insert(0, FetchAtt(b"UID"))
        cmd = FetchCommand(self, uids, atts, uid)
        if mods is not None or self.condstore:
            return self.condstore_fetch(cmd, mods, args[0])
        return cmd.run()


class FetchCommand:
    """One FETCH: the messages and items asked for, and how to answer them."""

    def __init__(self, session: FetchCommands, uids: list[int], atts: list[FetchAtt], uid: bool):
        assert session.sel is not None
        self.session = session
        self.sel: Selection = session.sel
        self.uids = uids
        self.atts = atts
        self.uid = uid
        self.needs_file = any(a.name not in INDEX_ITEMS for a in atts)
        self.modseq = False  # add MODSEQ (RFC 7162 §3.1.4; set by condstore.condstore_fetch)
        # RFC 3501 §6.4.5: BODY[...] (not BODY.PEEK) and RFC822/RFC822.TEXT set \Seen.
        self.sets_seen = not self.sel.readonly and any(
            a.name in (b"BODY", b"RFC822", b"RFC822.TEXT", b"BINARY") and (a.section is not None or a.name != b"BODY")
            for a in atts)

    @defer.inlineCallbacks
    def run(self):
        # The connection's gate is registered with the transport for the whole session
        # (server.py), so a client that does not read pauses us here.
        s = self.session
        form = HeaderForm.of(self)
        if form is not None:
            yield self._write_headers(form)
            if s.closed:
                return None
            if self.uid:
                yield s.refresh()
            return b"FETCH completed"
        headers = header_only([a for a in self.atts if a.name not in INDEX_ITEMS])
        chunks = batches(self.sel, self.uids, self.needs_file, HEADER_BATCH if headers else BATCH)
        pending = self._compute(chunks[0]) if self.needs_file and chunks else None
        dated = any(a.name == b"INTERNALDATE" for a in self.atts)
        for ci, chunk in enumerate(chunks):
            computed = None
            if dated:  # docs/design/maildir.md, "Dates on demand": stat in the io pool
                yield s.io(self.sel.folder.ensure_dates,
                           [info for _, _, info in self.sel.locate(chunk)])
            if self.needs_file:
                computed = yield pending
                # Read the next batch in the io pool while this one is written out.
                if ci + 1 < len(chunks):
                    pending = self._compute(chunks[ci + 1])
            if self.sets_seen:
                yield self._mark_seen(chunk, computed)
                yield self._write_batch(chunk, computed)
            else:
                yield self._write_fast(chunk, computed)
            yield s.gate.wait()
            if s.closed:
                return None
        if self.uid:
            yield s.refresh()
        return b"FETCH completed"

    @defer.inlineCallbacks
    def _write_headers(self, form: "HeaderForm"):
        """A header-only FETCH whose other items never change (UID, RFC822.SIZE): the io pool
        formats whole batches of responses, the reactor writes each in one piece while the
        pool formats the next (docs/design/imap.md, "FETCH")."""
        s = self.session
        infos, seqs = view_messages(self.sel, self.uids)
        folder = self.sel.folder
        start = 0
        pending = s.io(form.batch, folder, infos, seqs, start) if infos else None
        while pending is not None:
            start, parts = yield pending
            # Read the next batch in the io pool while this one is written out.
            pending = s.io(form.batch, folder, infos, seqs, start) if start < len(infos) else None
            for part in parts:
                if s.closed:
                    break
                if isinstance(part, bytes):
                    s.transport.write(part)
                else:  # a streamed section, or one the general writer joins otherwise
                    u, pieces = part
                    yield self._write_batch([u], {u: pieces})
            yield s.gate.wait()
            if s.closed:
                if pending is not None:
                    pending.addErrback(lambda _: None)  # nobody to answer any more
                return

    def _compute(self, chunk: list[int]) -> defer.Deferred:
        infos = {u: info for u, _, info in self.sel.locate(chunk)}
        return self.session.io(compute_batch, self.sel.folder, chunk, self.atts, infos)

    @defer.inlineCallbacks
    def _mark_seen(self, chunk: list[int], computed: Optional[dict[int, dict[int, Piece]]]):
        sel = self.sel
        need = [u for u, _, info in sel.locate(chunk) if "\\Seen" not in info.flags
                and (computed is None or u in computed)]
        if need:
            results = yield self.session.io(store_flags, sel.folder, need, ["\\Seen"], b"+")
            for u, new in results:
                sel.set_flags(u, new)
            # The mod-sequences the changes got (RFC 7162; condstore.py).
            yield self.session.refresh_own_modseqs([u for u, _ in results])

    @defer.inlineCallbacks
    def _write_batch(self, chunk: list[int], computed: Optional[dict[int, dict[int, Piece]]]):
        s = self.session
        out = bytearray()
        dated = any(a.name == b"INTERNALDATE" for a in self.atts)
        for u, seq, info in self.sel.locate(chunk):
            pieces = computed.get(u) if computed is not None else None
            if pieces is None and computed is not None:
                continue  # its file vanished (expunged elsewhere): nothing to send
            if dated and info.date == UNDATED:
                # Still undated after ensure_dates (no stat here, on the reactor): expunged
                # elsewhere, its date unknown (MessageInfo.known_date): as if its file vanished.
                continue
            out += b"* %d FETCH (" % seq
            first = True
            for it in self._items(u, info, pieces):
                if isinstance(it, FileRange):
                    s.transport.write(bytes(out))
                    out = bytearray()
                    yield self._stream(it)
                    continue
                if not first and not out.endswith(b" "):
                    out += b" "
                out += it
                first = False
            out += b")\r\n"
            if len(out) > CHUNK:
                s.transport.write(bytes(out))
                out = bytearray()
                yield s.gate.wait()
        if out and not s.closed:
            s.transport.write(bytes(out))

    @defer.inlineCallbacks
    def _write_fast(self, chunk: list[int], computed: Optional[dict[int, dict[int, Piece]]]):
        """The same bytes as _write_batch, formatted a batch at a time: one format string for
        the item list, per message only its values (docs/design/imap.md, "FETCH")."""
        s = self.session
        sel = self.sel
        fmt, kinds = self._template()
        recent = sel.recent if sel.recent_flag else frozenset()
        lists = _Made(flag_list)  # each distinct flag set / date formatted once per batch
        dates = _Made(format_internaldate)
        if computed is None and all(k in _INDEX_KINDS for k in kinds):
            if not s.closed:
                s.transport.write(self._index_lines(chunk, fmt, kinds, recent, lists, dates))
            return
        lines: list[bytes] = []
        for u, seq, info in sel.locate(chunk):
            pieces = computed.get(u) if computed is not None else None
            if pieces is None and computed is not None:
                continue  # its file vanished (expunged elsewhere): nothing to send
            values: list = [seq]
            unknown = False
            for kind in kinds:
                if kind is _UID:
                    values.append(u)
                elif kind is _FLAGS:
                    flags = info.flags
                    if u in recent:
                        flags = flags | {"\\Recent"}
                    values.append(lists[flags])
                elif kind is _SIZE:
                    values.append(info.size)
                elif kind is _DATE:
                    if info.date == UNDATED:
                        unknown = True  # expunged elsewhere, its date unknown: nothing to send
                        break
                    values.append(dates[info.date])
                elif kind is _MODSEQ:
                    values.append((sel.info(u) or info).modseq)
                else:
                    assert pieces is not None
                    piece = pieces[kind]
                    if not isinstance(piece, bytes) or piece.endswith(b" "):
                        values = []  # streamed, or an item the general path joins otherwise
                        break
                    values.append(piece)
            if unknown:
                continue
            if values:
                lines.append(fmt % tuple(values))
                continue
            if lines:
                s.transport.write(b"".join(lines))
                lines = []
            yield self._write_batch([u], computed)
        if lines and not s.closed:
            s.transport.write(b"".join(lines))

    def _index_lines(self, chunk: list[int], fmt: bytes, kinds: list, recent: frozenset,
                     lists: "_Made", dates: "_Made") -> bytes:
        """_write_fast's bytes when every item comes from the index (FETCH 1:* (UID FLAGS
        RFC822.SIZE)): one column of values per item, then one format per message."""
        sel = self.sel
        infos, seqs = view_messages(sel, chunk)
        own = sel.own
        if own:
            infos = [own.get(i.uid, i) for i in infos]
        if _DATE in kinds and any(i.date == UNDATED for i in infos):
            # Expunged elsewhere with a date nobody recorded: left out (_write_batch).
            kept = [(i, s) for i, s in zip(infos, seqs) if i.date != UNDATED]
            infos, seqs = [i for i, _ in kept], [s for _, s in kept]
        columns: list = [seqs]
        for kind in kinds:
            if kind is _UID:
                columns.append([i.uid for i in infos])
            elif kind is _FLAGS:
                columns.append([lists[i.flags | {"\\Recent"} if recent and i.uid in recent
                                      else i.flags] for i in infos])
            elif kind is _SIZE:
                columns.append([i.size for i in infos])
            elif kind is _DATE:
                columns.append([dates[i.date] for i in infos])
            else:  # _MODSEQ
                columns.append([(sel.info(i.uid) or i).modseq for i in infos])
        return b"".join([fmt % values for values in zip(*columns)])

    def _template(self) -> tuple[bytes, list]:
        """The response of one message as a format string, and what fills it (cf. _items)."""
        parts: list[bytes] = []
        kinds: list = []
        for a in self.atts:
            if a.name == b"FLAGS":
                parts.append(b"FLAGS %s")
                kinds.append(_FLAGS)
            elif a.name == b"UID":
                parts.append(b"UID %d")
                kinds.append(_UID)
            elif a.name == b"INTERNALDATE":
                parts.append(b"INTERNALDATE %s")
                kinds.append(_DATE)
            elif a.name == b"RFC822.SIZE":
                parts.append(b"RFC822.SIZE %d")
                kinds.append(_SIZE)
            else:
                parts.append(a.response_name().replace(b"%", b"%%") + b" %s")
                kinds.append(id(a))
        if self.modseq:
            parts.append(b"MODSEQ (%d)")
            kinds.append(_MODSEQ)
        return b"* %d FETCH (" + b" ".join(parts) + b")\r\n", kinds

    def _items(self, u: int, info: MessageInfo, pieces: Optional[dict[int, Piece]]) -> list[Piece]:
        """The response items of one message, in the order asked for."""
        sel = self.sel
        items: list[Piece] = []
        flags_sent = False
        for a in self.atts:
            if a.name == b"FLAGS":
                items.append(b"FLAGS " + flag_list(sel.flags(u, info)))
                flags_sent = True
            elif a.name == b"UID":
                items.append(b"UID %d" % u)
            elif a.name == b"INTERNALDATE":
                items.append(b"INTERNALDATE " + format_internaldate(info.internaldate))
            elif a.name == b"RFC822.SIZE":
                items.append(b"RFC822.SIZE %d" % info.size)
            else:
                assert pieces is not None
                items.append(a.response_name() + b" ")
                items.append(pieces[id(a)])
        if self.sets_seen and not flags_sent:
            items.append(b"FLAGS " + flag_list(sel.flags(u)))
        if self.modseq:
            items.append(b"MODSEQ (%d)" % (sel.info(u) or info).modseq)
        return items

    @defer.inlineCallbacks
    def _stream(self, fr: FileRange):
        """Send a literal of fr.length octets read from the file in chunks (no whole copy)."""
        s = self.session
        s.transport.write((b"~{%d}\r\n" if fr.binary else b"{%d}\r\n") % fr.length)
        f = yield s.io(self.sel.folder.open_message, fr.uid)
        try:
            yield s.io(f.seek, fr.offset)
            left = fr.length
            while left > 0 and not s.closed:
                data = yield s.io(f.read, min(CHUNK, left))
                if not data:
                    # The file shrank under us: pad so the literal length stays true.
                    data = b" " * min(CHUNK, left)
                left -= len(data)
                s.transport.write(data if fr.binary else binmod.nul_safe(data))
                yield s.gate.wait()
        finally:
            s.io(f.close)


def view_messages(sel: Selection, uids: list[int]) -> tuple[list[MessageInfo], Sequence[int]]:
    """The session's MessageInfo of the ascending `uids` still in the view, and their sequence
    numbers. A gap-free run of the view (FETCH 1:*) is one slice: no object per message."""
    view = sel.view
    if uids:
        k = bisect.bisect_left(view, uids[0], key=_uid)
        j = k + len(uids)
        if j <= len(view) and view[j - 1].uid == uids[-1]:
            block = view[k:j]
            if uids[-1] - uids[0] == len(uids) - 1 or [i.uid for i in block] == uids:
                return block, range(k + 1, j + 1)
    located = sel.locate(uids)
    return [info for _, _, info in located], [seq for _, seq, _ in located]


def _uid(info: MessageInfo) -> int:
    return info.uid


def batches(sel: Selection, uids: list[int], needs_file: bool, count: int = BATCH
            ) -> list[list[int]]:
    """FETCH work units: `count` messages per io call, and (bodies) at most BATCH_BYTES of
    message files, so a batch and its prefetched successor stay small in memory."""
    if not needs_file:
        step = BATCH * 25
        return [uids[i:i + step] for i in range(0, len(uids), step)]
    out: list[list[int]] = []
    current: list[int] = []
    size = 0
    for info in view_messages(sel, uids)[0]:
        if current and (len(current) >= count or size + info.size > BATCH_BYTES):
            out.append(current)
            current, size = [], 0
        current.append(info.uid)
        size += info.size
    if current:
        out.append(current)
    return out


# -- in the io pool: the items that need the message file ------------------------------------

def compute_batch(folder: Folder, uids: list[int], atts: list[FetchAtt],
                  infos: Optional[dict[int, MessageInfo]] = None) -> dict[int, dict[int, Piece]]:
    """For each message: {id(att): bytes | FileRange} for the items that need the file.
    `infos`: the session's view of the messages, which names their files' content (memo)."""
    wanted = [a for a in atts if a.name not in INDEX_ITEMS]
    if header_only(wanted):
        # Header blocks from mailsuite-cache: one file read for the batch, not one open per
        # message (docs/design/maildir.md, "Header cache").
        headers = folder.headers(uids, extract_header)
        return {u: header_pieces(h, u, wanted) for u in uids if (h := headers.get(u)) is not None}
    out: dict[int, dict[int, Piece]] = {}
    memo = folder.account.store.memo
    if infos is not None:
        uids = _from_memo(folder, uids, wanted, infos, memo, out)
    for u in uids:
        try:
            f = folder.open_message(u)
        except LockBusy:
            raise  # not a vanished message: the pool waits for the lock and runs the batch again
        except (NoSuchMessage, OSError):
            continue
        with f:
            try:
                out[u] = compute_one(f, u, atts, memo)
            except (OSError, ValueError):
                continue
    return out


@dataclass
class HeaderForm:
    """How a header-only FETCH whose other items are UID and RFC822.SIZE is formatted in the
    io pool: one format string for the item list, filled per message from the tuple (seq,
    UID, size, then the header items' values). `whole`: the only header item is a whole
    header block, whose literal is formatted in the same step (no parsing, no copy)."""

    fmt: bytes
    pick: Callable[[tuple], tuple]
    wanted: list[FetchAtt]
    whole: bool
    order: tuple[int, ...]  # what `pick` takes: its usual values are formatted without it

    @classmethod
    def of(cls, cmd: FetchCommand) -> Optional["HeaderForm"]:
        """The form for `cmd`, or None if it needs the general path (flags, dates, mod-
        sequences and \\Seen are the reactor's to read at write time)."""
        wanted = [a for a in cmd.atts if a.name not in INDEX_ITEMS]
        if (cmd.sets_seen or cmd.modseq or not header_only(wanted)
                or any(a.name not in (b"UID", b"RFC822.SIZE") for a in cmd.atts
                       if a.name in INDEX_ITEMS)):
            return None
        whole = len(wanted) == 1 and wanted[0].partial is None and (
            wanted[0].name == b"RFC822.HEADER" or wanted[0].text == b"HEADER")
        parts: list[bytes] = []
        order = [0]
        for a in cmd.atts:
            if a.name == b"UID":
                parts.append(b"UID %d")
                order.append(1)
            elif a.name == b"RFC822.SIZE":
                parts.append(b"RFC822.SIZE %d")
                order.append(2)
            elif whole:
                parts.append(a.response_name().replace(b"%", b"%%") + b" {%d}\r\n%b")
                order += [3, 4]
            else:
                parts.append(a.response_name().replace(b"%", b"%%") + b" %b")
                order.append(3 + wanted.index(a))
        fmt = b"* %d FETCH (" + b" ".join(parts) + b")\r\n"
        return cls(fmt, itemgetter(*order), wanted, whole, tuple(order))

    def batch(self, folder: Folder, infos: list[MessageInfo], seqs: Sequence[int], start: int
              ) -> tuple[int, list[Union[bytes, tuple[int, dict[int, Piece]]]]]:
        """In the io pool: the responses of the next batch from infos[start] (HEADER_BATCH
        messages, at most BATCH_BYTES of message files, as `batches`), as runs of bytes, and
        (uid, pieces) for a message the general writer must write. Returns (end, parts)."""
        end, size, n = start, 0, len(infos)
        while end < n and end - start < HEADER_BATCH:
            size += infos[end].size
            if size > BATCH_BYTES and end > start:
                break
            end += 1
        chunk = infos[start:end]
        headers = folder.headers([i.uid for i in chunk], extract_header)
        fmt, pick, wanted, whole = self.fmt, self.pick, self.wanted, self.whole
        # UID FETCH (BODY.PEEK[HEADER]) and FETCH (BODY.PEEK[HEADER]) take no `pick` call.
        uid_header, header = self.order == (0, 1, 3, 4), self.order == (0, 3, 4)
        parts: list[Union[bytes, tuple[int, dict[int, Piece]]]] = []
        lines: list[bytes] = []
        for info, seq in zip(chunk, seqs[start:end]):
            u = info.uid
            h = headers.get(u)
            if h is None:
                continue  # its file vanished (expunged elsewhere): nothing to send
            if whole and len(h) <= STREAM_THRESHOLD:
                if 0 in h:  # NUL (the int test is a memchr, several times b"\0" in h)
                    h = binmod.nul_safe(h)
                if uid_header:
                    lines.append(fmt % (seq, u, len(h), h))
                elif header:
                    lines.append(fmt % (seq, len(h), h))
                else:
                    lines.append(fmt % pick((seq, u, info.size, len(h), h)))
                continue
            pieces = header_pieces(h, u, wanted)
            values = [pieces[id(a)] for a in wanted]
            if all(isinstance(v, bytes) and not v.endswith(b" ") for v in values) and not whole:
                lines.append(fmt % pick((seq, u, info.size, *values)))
                continue
            if lines:
                parts.append(b"".join(lines))
                lines = []
            parts.append((u, pieces))
        if lines:
            parts.append(b"".join(lines))
        return end, parts


def _from_memo(folder: Folder, uids: list[int], wanted: list[FetchAtt],
               infos: dict[int, MessageInfo], memo: FileMemo,
               out: dict[int, dict[int, Piece]]) -> list[int]:
    """Fill `out` for the messages whose structures are all in the memo and whose other items
    are header items (from mailsuite-cache), without opening their files (imaptest's and
    message lists' `ENVELOPE BODYSTRUCTURE BODY.PEEK[HEADER.FIELDS (...)]`). Returns the
    UIDs left for the general path."""
    structures = [(id(a), kind) for a in wanted if (kind := _structure(a)) is not None]
    rest = [a for a in wanted if _structure(a) is None]
    if not structures or (rest and not header_only(rest)):
        return uids
    left: list[int] = []
    found: list[int] = []
    for u in uids:
        info = infos.get(u)
        if info is None:
            left.append(u)
            continue
        cid = content_id(info.path, info.size)
        pieces: dict[int, Piece] = {}
        for key, kind in structures:
            value = memo.get((cid, kind))
            if value is None:
                break
            pieces[key] = value
        else:
            out[u] = pieces
            found.append(u)
            continue
        left.append(u)
    if rest and found:
        headers = folder.headers(found, extract_header)
        for u in found:
            h = headers.get(u)
            if h is None:
                del out[u]  # its file is gone: as when it cannot be opened
            else:
                out[u].update(header_pieces(h, u, rest))
    return left


def header_only(wanted: list[FetchAtt]) -> bool:
    """Whether every item is (a part of) the top-level header block: Thunderbird's new-mail
    fetch is HEADER.FIELDS, other clients' list fetch BODY.PEEK[HEADER]."""
    return bool(wanted) and all(
        a.name == b"RFC822.HEADER" or (a.name in (b"BODY", b"BODY.PEEK") and a.section is not None
                                       and not a.path and a.text in HEADER_TEXTS) for a in wanted)


def extract_header(f: BinaryIO) -> bytes:
    """The header block of a message file, blank line included."""
    buf = read_header(f)
    return bytes(buf[:mime.header_end(buf)])


def header_pieces(header: bytes, uid: int, wanted: list[FetchAtt]) -> dict[int, Piece]:
    """The header items of one message from its header block alone."""
    out: dict[int, Piece] = {}
    root = None
    for a in wanted:
        if a.name == b"RFC822.HEADER" or a.text == b"HEADER":  # the whole block
            if a.partial is None and len(header) <= STREAM_THRESHOLD:
                out[id(a)] = b"{%d}\r\n%s" % (len(header), binmod.nul_safe(header))
            else:
                out[id(a)] = literal(header, uid, (0, len(header)), a.partial)
            continue
        if root is None:
            root = mime.Part(0, len(header), len(header),
                             mime.parse_headers(header, 0, len(header)))
        out[id(a)] = _piece(header, root, a, uid, len(header))
    return out


def _structure(a: FetchAtt) -> Optional[bytes]:
    """The name of a structure item (ENVELOPE, BODY, BODYSTRUCTURE), None for others."""
    return a.name if a.section is None and a.name in STRUCTURE_ITEMS else None


STRUCTURE_ITEMS = (b"ENVELOPE", b"BODY", b"BODYSTRUCTURE")


def compute_one(f: BinaryIO, uid: int, atts: list[FetchAtt],
                memo: Optional[FileMemo] = None) -> dict[int, Piece]:
    """The items of one message that need its file. Structures are taken from / kept in
    `memo` (docs/design/maildir.md, "Derived values of message files")."""
    size = os.fstat(f.fileno()).st_size
    wanted = [a for a in atts if a.name not in INDEX_ITEMS]
    cid = content_id(f.name, size) if memo is not None and isinstance(f.name, str) else None
    if cid is None:
        return _compute_items(f, uid, wanted, size)
    out: dict[int, Piece] = {}
    rest = []
    for a in wanted:
        kind = _structure(a)
        value = memo.get((cid, kind)) if kind is not None else None
        if value is not None:
            out[id(a)] = value
        else:
            rest.append(a)
    if rest:
        computed = _compute_items(f, uid, rest, size)
        out.update(computed)
        for a in rest:
            kind = _structure(a)
            value = computed[id(a)]
            if kind is not None and isinstance(value, bytes):
                memo.put((cid, kind), value)
    return out


def _compute_items(f: BinaryIO, uid: int, wanted: list[FetchAtt], size: int
                   ) -> dict[int, Piece]:
    only_header = header_only(wanted)
    need_tree = any(a.name in (b"ENVELOPE", b"BODY", b"BODYSTRUCTURE", b"RFC822.TEXT") and a.section is None
                    or (a.section is not None and a.path) for a in wanted)
    mapped = None
    buf: Union[bytes, mmap.mmap]
    if only_header:
        buf = read_header(f)
    elif size > 4 * 1024 * 1024:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = mapped
    else:
        buf = f.read()
    try:
        if need_tree:
            root = mime.parse(buf)
        else:
            hend = mime.header_end(buf)
            root = mime.Part(0, hend, len(buf), mime.parse_headers(buf, 0, hend))
        return {id(a): _piece(buf, root, a, uid, size) for a in wanted}
    finally:
        if mapped is not None:
            mapped.close()


def _piece(buf: Union[bytes, mmap.mmap], root: mime.Part, a: FetchAtt, uid: int, size: int) -> Piece:
    """One item's value: a structure, or a section's literal (headers are served from the raw
    bytes, never rebuilt: docs/design/imap.md, "Headers from raw bytes")."""
    if a.name.startswith(b"BINARY"):
        return _binary_piece(buf, root, a, uid, size)
    if a.name == b"ENVELOPE":
        return mime.serialize(mime.envelope(buf, root))
    if a.name == b"BODYSTRUCTURE" or (a.name == b"BODY" and a.section is None):
        return mime.serialize(mime.bodystructure(buf, root, a.name == b"BODYSTRUCTURE"))
    rng: Union[bytes, tuple[int, int]]
    if a.name == b"RFC822" or (a.section is not None and not a.path and a.text is None):
        rng = (0, size)
    elif a.name == b"RFC822.HEADER":
        rng = (0, root.body_start)
    elif a.name == b"RFC822.TEXT" or (a.text == b"TEXT" and not a.path):
        rng = (root.body_start, size - root.body_start)
    else:
        try:
            rng = mime.section(buf, root, a.path, a.text, a.fields)
        except mime.NoSuchPart:
            rng = b""  # RFC 3501 §6.4.5: a part that does not exist is an empty string
    return literal(buf, uid, rng, a.partial)


def literal(buf: Union[bytes, mmap.mmap], uid: int, rng: Union[bytes, tuple[int, int]],
            partial: Optional[tuple[int, int]]) -> Piece:
    """The literal for a section, sliced to <origin.octets> (RFC 3501 §6.4.5;
    docs/design/imap.md, "Partial FETCH")."""
    if isinstance(rng, bytes):
        data = rng
        if partial:
            o, n = partial
            data = data[o:o + n]
        data = binmod.nul_safe(data)
        return b"{%d}\r\n" % len(data) + data
    offset, length = rng
    if partial:
        o, n = partial
        if o >= length:
            return b'""'  # RFC 3501 §6.4.5: origin past the end gives an empty string
        offset, length = offset + o, min(n, length - o)
    if length > STREAM_THRESHOLD:
        return FileRange(uid, offset, length)
    data = bytes(buf[offset:offset + length])
    if len(data) < length:  # only the header block was read: fall back to streaming
        return FileRange(uid, offset, length)
    data = binmod.nul_safe(data)
    return b"{%d}\r\n" % len(data) + data


def _binary_piece(buf: Union[bytes, mmap.mmap], root: mime.Part, a: FetchAtt, uid: int,
                  size: int) -> Piece:
    """BINARY[part]<o.n> or BINARY.SIZE[part] (RFC 3516; binary.py)."""
    decoded = binmod.content(buf, root, a, size)
    if a.name == b"BINARY.SIZE":
        return b"%d" % (decoded[1] if isinstance(decoded, tuple) else len(decoded))
    if isinstance(decoded, bytes):
        data = decoded
        if a.partial:
            o, n = a.partial
            data = data[o:o + n]
        return binmod.literal8(data)
    offset, length = decoded
    if a.partial:
        o, n = a.partial
        if o >= length:
            return b'""'
        offset, length = offset + o, min(n, length - o)
    if length > STREAM_THRESHOLD:
        return FileRange(uid, offset, length, binary=True)
    data = bytes(buf[offset:offset + length])
    if len(data) < length:
        return FileRange(uid, offset, length, binary=True)
    return binmod.literal8(data)


def read_header(f: BinaryIO) -> bytes:
    """Read up to and including the blank line that ends the header block."""
    buf = b""
    while True:
        chunk = f.read(16384)
        if not chunk:
            return buf
        start = max(0, len(buf) - 3)
        buf += chunk
        if mime._HEADER_END.search(buf, start) or buf.startswith(b"\r\n") or buf.startswith(b"\n"):
            return buf
        if len(buf) > 8 * 1024 * 1024:
            return buf

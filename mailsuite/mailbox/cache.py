"""`mailsuite-cache`: each message's header block, kept per folder so a header FETCH over a large
folder reads one file instead of opening every message (docs/design/maildir.md, "Header cache").

The file is append-only, records in ascending UID order, each checked by a CRC-32 and validated
against the message it claims to describe (UID, Maildir key, size) and the folder's UIDVALIDITY.
A record that does not match is ignored; a corrupt tail is cut off before the next append; a
file with another UIDVALIDITY or an unknown header is rewritten. It is a cache: losing it costs
speed, never correctness. Blocking: runs in the io pool.
"""
from __future__ import annotations

import bisect
import mmap
import os
import struct
import threading
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Protocol

CACHE = "mailsuite-cache"
MAGIC = b"mailsuite-cache 1\n"
_HEAD = struct.Struct("<I")  # UIDVALIDITY, after MAGIC
_REC = struct.Struct("<IQHI")  # uid, message size, key length, header length
_CRC = struct.Struct("<I")
HEADER_START = len(MAGIC) + _HEAD.size
MAX_HEADER = 64 * 1024  # larger header blocks are read from the message file each time
MARK_EVERY = 256  # records between two remembered (uid, offset) marks


class Described(Protocol):
    uid: int
    key: str
    size: int


@dataclass
class HeaderCache:
    """This process's knowledge of one folder's cache file. Every method takes `lock`."""

    path: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    stamp: tuple | None = None  # (inode, size) of the file as we last knew it
    uidvalidity: int = 0
    end: int = 0  # offset just past the last valid record
    last_uid: int = 0
    records: int = 0
    marks: list[tuple[int, int]] = field(default_factory=list)  # (uid, offset), ascending

    # -- reading --------------------------------------------------------------------------
    def headers(self, infos: list[Described], uidvalidity: int) -> dict[int, bytes]:
        """uid -> header block for the messages (ascending UIDs) the file holds valid records
        of. Never raises for a missing, short or corrupt file: those records are just absent."""
        if not infos:
            return {}
        with self.lock:
            try:
                with open(self.path, "rb") as f:
                    self._refresh(f, uidvalidity)
                    if self.uidvalidity != uidvalidity or self.end <= HEADER_START:
                        return {}
                    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                        return self._lookup(m, infos)
            except (OSError, ValueError):
                return {}

    def _lookup(self, m: mmap.mmap, infos: list[Described]) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        i = bisect.bisect_right(self.marks, (infos[0].uid, 1 << 62)) - 1
        pos = self.marks[i][1] if i >= 0 else HEADER_START
        end = min(self.end, len(m))
        unpack, crc_at, crc32, head = _REC.unpack_from, _CRC.unpack_from, zlib.crc32, _REC.size
        k, n = 0, len(infos)
        info = infos[0]
        want = info.uid
        while pos < end:
            uid, size, klen, hlen = unpack(m, pos)
            body = pos + head + klen
            stop = body + hlen
            if uid == want:
                if (size == info.size and crc32(m[pos:stop]) == crc_at(m, stop)[0]
                        and m[pos + head:body] == info.key.encode("utf-8", "surrogateescape")):
                    out[uid] = m[body:stop]
                k += 1
                if k == n:
                    break
                info = infos[k]
                want = info.uid
            elif uid > want:  # messages the file has no record of: skip them
                while k < n and infos[k].uid < uid:
                    k += 1
                if k == n:
                    break
                info = infos[k]
                want = info.uid
                if want == uid:
                    continue  # this record is the next one asked for
            pos = stop + _CRC.size
        return out

    def _refresh(self, f, uidvalidity: int) -> None:
        """Re-scan the file if it is not the one we know (another process, a rewrite)."""
        st = os.fstat(f.fileno())
        stamp = (st.st_ino, st.st_size)
        if stamp == self.stamp:
            return
        self.stamp = stamp
        self.uidvalidity, self.end, self.last_uid, self.records, self.marks = 0, 0, 0, 0, []
        head = f.read(HEADER_START)
        if len(head) < HEADER_START or not head.startswith(MAGIC):
            return
        self.uidvalidity = _HEAD.unpack_from(head, len(MAGIC))[0]
        if st.st_size <= HEADER_START:
            self.end = HEADER_START
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            self._scan(m, HEADER_START)

    def _scan(self, m: mmap.mmap, pos: int) -> None:
        """Walk the records from `pos`, checking each, up to the first invalid one."""
        size, rec, crc = len(m), _REC, _CRC
        last = self.last_uid
        while pos + rec.size <= size:
            uid, _, klen, hlen = rec.unpack_from(m, pos)
            stop = pos + rec.size + klen + hlen
            if (stop + crc.size > size or uid <= last
                    or zlib.crc32(m[pos:stop]) != crc.unpack_from(m, stop)[0]):
                break  # a torn or corrupt tail: cut off at the next append
            if self.records % MARK_EVERY == 0:
                self.marks.append((uid, pos))
            self.records += 1
            last = uid
            pos = stop + crc.size
        self.last_uid = last
        self.end = pos

    # -- writing --------------------------------------------------------------------------
    def add(self, entries: Iterable[tuple[Described, bytes]], uidvalidity: int,
            live: Mapping[int, Described]) -> None:
        """Append records for messages above the last cached UID (ascending). `live`: the
        folder's messages by UID; a file mostly of expunged messages' records is compacted."""
        with self.lock:
            try:
                self._add(entries, uidvalidity, live)
            except OSError:
                self.stamp = None  # re-read next time; the cache only costs speed

    def _add(self, entries: Iterable[tuple[Described, bytes]], uidvalidity: int,
             live: Mapping[int, Described]) -> None:
        try:
            with open(self.path, "rb") as f:
                self._refresh(f, uidvalidity)
        except FileNotFoundError:
            self.stamp = None
            self.uidvalidity = 0
        rewrite = self.uidvalidity != uidvalidity or self.end < HEADER_START
        kept = bytearray()
        if rewrite:
            self.records, self.marks, self.last_uid = 0, [], 0
        elif self.records > 2 * len(live) + 1000:
            kept = self._live_records(live)
            rewrite = True
        last = self.last_uid
        base = HEADER_START + len(kept) if rewrite else self.end
        out = bytearray()
        for info, header in entries:
            if info.uid <= last or len(header) > MAX_HEADER:
                continue
            key = info.key.encode("utf-8", "surrogateescape")
            if len(key) > 0xFFFF:
                continue
            start = len(out)
            out += _REC.pack(info.uid, info.size, len(key), len(header))
            out += key
            out += header
            out += _CRC.pack(zlib.crc32(memoryview(out)[start:]))
            if self.records % MARK_EVERY == 0:
                self.marks.append((info.uid, base + start))
            self.records += 1
            last = info.uid
        if not out and not rewrite:
            return
        if rewrite:
            # A new file, renamed into place (readers never see half a header).
            tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as w:
                w.write(MAGIC + _HEAD.pack(uidvalidity) + kept + out)
            os.rename(tmp, self.path)
        else:
            fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW)
            try:
                if os.fstat(fd).st_size != self.end:
                    os.ftruncate(fd, self.end)  # drop a corrupt tail before appending
                os.lseek(fd, self.end, os.SEEK_SET)
                os.write(fd, out)
            finally:
                os.close(fd)
        self.uidvalidity = uidvalidity
        self.end = base + len(out)
        self.last_uid = last
        st = os.stat(self.path)
        self.stamp = (st.st_ino, st.st_size)

    def _live_records(self, live: Mapping[int, Described]) -> bytearray:
        """The valid records of messages still in the folder, renumbering the marks for a
        file that starts with them."""
        out = bytearray()
        self.records, self.marks, self.last_uid = 0, [], 0
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            pos, end = HEADER_START, min(self.end, len(m))
            while pos < end:
                uid, size, klen, hlen = _REC.unpack_from(m, pos)
                keyend = pos + _REC.size + klen
                stop = keyend + hlen + _CRC.size
                info = live.get(uid)
                if (info is not None and info.size == size
                        and m[pos + _REC.size:keyend].decode("utf-8", "surrogateescape")
                        == info.key):
                    if self.records % MARK_EVERY == 0:
                        self.marks.append((uid, HEADER_START + len(out)))
                    out += m[pos:stop]
                    self.records += 1
                    self.last_uid = uid
                pos = stop
        return out


def message_headers(cache: HeaderCache, infos: list[Described], uidvalidity: int,
                    live: Mapping[int, Described], read: "ReadHeader") -> dict[int, bytes]:
    """uid -> header block of each message: from the cache, else read from its file by
    `read(uid)` (None: the message is gone) and added to the cache."""
    found = cache.headers(infos, uidvalidity)
    if len(found) == len(infos):
        return found  # all cached (found holds only UIDs of `infos`)
    fresh: list[tuple[Described, bytes]] = []
    for info in infos:
        if info.uid in found:
            continue
        header = read(info.uid)
        if header is None:
            continue
        found[info.uid] = header
        fresh.append((info, header))
    if fresh:
        cache.add(fresh, uidvalidity, live)
    return found


class ReadHeader(Protocol):
    def __call__(self, uid: int) -> bytes | None: ...

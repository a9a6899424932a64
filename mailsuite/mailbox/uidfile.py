"""`dovecot-uidlist` as one process holds it (docs/design/maildir.md, "Dovecot's files" and
"UIDs of moved files"): read without the dotlock, appended lines only where it can; UIDs given
and written under the dotlock; forgotten lines gathered until a rewrite is worth it. The folder
state (index.py) owns one and holds the folder lock around every call; everything here is
blocking and runs in the io pool.
"""
from __future__ import annotations

import contextlib
import itertools
import os
from typing import Iterator, Literal, Union

from mailsuite.mailbox.dotlock import DotLock, LockRules
from mailsuite.mailbox.maildir import UIDLIST, UidList, file_stamp
from mailsuite.safeio import atomic_write, open_append

# Lines of forgotten UIDs dovecot-uidlist gathers before it is rewritten (and at least a quarter
# as many as live ones: a rewrite costs a line per message).
UIDLIST_SLACK = 256

# What a read found: nothing new (False), a rewrite read whole ("full"), or the keys of the
# lines appended since the last read.
Reload = Union[Literal[False], Literal["full"], set]


class UidFile:
    """The UID list of one folder: `list` (None before the first read, or when the file is
    missing or corrupt), `stamp` (inode, size read up to, mtime_ns), and the changes not yet
    written (`unwritten`: whole file?, first UID, keys)."""

    def __init__(self, folder_path: str, rules: LockRules):
        self.folder_path = folder_path
        self.path = os.path.join(folder_path, UIDLIST)
        self.rules = rules  # when another's dotlock is stale (dotlock.py)
        self.list: UidList | None = None
        self.stamp: tuple | None = None
        self.stale = 0  # lines of forgotten UIDs still in the file
        self.depth = 0  # of hold()
        self.unwritten: tuple[bool, int, list[str]] | None = None

    def forget(self) -> None:
        """Drop what is in memory (UIDs given that may not be on disk: another process could
        give them to other keys); the next read takes the whole file."""
        self.unwritten = None
        self.list = None
        self.stamp = None

    def reload(self) -> Reload:
        """False if unchanged; "full" if re-read; else the set of keys appended since.

        Without the dotlock another process may be appending while we read, and a reader can
        see part of an append (the first page of a write that crosses a page boundary). So
        a lockless read takes only complete lines, and the size kept in `stamp` is where they
        end: the next read starts at a line boundary, never inside a record (a half line read
        as a whole one would give a key a wrong UID, or leave it without one and get it a
        second UID)."""
        path = self.path
        stamp = file_stamp(path)
        old = self.stamp
        if stamp == old and self.list is not None:
            return False
        locked = self.depth > 0  # then no append is in progress
        if (stamp is not None and old is not None and self.list is not None
                and stamp[0] == old[0] and stamp[1] > old[1]):
            # Same file, grown: only lines were appended (a rewrite is a rename: new inode).
            try:
                with open(path, "rb") as f:
                    # Rewritten (renamed over) between the stat and the open: the offset
                    # means nothing in the new file, read it whole.
                    same = os.fstat(f.fileno()).st_ino == stamp[0]
                    f.seek(old[1])
                    tail = f.read()
                if same and (not locked or tail.endswith(b"\n")):
                    tail = _complete_lines(tail, locked)
                    self.stamp = (stamp[0], old[1] + len(tail), stamp[2])
                    return self.list.add_lines(tail)
            except OSError:
                pass
        self.stale = 0  # a rewrite by another process: its stale lines are unknown
        self.stamp = stamp
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            self.list = None
            return "full"
        data = _complete_lines(data, locked)
        # The stamp of the file read (it may have been replaced since the stat above).
        self.stamp = (st.st_ino, len(data), st.st_mtime_ns)
        try:
            self.list = UidList.parse(data) if data.strip() else None
        except (ValueError, IndexError):
            self.list = None  # corrupt: rebuilt with a new UIDVALIDITY
        return "full"

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """The dotlock of the file (re-entrant), so our processes and Dovecot exclude each
        other. The caller holds the folder's in-process lock."""
        if self.depth:
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
            return
        with DotLock(self.path, self.rules):
            self.depth = 1
            try:
                yield
            finally:
                self.depth = 0

    def assign(self, keys: list[str]) -> tuple[list[int], Reload]:
        """Under hold(), after `write()`: the UID of each key, new keys numbered from the next
        UID on, in memory (`write` puts them on disk); and what the read before it found."""
        # Re-read under the lock: another process may have assigned UIDs since.
        reload = self.reload()
        ul = self.list
        fresh = ul is None
        if fresh:
            ul = UidList.new()
        result = []
        added = []  # keys given the consecutive UIDs from `first` on
        known, first = ul.uids, ul.nextuid
        for key in keys:
            uid = known.get(key)
            if uid is None:
                uid = known[key] = first + len(added)
                added.append(key)
            result.append(uid)
        ul.nextuid = first + len(added)
        self.list = ul
        if fresh or added:
            self.unwritten = (fresh, first, added)
        return result, reload

    def write(self) -> None:
        """Under hold(): write what `assign` gave: the whole file when it is new, else the new
        lines appended, as Dovecot does (readers take max(N, last UID + 1) as next UID). On
        failure, what is in memory is forgotten and the error raised."""
        if self.unwritten is None:
            return
        fresh, first, added = self.unwritten
        self.unwritten = None
        path = self.path
        try:
            if fresh:
                atomic_write(path, self.list.serialize())
            else:
                with open_append(path, "ab+") as f:
                    if f.tell() > 0:
                        f.seek(-1, os.SEEK_END)
                        if f.read(1) != b"\n":
                            f.write(b"\n")  # another tool left the last line unterminated
                    f.write("".join(f"{u} :{k}\n" for u, k in zip(itertools.count(first), added))
                            .encode("utf-8", "surrogateescape"))
                    f.flush()
                    os.fsync(f.fileno())
        except BaseException:
            self.forget()
            raise
        self.stamp = file_stamp(path)

    def drop(self, uids: set[int]) -> Reload:
        """Under hold(): forget the lines of `uids` (never reused: N<nextuid> stays). The file
        keeps them until enough have gathered to be worth a rewrite, as Dovecot does."""
        reload = self.reload()
        ul = self.list
        if ul is not None:
            for k in [k for k, u in ul.uids.items() if u in uids]:
                del ul.uids[k]
                ul.extra.pop(k, None)
                self.stale += 1
            if self.stale >= UIDLIST_SLACK and self.stale * 4 >= len(ul.uids):
                self.compact()
        return reload

    def compact(self) -> None:
        """Under hold(): rewrite the file without the lines of forgotten UIDs. While rewriting
        anyway, lines whose file is gone (deleted by another tool) go too: if such a file came
        back it must get a new UID, not its old one. Safe under the lock: every writer renames
        its file into place before it registers the UID."""
        ul = self.list
        if ul is None:
            return
        present = set()
        for sub in ("new", "cur"):
            present.update(n.split(":", 1)[0]
                           for n in os.listdir(os.path.join(self.folder_path, sub)))
        for k in [k for k in ul.uids if k not in present]:
            del ul.uids[k]
            ul.extra.pop(k, None)
        atomic_write(self.path, ul.serialize())
        self.stamp = file_stamp(self.path)
        self.stale = 0


def _complete_lines(data: bytes, locked: bool) -> bytes:
    """What of dovecot-uidlist's bytes a reader may take: all of them under the dotlock (no
    append is in progress), else up to the end of the last complete line."""
    return data if locked else data[:data.rfind(b"\n") + 1]

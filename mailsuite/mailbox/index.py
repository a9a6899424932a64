"""What one process knows about one folder: its messages, UIDs, flags and keyword table, kept in
memory and in the per-folder `mailsuite-index` beside Dovecot's `dovecot-uidlist` and
`dovecot-keywords` (docs/design/maildir.md). Shared by every `Folder` of the folder (one per
session) through `MailStore`; everything here is blocking and runs in the io pool.
"""
from __future__ import annotations

import os
import sys
import contextlib
import threading
import weakref
import time
from typing import Iterable, Iterator

from mailsuite.mailbox.cache import CACHE, HeaderCache
from mailsuite.mailbox.dotlock import DEFAULT_RULES, DotLock, LockRules
from mailsuite.mailbox.errors import LockBusy, NoSuchFolder
from mailsuite.mailbox.gcpause import collector_paused
from mailsuite.mailbox.info import UNDATED, MessageInfo, index_lines  # noqa: F401 (public)
from mailsuite.mailbox.modseq import ModSeqLog
from mailsuite.mailbox.uidfile import UidFile
from mailsuite.mailbox.moves import Moves, cur_name
from mailsuite.mailbox.maildir import (
    KEYWORDS, MAX_KEYWORDS, INDEX, UidList, file_stamp, in_delivery_order,
    letters_to_flags, read_keywords, size_from_key, write_keywords,
)
from mailsuite.safeio import atomic_write, open_append


# Estimated memory of a folder state per message: its MessageInfo with key and name strings,
# its entries in the UID list, file, meta and mod-sequence dicts (bench/mailbox_sync.py measured
# ~870 bytes at 30k messages), and a fixed part per folder.
MESSAGE_BYTES = 900
STATE_BYTES = 16 * 1024


# How long a pool thread may wait for a folder's in-process lock before it gives the thread back
# and the caller waits on the reactor instead (waits.py; docs/design/maildir.md, "The dotlock").
FOLDER_LOCK_SPIN = 0.05


class FolderLock:
    """The in-process lock of one folder state: re-entrant; `with` waits at most
    FOLDER_LOCK_SPIN, then raises LockBusy (a holder may be busy for long: a sync of a large
    folder, fsyncs on a slow disk). `acquire` keeps threading's semantics."""

    def __init__(self, path: str, spin: float = FOLDER_LOCK_SPIN):
        self.path = path
        self.spin = spin
        self._lock = threading.RLock()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> "FolderLock":
        if not self._lock.acquire(timeout=self.spin):
            raise LockBusy(self.path, "another session of this process")
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class FolderIndex:
    """What this process knows about one folder, shared by all its Folder objects.

    sync() of an unchanged folder costs a stat of new/, cur/, dovecot-uidlist and
    dovecot-keywords. A changed folder lists only the changed directory, stats only files it
    has never seen, and appends to dovecot-uidlist (as Dovecot does) instead of rewriting it.
    Sizes and INTERNALDATEs are kept in `mailsuite-index` (append-only, compacted now and then)
    so a fresh process does not stat every file either."""

    def __init__(self, path: str, rules: LockRules = DEFAULT_RULES):
        self.path = path
        self.lock = FolderLock(path)
        self.rules = rules  # when another's dotlock is stale (dotlock.py)
        # dovecot-uidlist (uidfile.py); UIDs `register` gives are written before the dotlock
        # is let go (`_write_registered`).
        self.uid_file = UidFile(path, rules)
        self.keywords: list[str] = []
        self.keywords_stamp: tuple | None = None
        self.files: dict[str, str] = {}  # key -> file name in cur/
        self.cur_mtime: int | None = None
        self.new_mtime: int | None = None
        # file_stamp()s of new/ and cur/ as the last sync stat()ed them, before listing them:
        # with uidlist_stamp and keywords_stamp, the state token of what that sync saw
        # (Folder.synced_state).
        self.dir_stamps: tuple = (None, None)
        self.meta: dict[str, tuple[int, float]] = {}  # key -> (size, internaldate)
        self.meta_loaded = False
        self.meta_pending: list[str] = []  # keys whose meta is not in mailsuite-index yet
        self.meta_lines = 0
        self.infos: dict[int, MessageInfo] = {}
        self.snapshot: list[MessageInfo] | None = None
        self.synced = False
        self.unclaimed_recent: set[int] = set()
        # Expunged messages that selected sessions still show (store.py, Folder._hold;
        # docs/design/imap.md, "Expunged messages stay readable until announced").
        self.viewers: "weakref.WeakSet" = weakref.WeakSet()  # selected Folders
        self.users: "weakref.WeakSet" = weakref.WeakSet()  # every live Folder of this folder
        self.held: dict[int, list] = {}  # uid -> [path in tmp/, pins]
        self.releases: list[int] = []  # pins given back (any thread, no lock); see drain_held
        self.held_swept = False  # leftovers of an earlier process removed from tmp/
        self.generation = 0
        self.cur_prefix = os.path.join(path, "cur", "")
        self.flag_cache: dict[str, frozenset] = {}  # info letters -> IMAP flags
        # RFC 7162 mod-sequences (docs/design/maildir.md, "Mod-sequences"): the UIDs whose
        # flags or presence may have changed since the log was last brought up to date
        # (None: all of them).
        self.modseqs = ModSeqLog(path, rules)
        self.header_cache = HeaderCache(os.path.join(path, CACHE))  # cache.py
        self.mod_dirty: set[int] | None = None
        self.unseen = False  # infos built by the running sync, not handed out yet

    def in_use(self) -> bool:
        """Whether a live Folder uses this state (iterating skips Folders being finalized)."""
        return any(True for _ in self.users)

    def memory_estimate(self) -> int:
        """Bytes this state holds, estimated from its message count (docs/design/maildir.md,
        "Folder states in memory")."""
        return STATE_BYTES + MESSAGE_BYTES * (len(self.infos) + len(self.meta))

    # -- the sync algorithm -----------------------------------------------------------------
    def sync(self) -> None:
        try:
            if self.synced:
                self._sync()
            else:
                with collector_paused():  # a full sync: one record per message (gcpause.py)
                    self._sync()
        except BaseException:
            # Half a sync (e.g. files moved to cur/ and listed, but dovecot-uidlist locked):
            # forget the directory mtimes and rebuild fully next time, so the files it listed
            # are not taken for known ones and still get their UIDs.
            self.synced = False
            self.invalidate()
            if self.uid_file.unwritten is not None:
                # UIDs given in memory but never written: read dovecot-uidlist afresh.
                self.uid_file.forget()
            raise

    def _sync(self) -> None:
        path = self.path
        new_dir = os.path.join(path, "new")
        cur_dir = os.path.join(path, "cur")
        try:
            st_new = os.stat(new_dir)
            st_cur = os.stat(cur_dir)
        except FileNotFoundError:
            raise NoSuchFolder("folder was deleted")
        self.dir_stamps = ((st_new.st_ino, st_new.st_size, st_new.st_mtime_ns),
                           (st_cur.st_ino, st_cur.st_size, st_cur.st_mtime_ns))
        now_ns = time.time_ns()
        full = not self.synced
        touched: set[str] = set()  # keys added or renamed (flag change) in cur/
        removed: set[str] = set()
        if st_cur.st_mtime_ns != self.cur_mtime:
            if full:
                self.files = _list_cur(cur_dir)  # a full sync looks at every file anyway
            else:
                touched, removed = self._relist_cur(cur_dir)
            # A directory changed within the last second may change again within the same
            # mtime tick: do not trust the cached mtime until it has settled.
            self.cur_mtime = st_cur.st_mtime_ns if now_ns - st_cur.st_mtime_ns > 1e9 else None
        recent_new: list[str] = []
        moves = None
        if st_new.st_mtime_ns != self.new_mtime:
            # Listed before the moves, the moved names added by the move itself: cur/ is not
            # listed twice (docs/design/maildir.md, "Syncing a folder").
            recent_new, moves = self._move_new_to_cur(new_dir, cur_dir, self.files)
            self.new_mtime = st_new.st_mtime_ns if now_ns - st_new.st_mtime_ns > 1e9 else None
            if recent_new:
                self.cur_mtime = None  # changed by us, maybe by others meanwhile: list it again
            if moves.proc is None:
                # A file gets its UID only once it is in cur/ (docs/design/maildir.md, "UIDs
                # of moved files"): a few renames are done here, before any UID is given.
                self._moves_done(moves, recent_new)
                moves = None
        if moves is None:
            self._sync_rest(full, touched, removed, recent_new, None)
            return
        # Many renames run in a helper beside the work below; the dotlock is held until they
        # are done, and the UIDs given meanwhile are written only then.
        try:
            with self.hold_uidlist():
                self._sync_rest(full, touched, removed, recent_new, moves)
                self._write_registered()
        finally:
            moves.close()  # done by _sync_rest unless the dotlock was busy

    def _sync_rest(self, full: bool, touched: set[str], removed: set[str],
                   recent_new: list[str], moves: Moves | None) -> None:
        try:
            touched.update(recent_new)
            reload = self.uid_file.reload()
            if reload == "full":
                full = True
            elif reload:
                touched |= reload  # keys another process gave UIDs to
            if self._reload_keywords():
                full = True
            uids = self.uidlist.uids if self.uidlist else {}
            candidates = self.files if full else touched
            unknown = [k for k in candidates if k not in uids]
            if unknown or self.uidlist is None:
                self.register(in_delivery_order(unknown), defer=moves is not None)
                uids = self.uidlist.uids
            if full:
                self._rebuild_all()
            elif touched or removed:
                self._update(touched, removed)
            if self.meta_pending:
                self._save_meta()
            try:
                self.reconcile_modseqs()
            except LockBusy:
                # Another process is appending to the log: a listing without the mod-sequences
                # would show MODSEQ 0; the caller waits for the lock and syncs again (waits.py).
                raise
            except OSError:
                pass  # the folder stays readable; CONDSTORE callers ask again and see the error
            finally:
                self.unseen = False
        finally:
            if moves is not None:
                # The renames ran beside the work above; nobody has seen its result yet.
                self._moves_done(moves, recent_new)
        infos = self.infos
        self.unclaimed_recent.update(
            uid for key in recent_new if (uid := uids.get(key)) is not None and uid in infos)
        self.synced = True

    def _relist_cur(self, cur_dir: str) -> tuple[set[str], set[str]]:
        """List cur/ into `files`; returns (keys added or renamed, keys gone). A busy folder's
        cur/ is listed at nearly every sync (its mtime has not settled), so the listing is
        compared with the names we know as sets, and only the names that differ are parsed."""
        listed = set(os.listdir(cur_dir))
        files = self.files
        known = set(files.values())
        intern = sys.intern  # one string per key, shared with dovecot-uidlist's dict
        touched: set[str] = set()
        removed: set[str] = set()
        for n in known - listed:
            key = n.split(":", 1)[0]
            if files.get(key) == n:
                del files[key]
                removed.add(key)
        for n in listed - known:
            if n[0] != ".":
                key = intern(n.split(":", 1)[0])
                files[key] = n
                touched.add(key)
        return touched, removed - touched

    def messages(self) -> list[MessageInfo]:
        """The current list (shared: callers must not modify it)."""
        if self.snapshot is None:
            self.snapshot = list(self.infos.values())
        return self.snapshot

    def _move_new_to_cur(self, new_dir: str, cur_dir: str, files: dict[str, str]
                         ) -> tuple[list[str], Moves]:
        """Maildir: a reader moves new/ mail to cur/ with an empty info (':2,'). Lists new/,
        starts the renames (moves.py; the caller finishes them with `_moves_done`) and adds
        each name to `files` (key -> name in cur/) as if moved. Only a name without `,S=` is
        stat()ed, before its move (for its size, by directory descriptor); the others are dated
        on demand (docs/design/maildir.md, "Syncing a folder", "Dates on demand")."""
        meta, pending = self.meta, self.meta_pending
        nfd = os.open(new_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            cfd = os.open(cur_dir, os.O_RDONLY | os.O_DIRECTORY)
        except BaseException:
            os.close(nfd)
            raise
        moves = Moves(nfd, cfd, [])
        try:
            names = moves.names = [n for n in os.listdir(nfd) if n[0] != "."]
            for name in [n for n in names if ",S=" not in n]:
                key = name.partition(":")[0]
                if ",S=" in key or key in meta:
                    continue
                try:
                    st = os.stat(name, dir_fd=nfd)
                except FileNotFoundError:
                    continue  # moved by another process: its move reports it gone
                size = size_from_key(key)
                meta[key] = (size if size is not None else st.st_size, st.st_mtime)
                pending.append(key)
            moves.start()
            moved: list[str] = []
            intern = sys.intern  # one string per key, shared with dovecot-uidlist's dict
            for name in names:
                if ":" in name:
                    key, target = cur_name(name)
                    key = intern(key)
                else:
                    key, target = intern(name), name + ":2,"
                files[key] = target
                moved.append(key)
        except BaseException:
            moves.close()
            raise
        return moved, moves

    def _moves_done(self, moves: Moves, moved: list[str]) -> None:
        """Wait for the renames `_move_new_to_cur` started; forget the files another process
        moved or deleted first (the next sync lists cur/ again and finds them there)."""
        try:
            gone = moves.wait()
        finally:
            moves.close()
        if not gone:
            return
        lost = {moved[i] for i in gone}
        moved[:] = [k for k in moved if k not in lost]
        files, infos = self.files, self.infos
        uids = self.uidlist.uids if self.uidlist else {}
        for key in lost:
            files.pop(key, None)
            uid = uids.get(key)
            info = infos.get(uid) if uid is not None else None
            if info is not None and info.key == key:
                del infos[uid]
        self._changed()

    def _make_info(self, uid: int, key: str, name: str) -> MessageInfo | None:
        meta = self._meta_for(key)
        if meta is None:
            size = size_from_key(key)
            if size is not None:
                meta = (size, UNDATED)
            else:
                meta = self._stat_meta(key, self.cur_prefix + name)
            if meta is None:
                return None
        letters = name.partition(":2,")[2]
        flags = self.flag_cache.get(letters)
        if flags is None:
            flags = self.flag_cache[letters] = letters_to_flags(letters, self.keywords)
        return MessageInfo(uid, key, flags, meta[0], meta[1], name, self.cur_prefix,
                           self.modseqs.modseq.get(uid, 0))

    def _meta_for(self, key: str) -> tuple[int, float] | None:
        """(size, internaldate) from the index, or from the message we already list."""
        meta = self.meta.get(key)
        if meta is not None:
            return meta
        uid = self.uidlist.uids.get(key) if self.uidlist else None
        info = self.infos.get(uid) if uid is not None else None
        if info is not None and info.key == key:
            return (info.size, info.date)
        return None

    def _rebuild_all(self) -> None:
        uids = self.uidlist.uids if self.uidlist else {}
        self._load_meta()
        files = self.files
        infos: dict[int, MessageInfo] = {}
        old = self.infos
        # _make_info inlined for the common case (size and date known): this loop runs once
        # per message of a folder opened for the first time.
        meta, flag_cache, prefix = self.meta, self.flag_cache, self.cur_prefix
        modseq = self.modseqs.modseq
        keys = [k for k in files if k in uids]
        keys.sort(key=uids.__getitem__)  # UIDs are unique: UID order
        for key in keys:
            uid = uids[key]
            name = files[key]
            prev = old.get(uid) if old else None
            if prev is not None and prev.key == key:
                if prev.name == name:
                    infos[uid] = prev
                    continue
                # Renamed (its flags changed): its size and date are the same facts. Read
                # again, the date could no longer be known once another process expunges it.
                m = (prev.size, prev.date)
            else:
                m = meta.get(key) if meta else None
            if m is not None:
                size, date = m
            else:
                size, date = size_from_key(key), UNDATED
            flags = flag_cache.get(name.partition(":2,")[2])
            if size is None or flags is None:
                info = self._make_info(uid, key, name)
                if info is not None:
                    infos[uid] = info
                continue
            infos[uid] = MessageInfo(uid, key, flags, size, date, name, prefix,
                                     modseq.get(uid, 0))
        self.infos = infos
        self.mod_dirty = None
        # Nobody holds these objects yet (built under the lock of this sync): the mod-sequences
        # may be filled in place instead of copying every MessageInfo (reconcile_modseqs).
        self.unseen = not old
        self._changed()
        if not self.meta_pending:
            self._drop_listed_meta()

    def _update(self, touched: set[str], removed: set[str]) -> None:
        uids = self.uidlist.uids if self.uidlist else {}
        infos = self.infos
        listed: dict[str, int] | None = None  # key -> UID as listed, made on first need
        for key in removed:
            # The entry listed for `key`: found by the key's UID in dovecot-uidlist, or, when
            # that no longer leads to it (its line dropped by a rewrite), by the key itself.
            uid = uids.get(key)
            info = infos.get(uid) if uid is not None else None
            if info is None or info.key != key:
                if listed is None:
                    listed = {i.key: u for u, i in infos.items()}
                uid = listed.get(key)
                info = infos.get(uid) if uid is not None else None
            if info is not None and info.key == key:
                del infos[uid]
                self.touch_modseq(uid)
        renumbered = self.uidlist.renumbered if self.uidlist else {}
        for uid, key in renumbered.items():
            # A key another process gave a new UID (its old one was forgotten there, e.g. an
            # EXPUNGE that found the file renamed): the old UID is gone, not the message.
            info = infos.get(uid)
            if info is not None and info.key == key:
                del infos[uid]
                self.touch_modseq(uid)
        renumbered.clear()
        self._load_meta()
        last = next(reversed(infos)) if infos else 0
        out_of_order = False
        found = sorted((uids[k], k) for k in touched if k in uids and k in self.files)
        for uid, key in found:
            info = self._make_info(uid, key, self.files[key])
            if info is None:
                continue
            if uid not in infos:
                if uid < last:
                    out_of_order = True
                else:
                    last = uid
            infos[uid] = info
            self.touch_modseq(uid)
        if out_of_order:
            # A UID below ones we already list (given by another process to a file it had
            # in new/): keep the dict in UID order.
            self.infos = dict(sorted(infos.items()))
        self._changed()

    def _changed(self) -> None:
        self.snapshot = None
        self.generation += 1

    def _stat_meta(self, key: str, path: str) -> tuple[int, float] | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        size = size_from_key(key)
        meta = (size if size is not None else st.st_size, st.st_mtime)
        self.meta[key] = meta
        self.meta_pending.append(key)
        return meta

    def invalidate(self) -> None:
        self.cur_mtime = self.new_mtime = None

    # -- UIDs (uidfile.py) ------------------------------------------------------------------
    @property
    def uidlist(self) -> UidList | None:
        return self.uid_file.list

    @property
    def uidlist_stamp(self) -> tuple | None:
        return self.uid_file.stamp

    def ensure_uidlist(self) -> UidList:
        if self.uid_file.reload() == "full":
            self.synced = False  # rewritten elsewhere: see forget_uids
        if self.uidlist is None:
            self.register([])
        return self.uidlist

    @contextlib.contextmanager
    def hold_uidlist(self) -> Iterator[None]:
        """Hold this folder's lock and the dotlock of dovecot-uidlist (re-entrant). An
        operation that changes files takes them before its first change, so a busy lock
        (LockBusy) leaves nothing half done and the operation can simply run again."""
        with self.lock, self.uid_file.hold():
            yield

    def register(self, keys: list[str], names: dict[str, str] | None = None,
                 defer: bool = False) -> list[int]:
        """Give each key a UID (existing ones keep theirs) under the dotlock; returns them.
        `defer`: the caller holds the dotlock and writes them later (`_write_registered`)."""
        with self.hold_uidlist():
            self._write_registered()
            result, reload = self.uid_file.assign(keys)
            if reload == "full":
                self.synced = False  # our view of UIDs must be rebuilt at the next sync
            if not defer:
                self._write_registered()
            if reload and reload != "full" and self.synced:
                # Keys another process registered: pick them up at the next sync.
                self.invalidate()
        if names:
            # Our own additions (append/copy/move): add them without listing cur/ again.
            self._load_meta()
            for key, uid in zip(keys, result):
                name = names[key]
                info = self._make_info(uid, key, name)
                if info is None:
                    continue
                self.files[key] = name
                if self.infos and uid < next(reversed(self.infos)):
                    self.infos[uid] = info
                    self.infos = dict(sorted(self.infos.items()))
                else:
                    self.infos[uid] = info
                self.touch_modseq(uid)
                if key in self.meta:
                    self.meta_pending.append(key)
                # APPEND, COPY and MOVE give the new message \Recent (RFC 3501 §2.3.2).
                self.unclaimed_recent.add(uid)
            self._changed()
            self._save_meta()
        return result

    def _write_registered(self) -> None:
        """Write what `register` gave (under the dotlock)."""
        try:
            self.uid_file.write()
        except BaseException:
            self.synced = False  # the UIDs in memory were forgotten: list again
            raise

    def forget_uids(self, uids: list[int]) -> None:
        """Drop expunged/moved messages from the UID list (their UIDs are never reused).
        dovecot-uidlist keeps their lines until enough have gathered to be worth a rewrite
        (docs/design/maildir.md, "Dovecot's files")."""
        gone = set(uids)
        with self.hold_uidlist():
            if self.uid_file.drop(gone) == "full":
                # Rewritten by another process, without the lines of files it found gone: the
                # next sync must rebuild from the listing, or a message expunged elsewhere
                # would stay listed (its key no longer leads to its UID).
                self.synced = False
        for uid in gone:
            self.touch_modseq(uid)
            info = self.infos.pop(uid, None)
            if info is not None:
                self.files.pop(info.key, None)
                self.meta.pop(info.key, None)
        self.unclaimed_recent -= gone
        self._changed()

    # -- mod-sequences (RFC 7162) -----------------------------------------------------------
    def touch_modseq(self, uid: int) -> None:
        """The flags or the presence of `uid` may have changed: check it at the next
        reconcile_modseqs()."""
        if self.mod_dirty is not None:
            self.mod_dirty.add(uid)

    def reconcile_modseqs(self) -> None:
        """Give every change noticed since the last call a new mod-sequence (in the shared
        log) and put the mod-sequences into the MessageInfos. A failure to write the log is
        retried at the next call: the changes stay marked."""
        dirty = self.mod_dirty
        if dirty is not None and not dirty:
            return
        self.mod_dirty = set()
        log = self.modseqs
        uv = self.uidlist.uidvalidity if self.uidlist is not None else 0
        try:
            log.load()
            if dirty is not None and (log.stamp is None or log.uidvalidity != uv):
                dirty = None  # a new log: every message needs its first mod-sequence
            infos = self.infos
            uids = infos.keys() if dirty is None else [u for u in dirty if u in infos]
            present = {u: infos[u].name.partition(":2,")[2] for u in uids}
            if log.record(uv, present, dirty, full=dirty is None, loaded=True) is None:
                present = {u: i.name.partition(":2,")[2] for u, i in infos.items()}
                dirty = None
                log.record(uv, present, None, full=True)
        except OSError:
            self.mod_dirty = dirty  # retried at the next call
            raise
        modseq = log.modseq
        replaced = False
        if self.unseen:
            for u, info in infos.items():
                info.modseq = modseq.get(u, 0)
            return
        for u in (infos.keys() if dirty is None else dirty):
            info = infos.get(u)
            if info is not None:
                ms = modseq.get(u, 0)
                if info.modseq != ms:
                    infos[u] = MessageInfo(info.uid, info.key, info.flags, info.size,
                                           info.date, info.name, info.cur_dir, ms)
                    replaced = True
        if replaced:
            self._changed()

    # -- keywords ---------------------------------------------------------------------------
    def _reload_keywords(self) -> bool:
        path = os.path.join(self.path, KEYWORDS)
        stamp = file_stamp(path)
        if stamp == self.keywords_stamp:
            return False
        keywords = read_keywords(path)
        self.keywords_stamp = stamp
        if keywords == self.keywords:
            return False
        self.keywords = keywords
        self.flag_cache = {}
        return True

    def read_keywords(self) -> list[str]:
        self._reload_keywords()
        return self.keywords

    def keywords_for(self, flags: Iterable[str]) -> list[str]:
        """The keyword table, extended (under its dotlock) with any new keyword in `flags`.
        Keywords past the 26th cannot be stored in Maildir names and are dropped."""
        if self._reload_keywords():
            self.synced = False  # letters may mean other keywords now: rebuild flags
        wanted = sorted(f for f in flags if not f.startswith("\\") and _valid_keyword(f))
        lower = {k.lower() for k in self.keywords}
        if all(w.lower() in lower for w in wanted):
            return self.keywords
        path = os.path.join(self.path, KEYWORDS)
        with DotLock(path, self.rules):
            self.keywords_stamp = None
            self._reload_keywords()
            keywords = list(self.keywords)
            lower = {k.lower() for k in keywords}
            for w in wanted:
                if w.lower() not in lower and len(keywords) < MAX_KEYWORDS:
                    keywords.append(w)
                    lower.add(w.lower())
            if keywords != self.keywords:
                write_keywords(path, keywords)
                self.keywords = keywords
                self.flag_cache = {}
                self.keywords_stamp = file_stamp(path)
        return self.keywords

    # -- mailsuite-index: sizes and INTERNALDATEs --------------------------------------------
    def _load_meta(self) -> None:
        if self.meta_loaded:
            return
        self.meta_loaded = True
        try:
            with open(os.path.join(self.path, INDEX), "rb") as f:
                data = f.read().decode("utf-8", "surrogateescape")
        except FileNotFoundError:
            return
        lines = data.split("\n")
        if not lines or lines[0] != "mailsuite-index 1":
            return
        meta = self.meta
        count = 0
        for line in lines[1:]:
            parts = line.split("\t")
            if len(parts) == 3:
                try:
                    meta[parts[0]] = (int(parts[1]), float(parts[2]))
                    count += 1
                except ValueError:
                    continue
        self.meta_lines = count

    def _save_meta(self) -> None:
        """Append new entries; rewrite (compact) when most lines are for deleted messages.
        Afterwards the values live only in the MessageInfo objects (memory: one copy)."""
        path = os.path.join(self.path, INDEX)
        pending, self.meta_pending = self.meta_pending, []
        try:
            if (self.meta_lines + len(pending) < 2 * len(self.files) + 1000
                    and (self.meta_lines or os.path.exists(path))):
                entries = [(k, m) for k in pending
                           if (m := self._meta_for(k)) is not None and m[1] != UNDATED]
                with open_append(path, "ab") as f:
                    f.write("".join(f"{k}\t{m[0]}\t{m[1]!r}\n" for k, m in entries)
                            .encode("utf-8", "surrogateescape"))
                self.meta_lines += len(entries)
            else:
                # Every listed message from its MessageInfo, or, where this process has not
                # dated it, from the line another process wrote (an APPEND's date: a message
                # expunged before we date it has no file left to stat); then pending keys not
                # listed.
                infos = self.infos
                uids = self.uidlist.uids if self.uidlist else {}
                recorded = index_lines(path)
                out = ["mailsuite-index 1"]
                for i in infos.values():
                    if i.date != UNDATED:
                        out.append(f"{i.key}\t{i.size}\t{i.date!r}")
                    elif (line := recorded.get(i.key)) is not None:
                        out.append(line)
                extra: dict[str, tuple[int, float]] = {}
                for key in pending:
                    uid = uids.get(key)
                    info = infos.get(uid) if uid is not None else None
                    if ((info is None or info.key != key) and (m := self._meta_for(key))
                            and m[1] != UNDATED):
                        extra[key] = m
                out += [f"{k}\t{m[0]}\t{m[1]!r}" for k, m in extra.items()]
                # Lines of keys other processes registered and we do not list (yet, or no
                # more: sessions there may still show them, and need their dates).
                listed = {i.key for i in infos.values()}
                out += [line for k, line in recorded.items()
                        if k in uids and k not in listed and k not in extra]
                atomic_write(path, ("\n".join(out) + "\n").encode("utf-8", "surrogateescape"))
                self.meta_lines = len(out) - 1
        except OSError:
            pass  # a cache: failing to write it costs speed, not correctness
        self._drop_listed_meta()

    def _drop_listed_meta(self) -> None:
        infos, uids = self.infos, (self.uidlist.uids if self.uidlist else {})
        if self.meta:
            self.meta = {k: m for k, m in self.meta.items()
                         if (u := uids.get(k)) is None or u not in infos}


    def ensure_dates(self, infos: Iterable[MessageInfo]) -> None:
        """Give every message of `infos` its real date (one stat by directory descriptor for
        each undated one) and append them to mailsuite-index, so a fresh process does not stat
        them again (docs/design/maildir.md, "Dates on demand"). Blocking: the io pool. The
        stat needs no lock (the date is memoized in the MessageInfo); the append takes it."""
        undated = [i for i in infos if i.date == UNDATED]
        if not undated:
            return
        stat = os.stat
        try:
            fd = os.open(self.cur_prefix, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            for info in undated:
                info.internaldate
            return
        try:
            for info in undated:
                info.stat_date(stat, info.name, dir_fd=fd)
        finally:
            os.close(fd)
        # (an expunged file's guessed date is not a fact for the index: stat_date)
        undated = [i for i in undated if i.date != UNDATED]
        if not undated:
            return
        lines = "".join(f"{i.key}\t{i.size}\t{i.date!r}\n" for i in undated)
        path = os.path.join(self.path, INDEX)
        with self.lock:
            try:
                if self.meta_lines or os.path.exists(path):
                    with open_append(path, "ab") as f:
                        f.write(lines.encode("utf-8", "surrogateescape"))
                else:
                    atomic_write(path, ("mailsuite-index 1\n" + lines)
                                 .encode("utf-8", "surrogateescape"))
                self.meta_lines += len(undated)
            except OSError:
                pass  # a cache: failing to write it costs speed, not correctness


def _list_cur(cur_dir: str) -> dict[str, str]:
    """key -> file name of every message in cur/."""
    intern = sys.intern  # one string per key, shared with dovecot-uidlist's dict
    return {intern(n.split(":", 1)[0]): n for n in os.listdir(cur_dir) if n[0] != "."}


def _valid_keyword(flag: str) -> bool:
    # RFC 3501 atom: no specials, no spaces; stored in a file whose format is space-separated.
    return bool(flag) and all(33 <= ord(c) < 127 and c not in '(){%*"\\]' for c in flag)


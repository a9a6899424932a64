"""One open folder (INBOX or a Maildir++ sub-folder), split from store.py: what an IMAP
selection or a POP3 maildrop does with its messages (sync, read, flags, APPEND, COPY, MOVE,
EXPUNGE, mod-sequences). The state it shares with the other Folders of the same directory is
a `FolderIndex` (index.py); `Account.folder()` (store.py) hands Folders out.
"""
from __future__ import annotations

import os
import shutil
import weakref
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable, TypeVar

from mailsuite.mailbox import maildir as _maildir
from mailsuite.mailbox.cache import message_headers
from mailsuite.mailbox.errors import LockBusy, NoSuchMessage, translate_faults
from mailsuite.mailbox.held import HELD_PREFIX, drain_held, sweep_held
from mailsuite.mailbox.index import FolderLock, MessageInfo
from mailsuite.mailbox.info import renamed_path
from mailsuite.mailbox.maildir import (
    KEYWORDS, UIDLIST, file_stamp, flags_to_letters, info_name, letters_to_flags, split_name,
    unique_key,
)
from mailsuite.mailbox.names import SPECIAL_USE
from mailsuite.safeio import fsync_dir

if TYPE_CHECKING:
    from mailsuite.mailbox.store import Account

T = TypeVar("T")


@translate_faults("messages", "get", "recent", "held")
class Folder:
    """One Maildir (INBOX or a .Sub folder). Keep one instance per IMAP session/selection:
    it remembers which messages this session saw first (\\Recent)."""

    def __init__(self, account: Account, name: str, path: str):
        self.account = account
        self.name = name
        self.path = path
        store = account.store
        self._state = store._state(path)
        self._state.users.add(self)
        weakref.finalize(self, store._released)
        self._recent: set[int] = set()
        # Only a read-write selection takes \Recent for itself (RFC 3501 §2.3.2); any other
        # Folder (EXAMINE, STATUS, COPY's target) sees the unclaimed ones without taking them.
        self.claims_recent = False
        # Set for the Folder of an IMAP selection: its view must stay readable until the
        # session has announced each EXPUNGE (`_hold`, docs/design/imap.md, "Expunged
        # messages stay readable until announced").
        self.selected = False
        self._shown_upto = 0  # highest UID of this Folder's last sync
        self._pinned: set[int] = set()  # held UIDs this Folder still shows

    def held(self) -> FolderLock:
        """The folder's in-process lock (re-entrant; LockBusy after a short wait): a job that
        calls several of the methods below holds it around them, so it takes the lock once
        and waits in line once, not once per call (docs/design/maildir.md, "One hold per
        job")."""
        return self._state.lock

    @property
    def special_use(self) -> str | None:
        return SPECIAL_USE.get(self.name)

    @property
    def uidvalidity(self) -> int:
        with self._state.lock:
            return self._state.ensure_uidlist().uidvalidity

    @property
    def uidnext(self) -> int:
        with self._state.lock:
            return self._state.ensure_uidlist().nextuid

    @property
    def keywords(self) -> list[str]:
        """Keywords known in this folder's dovecot-keywords (index = letter a..z)."""
        with self._state.lock:
            return [k for k in self._state.read_keywords() if k]

    @property
    def recent(self) -> frozenset:
        """UIDs with \\Recent for this Folder: those it claimed when `claims_recent`,
        otherwise those no read-write selection has claimed yet."""
        if self.claims_recent:
            return frozenset(self._recent)
        with self._state.lock:
            return frozenset(self._state.unclaimed_recent)

    def sync(self) -> list[MessageInfo]:
        """Pick up changes (new/ -> cur/, UIDs for new files), return messages in UID order."""
        state = self._state
        with state.lock:
            if not state.held_swept:
                sweep_held(self.path)
                state.held_swept = True
            drain_held(state)
            state.sync()
            if state.unclaimed_recent and self.claims_recent:
                self._recent |= state.unclaimed_recent
                state.unclaimed_recent = set()
            infos = state.messages()
            if self.selected:
                if self not in state.viewers:
                    state.viewers.add(self)
                    # Pins go back when the selection ends, however it ends (no lock:
                    # this may run on any thread, drain_held does the unlinking).
                    weakref.finalize(self, state.releases.extend, self._pinned)
                self._shown_upto = infos[-1].uid if infos else 0
            return infos

    def synced_state(self) -> tuple[list[MessageInfo], list[str], int, int, frozenset, int,
                                    tuple]:
        """sync(), then (messages, keywords, UIDVALIDITY, UIDNEXT, recent, HIGHESTMODSEQ,
        state token) as of that sync, under one hold of the folder lock: the uidlist and
        keywords were just re-read by the sync, so they are not stat()ed again, and the state
        token is made of the stamps the sync took before reading each file or directory, so
        it differs from a later state_token() whenever something changed after it looked
        (docs/design/maildir.md, "Folder states in memory")."""
        state = self._state
        with state.lock:
            infos = self.sync()
            if state.uidlist is None:
                state.ensure_uidlist()
            ul = state.uidlist
            keywords = [k for k in state.keywords if k]
            recent = self.recent
            state.reconcile_modseqs()
            token = (state.generation, *state.dir_stamps, state.uidlist_stamp,
                     state.keywords_stamp)
            return (infos, keywords, ul.uidvalidity, ul.nextuid, recent,
                    state.modseqs.highest, token)

    def release(self, uids: Iterable[int]) -> bool:
        """The session has announced these EXPUNGEs: it no longer needs their content.
        Never blocks (reactor thread); True if pins were given back, whose files go at the
        next sync or drain_held."""
        pinned = self._pinned
        released = False
        for u in uids:
            if u in pinned:
                pinned.discard(u)
                self._state.releases.append(u)
                released = True
        return released

    def drain_held(self) -> None:
        """Unlink the held files whose pins are all back (io pool). Never waits for the
        folder lock: whoever holds it is in sync() or expunge(), which drain too."""
        lock = self._state.lock
        if lock.acquire(blocking=False):
            try:
                drain_held(self._state)
            finally:
                lock.release()

    def messages(self) -> list[MessageInfo]:
        """The result of the last sync() without touching the disk (sync() first if never)."""
        with self._state.lock:
            if not self._state.synced:
                return self.sync()
            return self._state.messages()

    def get(self, uid: int) -> MessageInfo | None:
        with self._state.lock:
            if not self._state.synced:
                self.sync()
            return self._state.infos.get(uid)

    def ensure_dates(self, infos: Iterable[MessageInfo]) -> None:
        """Read the INTERNALDATE of those of `infos` not dated yet, in bulk (docs/design/
        maildir.md, "Dates on demand"). Blocking: run it in the io pool before a command that
        reads many `MessageInfo.internaldate`s."""
        self._state.ensure_dates(infos)

    # -- mod-sequences (RFC 7162; docs/design/maildir.md, "Mod-sequences") ------------------
    def highest_modseq(self) -> int:
        """The folder's HIGHESTMODSEQ, every change noticed so far included."""
        state = self._state
        with state.lock:
            if not state.synced:
                state.sync()
            state.reconcile_modseqs()
            return state.modseqs.highest

    def modseqs(self, uids: Iterable[int]) -> dict[int, tuple[int, frozenset]]:
        """uid -> (mod-sequence, flags) of the given messages that exist, after giving the
        changes made so far (e.g. by this session's STORE) their mod-sequences."""
        state = self._state
        with state.lock:
            if not state.synced:
                state.sync()
            state.reconcile_modseqs()
            infos = state.infos
            return {u: (i.modseq, i.flags) for u in uids if (i := infos.get(u)) is not None}

    def vanished(self, modseq: int) -> list[int] | None:
        """UIDs expunged after `modseq`, ascending, or None when that is older than the
        expunges the log remembers (RFC 7162 §3.2.5: report every missing UID then)."""
        state = self._state
        with state.lock:
            if not state.synced:
                state.sync()
            state.reconcile_modseqs()
            return state.modseqs.vanished_since(modseq)

    @property
    def generation(self) -> int:
        """Changes with every change this process makes to the folder (the first part of
        the state token); read without the lock."""
        return self._state.generation

    def state_token(self) -> tuple:
        """A cheap value (stat of new/, cur/, dovecot-uidlist) that changes when sync() may
        find something new: IMAP NOOP/IDLE poll this and sync() only when it differs."""
        token = [self._state.generation]
        for p in (os.path.join(self.path, "new"), os.path.join(self.path, "cur"),
                  os.path.join(self.path, UIDLIST), os.path.join(self.path, KEYWORDS)):
            token.append(file_stamp(p))
        return tuple(token)

    def open_message(self, uid: int) -> BinaryIO:
        """The message file opened for binary reading; NoSuchMessage if it is gone."""
        state = self._state
        if state.synced:
            # Without the folder lock (docs/design/maildir.md, "Reading without the lock"):
            # a name is never reused, so a stale entry can only fail to open, and then the
            # locked path below lists cur/ again.
            info = state.infos.get(uid)
            path = info.path if info is not None else None
            if path is None and uid in self._pinned:
                # Expunged elsewhere, not yet announced to this session: our pin keeps it.
                held = state.held.get(uid)
                path = held[0] if held is not None else None
            if path is not None:
                try:
                    return open(path, "rb")
                except FileNotFoundError:
                    pass
            elif info is None and uid not in self._pinned:
                raise NoSuchMessage(f"no message with UID {uid}")
        for attempt in range(2):
            with state.lock:
                if attempt:
                    # Renamed by a flag change elsewhere, or expunged: list cur/ again.
                    state.invalidate()
                if attempt or not state.synced:
                    state.sync()
                info = state.infos.get(uid)
                if info is None:
                    held = state.held.get(uid) if uid in self._pinned else None
                    if held is not None:
                        # Expunged elsewhere, not yet announced to this session.
                        return open(held[0], "rb")
                    raise NoSuchMessage(f"no message with UID {uid}")
                try:
                    return open(info.path, "rb")
                except FileNotFoundError:
                    continue
        raise NoSuchMessage(f"message UID {uid} has disappeared")

    def headers(self, uids: list[int], extract: Callable[[BinaryIO], bytes]
                ) -> dict[int, bytes]:
        """uid -> header block of each (ascending) UID still readable, from mailsuite-cache
        or, for messages it lacks, `extract(file)` (then cached; docs/design/maildir.md,
        "Header cache")."""
        state = self._state
        ul = state.uidlist
        if state.synced and ul is not None:
            # Without the folder lock (docs/design/maildir.md, "Reading without the lock"):
            # cache records are matched by UID, size and Maildir key, never by UID alone.
            live = state.infos
            infos = [i for u in uids if (i := live.get(u)) is not None]
            uidvalidity = ul.uidvalidity
        else:
            with state.lock:
                if not state.synced:
                    state.sync()
                infos = [i for u in uids if (i := state.infos.get(u)) is not None]
                uidvalidity = state.ensure_uidlist().uidvalidity
                live = state.infos
        found = message_headers(state.header_cache, infos, uidvalidity, live,
                                lambda u: self._read_header(u, extract))
        for u in uids:  # expunged elsewhere but still shown to this session: not cached
            if u not in found and u in self._pinned:
                header = self._read_header(u, extract)
                if header is not None:
                    found[u] = header
        return found

    def _read_header(self, uid: int, extract: Callable[[BinaryIO], bytes]) -> bytes | None:
        try:
            with self.open_message(uid) as f:
                return extract(f)
        except LockBusy:
            raise  # not a vanished message: the caller's pool waits and runs the job again
        except (NoSuchMessage, OSError):
            return None

    def set_flags(self, uid: int, flags: Iterable[str]) -> frozenset:
        """Replace the flags of a message; returns the flags actually stored."""
        return self._change_flags(uid, lambda old: frozenset(flags))

    def add_flags(self, uid: int, flags: Iterable[str]) -> frozenset:
        add = frozenset(flags)
        return self._change_flags(uid, lambda old: old | add)

    def remove_flags(self, uid: int, flags: Iterable[str]) -> frozenset:
        remove = frozenset(flags)
        return self._change_flags(uid, lambda old: old - remove)

    def append(self, data: bytes | BinaryIO, flags: Iterable[str] = (),
               internaldate: float | None = None) -> int:
        """Store a message (bytes or a binary file object) with fsync; returns its UID."""
        return self.append_many([(data, flags, internaldate)])[0][0]

    def append_many(self, items: list[tuple[bytes | BinaryIO, Iterable[str], float | None]],
                    check: Callable[[], object] | None = None,
                    then: Callable[[list[int]], T] | None = None) -> tuple[list[int], T | None]:
        """Store several messages all or none (MULTIAPPEND, RFC 3502 §6.3.11): each is written
        and fsynced in tmp/ first; only then are they renamed into cur/ and given their UIDs
        together, under the folder lock. Returns the UIDs in the order of `items`, and what
        `then(uids)` returned. `check()` (which may refuse the append by raising) and `then`
        run in the same hold of the folder lock, before the first rename and after the UIDs
        are given (docs/design/maildir.md, "One hold per job")."""
        self._prove()
        state = self._state
        staged: list[tuple[str, int, list[str]]] = []
        renamed: list[str] = []
        try:
            for data, flags, internaldate in items:
                tmp_path = os.path.join(self.path, "tmp", unique_key(0) + ".part")
                fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                staged.append((tmp_path, 0, list(flags)))
                with os.fdopen(fd, "wb") as f:
                    if isinstance(data, (bytes, bytearray, memoryview)):
                        f.write(data)
                    else:
                        shutil.copyfileobj(data, f, 1024 * 1024)
                    f.flush()
                    os.fsync(f.fileno())
                    staged[-1] = (tmp_path, f.tell(), list(flags))
                if internaldate is not None:
                    os.utime(tmp_path, (internaldate, internaldate))
            cur = os.path.join(self.path, "cur")
            # Both locks before the first rename (docs/design/maildir.md, "The dotlock").
            with state.hold_uidlist():
                if check is not None:
                    check()
                state.keywords_for({f for _, _, flags in staged for f in flags})
                keys: list[str] = []
                names: dict[str, str] = {}
                for tmp_path, size, flags in staged:
                    mtime = os.stat(tmp_path).st_mtime
                    key = unique_key(size)
                    letters = flags_to_letters(flags, state.keywords_for(flags))
                    final = os.path.join(cur, info_name(key, letters))
                    os.rename(tmp_path, final)
                    renamed.append(final)
                    state.meta[key] = (size, mtime)
                    keys.append(key)
                    names[key] = os.path.basename(final)
                uids = state.register(keys, names)
                renamed = []
                after = then(uids) if then is not None else None
            # After the lock (docs/design/maildir.md, "Reading without the lock"): APPEND is
            # answered only after this fsync, other sessions need not wait for it.
            fsync_dir(cur)
            return uids, after
        finally:
            for path in [t for t, _, _ in staged] + renamed:
                try:
                    os.unlink(path)  # a failed batch leaves nothing behind
                except FileNotFoundError:
                    pass

    def copy(self, uids: Iterable[int], dest: "Folder") -> list[tuple[int, int]]:
        """Copy messages to `dest` with their flags; returns (source uid, new uid) pairs.
        Files are hard-linked when possible (content never changes in place)."""
        dest._prove()
        sources = self._sources(uids)
        dstate = dest._state
        pairs_keys: list[tuple[int, str]] = []
        names: dict[str, str] = {}
        cur = os.path.join(dest.path, "cur")
        # Only the destination's lock is held from here on (never both: two sessions copying
        # in opposite directions must not deadlock). It and the keywords are taken before the
        # first link, so a busy lock leaves nothing behind.
        with dstate.hold_uidlist():
            dstate.keywords_for({f for info, _ in sources for f in info.flags})
            for info, src_path in sources:
                key = unique_key(info.size)
                letters = flags_to_letters(info.flags, dstate.keywords_for(info.flags))
                target = os.path.join(cur, info_name(key, letters))
                if not _link_or_copy(info, src_path, target, os.path.join(dest.path, "tmp", key)):
                    continue  # expunged meanwhile
                dstate.meta[key] = (info.size, info.date)
                pairs_keys.append((info.uid, key))
                names[key] = os.path.basename(target)
            if not pairs_keys:
                return []
            new_uids = dstate.register([k for _, k in pairs_keys], names)
        fsync_dir(cur)  # before COPY is answered, after the lock (as in append_many)
        return [(old, new) for (old, _), new in zip(pairs_keys, new_uids)]

    def move(self, uids: Iterable[int], dest: "Folder") -> list[tuple[int, int]]:
        """Move messages (RFC 6851 semantics); returns (source uid, new uid) pairs.
        A rename keeps the Maildir key, so POP3/IMAP identity survives the move."""
        if dest.path == self.path:
            # Into the same folder: each message gets a new UID, the old one is expunged
            # (RFC 6851 §3.3 and §4.3; imaptest's move group checks COPYUID for it).
            pairs = self.copy(uids, dest)
            self.expunge([old for old, _ in pairs])
            return pairs
        self._prove()
        dest._prove()
        sources = self._sources(uids)
        dstate = dest._state
        moved: list[tuple[int, str]] = []
        arrived: list[tuple[MessageInfo, str]] = []
        names: dict[str, str] = {}
        cur = os.path.join(dest.path, "cur")
        # Both folders' locks before the first rename, so a busy one leaves nothing half
        # moved. Taking both cannot deadlock: every lock here gives up after a short try
        # (LockBusy) instead of waiting.
        with dstate.hold_uidlist(), self._state.hold_uidlist():
            dstate.keywords_for({f for info, _ in sources for f in info.flags})
            known = dstate.ensure_uidlist().uids
            for info, src_path in sources:
                letters = flags_to_letters(info.flags, dstate.keywords_for(info.flags))
                target = os.path.join(cur, info_name(info.key, letters))
                if info.key in dstate.files or info.key in known or os.path.exists(target):
                    # The key was here before (moved back and forth): a UID once given to it
                    # must not come back, so the file gets a new key.
                    key = unique_key(info.size)
                    target = os.path.join(cur, info_name(key, letters))
                else:
                    key = info.key
                if not self._on_file(info, lambda path, t=target: os.rename(path, t), src_path):
                    continue  # expunged meanwhile
                dstate.meta[key] = (info.size, info.date)
                moved.append((info.uid, key))
                arrived.append((info, target))
                names[key] = os.path.basename(target)
            if not moved:
                return []
            fsync_dir(cur)
            fsync_dir(os.path.join(self.path, "cur"))
            new_uids = dstate.register([k for _, k in moved], names)
            # Sessions that still show a moved message read it from a link in our tmp/.
            for info, target in arrived:
                try:
                    self._hold(info, target, os.link)
                except FileNotFoundError:
                    pass  # already changed or expunged in the destination
            self._state.forget_uids([u for u, _ in moved])
        return [(old, new) for (old, _), new in zip(moved, new_uids)]

    def expunge(self, uids: Iterable[int] | None = None) -> list[int]:
        """Remove messages: the given UIDs, or (None) every message flagged \\Deleted.
        Returns the UIDs actually removed, ascending."""
        self._prove()
        state = self._state
        with state.hold_uidlist():  # before the first unlink
            self.sync()
            if uids is None:
                targets = [i for i in state.infos.values() if "\\Deleted" in i.flags]
            else:
                wanted = set(uids)
                targets = [state.infos[u] for u in sorted(wanted) if u in state.infos]
            drain_held(state)
            removed = []
            for info in targets:
                gone = self._on_file(info, lambda path, info=info: self._hold(
                    info, path, os.rename) or os.unlink(path))
                if gone is not False:
                    removed.append(info.uid)
            if removed:
                fsync_dir(os.path.join(self.path, "cur"))
                state.forget_uids(removed)
            return removed

    # -- helpers --------------------------------------------------------------------------------
    def _hold(self, info: MessageInfo, path: str, keep) -> bool:
        """Before a message leaves this folder: if other selected sessions still show it,
        keep its file in tmp/ (`keep` = os.rename for EXPUNGE, os.link for MOVE) until each
        has announced the EXPUNGE (RFC 2180 §4.1.1). Under the folder's lock; False if no
        session needs it."""
        state = self._state
        viewers = [v for v in state.viewers if v is not self and info.uid <= v._shown_upto]
        if not viewers:
            return False
        held = os.path.join(self.path, "tmp", f"{HELD_PREFIX}{info.uid}.{info.key}")
        keep(path, held)
        state.held[info.uid] = [held, len(viewers)]
        for v in viewers:
            v._pinned.add(info.uid)
        return True

    def _prove(self) -> None:
        """Checked at every write, not only when the session opened the folder: a directory
        can be replaced by a symlink while a session is open (docs/design/maildir.md)."""
        self.account.store.prove(self.path, _maildir.SUBDIRS)

    def _sources(self, uids: Iterable[int]) -> list[tuple[MessageInfo, str]]:
        """(info, current path) of existing messages, under this folder's lock only."""
        with self._state.lock:
            out = []
            for info in self._infos_for(uids):
                path = self._current_path(info)
                if path is not None:
                    out.append((self._state.infos.get(info.uid, info), path))
            return out

    def _infos_for(self, uids: Iterable[int]) -> list[MessageInfo]:
        with self._state.lock:
            if not self._state.synced:
                self.sync()
            infos = self._state.infos
            return [infos[u] for u in sorted(set(uids)) if u in infos]

    def _on_file(self, info: MessageInfo, act: Callable[[str], object],
                 path: str | None = None) -> bool | None:
        """act(path of the message's file), under this folder's lock. Another process may
        rename the file (its flags) between our look and `act`: the file is then looked for
        again, so a message is never taken for expunged while its file lives on under another
        name. True if done; None if the message is gone (expunged elsewhere); False if its
        file kept moving away."""
        for _ in range(3):
            if path is None:
                path = self._current_path(info)
                if path is None:
                    return None
            try:
                act(path)
                return True
            except FileNotFoundError:
                path = None
        return False

    def _current_path(self, info: MessageInfo) -> str | None:
        """The file's path now (another process may have changed its flags since)."""
        if os.path.exists(info.path):
            return info.path
        state = self._state
        with state.lock:
            state.invalidate()
            state.sync()
            now = state.infos.get(info.uid)
            return now.path if now is not None else None

    def _change_flags(self, uid: int, change) -> frozenset:
        state = self._state
        with state.lock:
            for attempt in range(2):
                if not state.synced or attempt:
                    if attempt:
                        state.invalidate()
                    state.sync()
                info = state.infos.get(uid)
                if info is None:
                    raise NoSuchMessage(f"no message with UID {uid}")
                wanted = frozenset(f for f in change(info.flags) if f != "\\Recent")
                keywords = state.keywords_for(wanted)
                name = info.name
                _, old_letters = split_name(name)
                letters = flags_to_letters(wanted, keywords, keep=old_letters)
                new_name = info_name(info.key, letters)
                stored = letters_to_flags(letters, keywords)
                if new_name == name:
                    return stored
                try:
                    os.rename(info.path, info.cur_dir + new_name)
                except FileNotFoundError:
                    continue
                state.files[info.key] = new_name
                state.infos[uid] = MessageInfo(uid, info.key, stored, info.size,
                                               info.date, new_name, info.cur_dir,
                                               info.modseq)
                state.touch_modseq(uid)
                state._changed()
                return stored
            raise NoSuchMessage(f"message UID {uid} has disappeared")


def _link_or_copy(info: MessageInfo, src_path: str, target: str, tmp: str) -> bool:
    """Hard-link the message's file to `target` (a copy through `tmp` where links fail).
    Without the source folder's lock, the file may be renamed meanwhile (its flags changed, by
    this process or another): it is then found again by its key, never silently left out (a
    client that moves mail by COPY and EXPUNGE would lose it). False if it is gone."""
    for _ in range(3):
        try:
            os.link(src_path, target)
            return True
        except FileNotFoundError:
            found = renamed_path(info.cur_dir, info.key)
            if found is None:
                return False
            src_path = found
        except OSError:
            shutil.copy2(src_path, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.rename(tmp, target)
            return True
    return False

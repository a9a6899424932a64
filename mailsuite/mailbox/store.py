"""The Maildir++ mailbox store, compatible with Dovecot's on-disk layout.

INBOX is the user's Maildir itself; folder `Archive/2026` is the directory `.Archive.2026/`.
Each folder keeps Dovecot's `dovecot-uidlist` (UIDs, UIDVALIDITY) and `dovecot-keywords`
(keyword letters a-z), flags live in the file name (`:2,FRS`). Everything here is synchronous and
blocking: protocol code and the delivery agent call it through the io pool.

Public API (used by IMAP, POP3, delivery and the tests):
    MailStore(mail_dir).account(address) -> Account
    Account: deliver, ensure_layout, list_folders, folder, create_folder, delete_folder,
             rename_folder, subscribe, unsubscribe, subscriptions, special_use, folder_exists
    Folder:  sync, messages, get, uidvalidity, uidnext, open_message, set_flags, append,
             copy, move, expunge, keywords, state_token, recent
"""
from __future__ import annotations

import collections
import fcntl
import functools
import os
import re
import secrets
import shutil
import stat
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import BinaryIO, Iterable, cast

import twisted.mail.imap4  # noqa: F401  (registers the "imap4-utf-7" codec for folder names)

from mailsuite.directory.addresses import mailbox_local_problem
from mailsuite.mailbox.maildir import (
    FLAG_LETTERS, KEYWORDS, MAX_KEYWORDS, UIDLIST, INDEX, DotLock, UidList,
    file_stamp, flags_to_letters, info_name, letters_to_flags, read_keywords,
    make_maildir, read_uidlist, size_from_key, split_name, unique_key, write_keywords,
)
from mailsuite.mailbox import maildir as _maildir
from mailsuite.safeio import atomic_write, fsync_dir


class MailboxError(Exception):
    """Base class of the store's refusals; str(e) is a reason fit for a client."""


class NoSuchFolder(MailboxError):
    pass


class FolderExists(MailboxError):
    pass


class InvalidMailboxName(MailboxError):
    pass


class NoSuchMessage(MailboxError):
    pass


class UnsafePath(MailboxError):
    """A Maildir path that resolves (through a symlink) outside mail_dir: nothing is written
    (docs/design/maildir.md, "Paths")."""


class StoreUnavailable(MailboxError, OSError):
    """An environment fault under the store (disk full, I/O error, too many open files, a
    Dovecot lock held too long): temporary, worth a retry. Both a MailboxError (protocols
    answer it: IMAP `NO [UNAVAILABLE]`, POP3 `-ERR [SYS/TEMP]`) and an OSError with the
    original errno and strerror (the delivery agent defers on it)."""

    def __init__(self, errno_: int | None, strerror: str | None):
        OSError.__init__(self, errno_, strerror)

    def __str__(self) -> str:  # fit for a client: no path, no errno number
        return f"mail storage temporarily unavailable: {self.strerror or 'I/O error'}"


def _environment_faults(fn):
    """Re-raise an OSError of a store operation as StoreUnavailable."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MailboxError:
            raise
        except OSError as e:
            raise StoreUnavailable(e.errno, e.strerror or str(e)) from e
    return wrapper


def _translate_faults(*skip: str):
    """Class decorator: every public method and property raises StoreUnavailable, never a
    bare OSError (those in `skip` are memory-only hot paths)."""
    def decorate(cls):
        for name, value in list(vars(cls).items()):
            if name.startswith("_") or name in skip:
                continue
            if isinstance(value, property):
                setattr(cls, name, property(_environment_faults(value.fget)))
            elif callable(value):
                setattr(cls, name, _environment_faults(value))
        return cls
    return decorate


# RFC 6154 attributes of the folders every account gets on first login.
SPECIAL_USE: dict[str, str] = {
    "Sent": "\\Sent",
    "Drafts": "\\Drafts",
    "Trash": "\\Trash",
    "Junk": "\\Junk",
    "Archive": "\\Archive",
}

SYSTEM_FLAGS = frozenset(FLAG_LETTERS)
DELIMITER = "/"


@dataclass(frozen=True, slots=True)  # slots: 100,000 of these per large folder
class MessageInfo:
    """One message of a folder as of the last sync().

    key: the Maildir base name before ':2,' (POP3 UIDL, stable identity).
    flags: IMAP flags (system flags and keywords; never \\Recent).
    size: octets of the stored file (CRLF line endings), internaldate: POSIX time.
    name: the file name in cur/ as of the last sync (it changes when flags change);
    path: the same as an absolute path (computed: the folder prefix is one shared string).
    """

    uid: int
    key: str
    flags: frozenset
    size: int
    internaldate: float
    name: str
    cur_dir: str  # "<folder>/cur/", shared by all messages of the folder

    @property
    def path(self) -> str:
        return self.cur_dir + self.name


class MailStore:
    """All users' Maildirs under `mail_dir` (<mail_dir>/<domain>/<localpart>/).

    One MailStore per process: it shares each folder's in-memory index between the sessions
    of this process, so a second SELECT of a large folder costs a few stat() calls."""

    # Folder states kept alive after their last session closed, most recently used first:
    # re-opening one of these costs a few stat() calls instead of re-reading its index.
    KEEP_STATES = 32

    def __init__(self, mail_dir: str):
        self.mail_dir = os.path.abspath(mail_dir)
        # mail_dir itself may legitimately be a symlink (/var/mail -> /srv/mail): paths are
        # compared after resolving, against where it resolves.
        self.mail_dir_real = os.path.realpath(self.mail_dir)
        # Weak: a state lives while a Folder (session) uses it, or while it is in _recent.
        self._states: weakref.WeakValueDictionary[str, _FolderState] = (
            weakref.WeakValueDictionary())
        self._recent: collections.OrderedDict[str, _FolderState] = collections.OrderedDict()
        self._lock = threading.Lock()

    def account(self, address: str) -> "Account":
        """The account of an address: <mail_dir>/<domain>/<localpart>/, lower-cased.

        The one mapping from address to Maildir; it creates nothing on disk and raises
        InvalidMailboxName for an address that could escape mail_dir."""
        local, at, domain = address.lower().rpartition("@")
        if not at or not local or not domain or any(
                mailbox_local_problem(part) for part in (local, domain)):
            raise InvalidMailboxName(f"not a mailbox address: {address!r}")
        path = os.path.join(self.mail_dir, domain, local)
        if os.path.dirname(os.path.dirname(path)) != self.mail_dir:  # proven under mail_dir
            raise InvalidMailboxName(f"not a mailbox address: {address!r}")
        return Account(self, address.lower(), path)

    def prove(self, path: str, subdirs: Iterable[str] = ()) -> None:
        """Raise UnsafePath unless `path` resolves under mail_dir and none of its `subdirs`
        is a symlink. Called before every write (docs/design/maildir.md, "Paths"): a domain,
        user or folder directory replaced by a symlink must not carry mail elsewhere."""
        real = os.path.realpath(path)
        root = self.mail_dir_real
        if not real.startswith(root + os.sep):
            raise UnsafePath(f"mailbox path leaves the mail directory: {path}")
        for sub in subdirs:
            try:
                mode = os.lstat(os.path.join(path, sub)).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(mode):
                raise UnsafePath(f"mailbox path leaves the mail directory: {path}/{sub}")

    def _state(self, path: str) -> "_FolderState":
        with self._lock:
            state = self._states.get(path)
            if state is None:
                state = self._states[path] = _FolderState(path)
            self._recent[path] = state
            self._recent.move_to_end(path)
            while len(self._recent) > self.KEEP_STATES:
                self._recent.popitem(last=False)
            return state

    def _forget(self, path: str) -> None:
        with self._lock:
            for p in [p for p in list(self._states.keys())
                      if p == path or p.startswith(path + ".")]:
                self._states.pop(p, None)
                self._recent.pop(p, None)


@_translate_faults()
class Account:
    """One user's Maildir++ tree."""

    def __init__(self, store: MailStore, address: str, path: str):
        self.store = store
        self.address = address
        self.path = path

    # -- final delivery ------------------------------------------------------------------------
    def deliver(self, header: bytes, message_path: str | None = None, data: bytes = b"",
                hostname: str | None = None) -> str:
        """Deliver `header` + the message (a file, or `data`) into the INBOX's new/, durably.

        Creates the Maildir if needed; returns the path of the new file. Raises OSError (disk
        full, a broken Maildir) with nothing left behind, UnsafePath if the Maildir resolves
        outside mail_dir. Blocking: call it in the io pool."""
        self.store.prove(self.path, _maildir.SUBDIRS)
        return _maildir.deliver(self.path, header, message_path=message_path, data=data,
                                hostname=hostname)

    def deliver_once(self, header: bytes, message_path: str, *, when: float, unique: str,
                     hostname: str | None = None, recheck: bool = False) -> tuple[str, bool]:
        """The queue's delivery: the file name is fixed by (when, unique), and with `recheck`
        a copy already in new/ or cur/ is found instead of written again; returns (path,
        written). See maildir.deliver_once and docs/design/maildir.md, "Exactly once"."""
        self.store.prove(self.path, _maildir.SUBDIRS)
        return _maildir.deliver_once(self.path, header, message_path, when=when, unique=unique,
                                     hostname=hostname, recheck=recheck)

    # -- layout --------------------------------------------------------------------------------
    def ensure_layout(self) -> None:
        """Create the Maildir and Sent, Drafts, Trash, Junk, Archive (subscribed) if missing."""
        self.store.prove(self.path, _maildir.SUBDIRS)
        make_maildir(self.path, subfolder=False)
        subscribed = set(self.subscriptions())
        for name in SPECIAL_USE:
            path = self._path_of(name)
            self.store.prove(path, _maildir.SUBDIRS)
            if not os.path.isdir(os.path.join(path, "cur")):
                make_maildir(path, subfolder=True)
            if name not in subscribed:
                self.subscribe(name)

    def special_use(self, name: str) -> str | None:
        """The RFC 6154 attribute of a folder name (e.g. "\\Sent"), or None."""
        return SPECIAL_USE.get(name)

    def list_folders(self) -> list[str]:
        """Every existing folder's IMAP name ("INBOX", "Sent", "Archive/2026"); INBOX first."""
        names = []
        try:
            entries = os.listdir(self.path)
        except FileNotFoundError:
            return []
        for entry in entries:
            # "..DELETED..." and other names starting with ".." are never folders (see delete).
            if not entry.startswith(".") or entry.startswith("..") or entry in (".", ".."):
                continue
            if not os.path.isdir(os.path.join(self.path, entry, "cur")):
                continue
            try:
                names.append(decode_folder_dir(entry))
            except ValueError:
                continue
        names.sort()
        if os.path.isdir(os.path.join(self.path, "cur")):
            names.insert(0, "INBOX")
        return names

    def folder_exists(self, name: str) -> bool:
        try:
            return os.path.isdir(os.path.join(self._path_of(name), "cur"))
        except InvalidMailboxName:
            return False

    def has_children(self, name: str) -> bool:
        prefix = canonical_name(name) + DELIMITER
        return any(n.startswith(prefix) for n in self.list_folders())

    def folder(self, name: str) -> "Folder":
        """An existing folder (INBOX case-insensitively); NoSuchFolder otherwise."""
        name = canonical_name(name)
        path = self._path_of(name)
        self.store.prove(path, _maildir.SUBDIRS)
        if not os.path.isdir(os.path.join(path, "cur")):
            if name == "INBOX":
                # INBOX always exists for a valid user (the first delivery creates it anyway).
                make_maildir(path, subfolder=False)
            else:
                raise NoSuchFolder(f"no folder named {name}")
        return Folder(self, name, path)

    def create_folder(self, name: str) -> "Folder":
        """Create a folder; FolderExists, InvalidMailboxName."""
        name = canonical_name(name)
        path = self._path_of(name)
        if name == "INBOX" or os.path.exists(path):
            raise FolderExists(f"folder {name} already exists")
        self.store.prove(self.path, _maildir.SUBDIRS)
        self.store.prove(path, _maildir.SUBDIRS)
        if not os.path.isdir(os.path.join(self.path, "cur")):
            make_maildir(self.path, subfolder=False)
        make_maildir(path, subfolder=True)
        return Folder(self, name, path)

    def delete_folder(self, name: str) -> None:
        """Delete a folder and its messages (not its children); INBOX cannot be deleted."""
        name = canonical_name(name)
        if name == "INBOX":
            raise MailboxError("INBOX cannot be deleted")
        path = self._path_of(name)
        if not os.path.isdir(path):
            raise NoSuchFolder(f"no folder named {name}")
        self.store.prove(path)
        # Rename first (atomic: the folder vanishes at once for every session), then remove.
        # A name starting with ".." is never listed as a folder (Dovecot does the same).
        trash = os.path.join(self.path, f"..DELETED.{secrets.token_hex(6)}")
        os.rename(path, trash)
        self.store._forget(path)
        shutil.rmtree(trash, ignore_errors=True)
        if name in self.subscriptions():
            self.unsubscribe(name)

    def rename_folder(self, old: str, new: str) -> None:
        """Rename a folder and its children. Renaming INBOX moves its messages into the new
        folder and leaves INBOX empty (RFC 3501 6.3.5)."""
        old, new = canonical_name(old), canonical_name(new)
        new_path = self._path_of(new)
        if new == "INBOX" or os.path.exists(new_path):
            raise FolderExists(f"folder {new} already exists")
        if old == "INBOX":
            source = self.folder("INBOX")
            dest = self.create_folder(new)
            source.move([m.uid for m in source.sync()], dest)
            return
        old_path = self._path_of(old)
        children = [n for n in self.list_folders() if n.startswith(old + DELIMITER)]
        if not os.path.isdir(old_path) and not children:
            raise NoSuchFolder(f"no folder named {old}")
        if new.startswith(old + DELIMITER) or new == old:
            raise InvalidMailboxName("cannot rename a folder into itself")
        moves = [(old, new)] if os.path.isdir(old_path) else []
        moves += [(c, new + c[len(old):]) for c in children]
        for _, dst in moves:
            if os.path.exists(self._path_of(dst)):
                raise FolderExists(f"folder {dst} already exists")
        subscribed = set(self.subscriptions())
        for src, dst in moves:
            self.store.prove(self._path_of(src))
            self.store.prove(self._path_of(dst))
        for src, dst in moves:
            self.store._forget(self._path_of(src))
            os.rename(self._path_of(src), self._path_of(dst))
            if src in subscribed:
                self.unsubscribe(src)
                self.subscribe(dst)

    # -- subscriptions (Dovecot's `subscriptions` file in the Maildir root) -------------------
    def subscribe(self, name: str) -> None:
        name = canonical_name(name)
        with self.store._lock:
            names = self._read_subscriptions()
            if name not in names:
                names.append(name)
                self._write_subscriptions(names)

    def unsubscribe(self, name: str) -> None:
        name = canonical_name(name)
        with self.store._lock:
            names = self._read_subscriptions()
            if name in names:
                names.remove(name)
                self._write_subscriptions(names)

    def subscriptions(self) -> list[str]:
        """Subscribed names from Dovecot's `subscriptions` file."""
        with self.store._lock:
            return self._read_subscriptions()

    def _read_subscriptions(self) -> list[str]:
        try:
            with open(os.path.join(self.path, "subscriptions"), "rb") as f:
                lines = f.read().decode("utf-8", "replace").split("\n")
        except FileNotFoundError:
            return []
        if lines and lines[0].startswith("V\t"):
            # Dovecot 2.3 format: "V\t2", a blank line, then one name per line with TAB
            # between hierarchy levels, each level tab-escaped (\x01 + 1/t/r/n).
            return [DELIMITER.join(_tab_unescape(part) for part in line.split("\t"))
                    for line in lines[2:] if line]
        result = []
        for line in lines:
            if line:
                try:
                    result.append(line.encode("ascii").decode("imap4-utf-7"))
                except (UnicodeError, ValueError):
                    result.append(line)
        return result

    def _write_subscriptions(self, names: list[str]) -> None:
        self.store.prove(self.path, _maildir.SUBDIRS)
        if not os.path.isdir(self.path):
            make_maildir(self.path, subfolder=False)
        data = "V\t2\n\n" + "".join(
            "\t".join(_tab_escape(part) for part in n.split(DELIMITER)) + "\n" for n in names)
        atomic_write(os.path.join(self.path, "subscriptions"), data.encode("utf-8"))

    # -- POP3 maildrop lock ----------------------------------------------------------------------
    def lock_maildrop(self) -> "MaildropLock | None":
        """An exclusive lock on INBOX for one POP3 session (RFC 1939 section 8), or None if
        another session (in any process) holds it. flock() conflicts between open files even
        within one process, and the kernel drops it when a process dies."""
        self.store.prove(self.path, _maildir.SUBDIRS)
        make_maildir(self.path, subfolder=False)
        fd = os.open(os.path.join(self.path, "mailsuite-pop3.lock"),
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return MaildropLock(fd)

    def _path_of(self, name: str) -> str:
        name = canonical_name(name)
        if name == "INBOX":
            return self.path
        return os.path.join(self.path, encode_folder_dir(name))


class MaildropLock:
    def __init__(self, fd: int):
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


@_translate_faults("messages", "get", "recent")
class Folder:
    """One Maildir (INBOX or a .Sub folder). Keep one instance per IMAP session/selection:
    it remembers which messages this session saw first (\\Recent)."""

    def __init__(self, account: Account, name: str, path: str):
        self.account = account
        self.name = name
        self.path = path
        self._state = account.store._state(path)
        self._recent: set[int] = set()

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
        """UIDs this Folder instance was first to see (approximate \\Recent)."""
        return frozenset(self._recent)

    def sync(self) -> list[MessageInfo]:
        """Pick up changes (new/ -> cur/, UIDs for new files), return messages in UID order."""
        state = self._state
        with state.lock:
            state.sync()
            if state.unclaimed_recent:
                self._recent |= state.unclaimed_recent
                state.unclaimed_recent = set()
            return state.messages()

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
        for attempt in range(2):
            with state.lock:
                if attempt:
                    # Renamed by a flag change elsewhere, or expunged: list cur/ again.
                    state.invalidate()
                if attempt or not state.synced:
                    state.sync()
                info = state.infos.get(uid)
                if info is None:
                    raise NoSuchMessage(f"no message with UID {uid}")
                try:
                    return open(info.path, "rb")
                except FileNotFoundError:
                    continue
        raise NoSuchMessage(f"message UID {uid} has disappeared")

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
        self._prove()
        state = self._state
        tmp_path = os.path.join(self.path, "tmp", unique_key(0) + ".part")
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                if isinstance(data, (bytes, bytearray, memoryview)):
                    f.write(data)
                else:
                    shutil.copyfileobj(data, f, 1024 * 1024)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            if internaldate is not None:
                os.utime(tmp_path, (internaldate, internaldate))
            mtime = os.stat(tmp_path).st_mtime
            key = unique_key(size)
            with state.lock:
                letters = flags_to_letters(flags, state.keywords_for(flags))
                final = os.path.join(self.path, "cur", info_name(key, letters))
                os.rename(tmp_path, final)
                fsync_dir(os.path.join(self.path, "cur"))
                state.meta[key] = (size, mtime)
                (uid,) = state.register([key], {key: os.path.basename(final)})
                return uid
        finally:
            try:
                os.unlink(tmp_path)
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
        # in opposite directions must not deadlock).
        with dstate.lock:
            for info, src_path in sources:
                key = unique_key(info.size)
                letters = flags_to_letters(info.flags, dstate.keywords_for(info.flags))
                target = os.path.join(cur, info_name(key, letters))
                try:
                    os.link(src_path, target)
                except FileNotFoundError:
                    continue  # its flags changed (renamed) or it was expunged meanwhile
                except OSError:
                    tmp = os.path.join(dest.path, "tmp", key)
                    shutil.copy2(src_path, tmp)
                    with open(tmp, "rb+") as f:
                        os.fsync(f.fileno())
                    os.rename(tmp, target)
                dstate.meta[key] = (info.size, info.internaldate)
                pairs_keys.append((info.uid, key))
                names[key] = os.path.basename(target)
            if not pairs_keys:
                return []
            fsync_dir(cur)
            new_uids = dstate.register([k for _, k in pairs_keys], names)
        return [(old, new) for (old, _), new in zip(pairs_keys, new_uids)]

    def move(self, uids: Iterable[int], dest: "Folder") -> list[tuple[int, int]]:
        """Move messages (RFC 6851 semantics); returns (source uid, new uid) pairs.
        A rename keeps the Maildir key, so POP3/IMAP identity survives the move."""
        if dest.path == self.path:
            return [(u, u) for u in sorted(set(uids))]
        self._prove()
        dest._prove()
        sources = self._sources(uids)
        dstate = dest._state
        moved: list[tuple[int, str]] = []
        names: dict[str, str] = {}
        cur = os.path.join(dest.path, "cur")
        with dstate.lock:
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
                try:
                    os.rename(src_path, target)
                except FileNotFoundError:
                    continue
                dstate.meta[key] = (info.size, info.internaldate)
                moved.append((info.uid, key))
                names[key] = os.path.basename(target)
            if not moved:
                return []
            fsync_dir(cur)
            fsync_dir(os.path.join(self.path, "cur"))
            new_uids = dstate.register([k for _, k in moved], names)
        with self._state.lock:
            self._state.forget_uids([u for u, _ in moved])
        return [(old, new) for (old, _), new in zip(moved, new_uids)]

    def expunge(self, uids: Iterable[int] | None = None) -> list[int]:
        """Remove messages: the given UIDs, or (None) every message flagged \\Deleted.
        Returns the UIDs actually removed, ascending."""
        self._prove()
        state = self._state
        with state.lock:
            self.sync()
            if uids is None:
                targets = [i for i in state.infos.values() if "\\Deleted" in i.flags]
            else:
                wanted = set(uids)
                targets = [state.infos[u] for u in sorted(wanted) if u in state.infos]
            removed = []
            for info in targets:
                path = self._current_path(info)
                if path is not None:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
                removed.append(info.uid)
            if removed:
                fsync_dir(os.path.join(self.path, "cur"))
                state.forget_uids(removed)
            return removed

    # -- helpers --------------------------------------------------------------------------------
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
                                               info.internaldate, new_name, info.cur_dir)
                state._changed()
                return stored
            raise NoSuchMessage(f"message UID {uid} has disappeared")


class _FolderState:
    """What this process knows about one folder, shared by all its Folder objects.

    sync() of an unchanged folder costs a stat of new/, cur/, dovecot-uidlist and
    dovecot-keywords. A changed folder lists only the changed directory, stats only files it
    has never seen, and appends to dovecot-uidlist (as Dovecot does) instead of rewriting it.
    Sizes and INTERNALDATEs are kept in `mailsuite-index` (append-only, compacted now and then)
    so a fresh process does not stat every file either."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.RLock()
        self.uidlist: UidList | None = None
        self.uidlist_stamp: tuple | None = None
        self.keywords: list[str] = []
        self.keywords_stamp: tuple | None = None
        self.files: dict[str, str] = {}  # key -> file name in cur/
        self.cur_mtime: int | None = None
        self.new_mtime: int | None = None
        self.meta: dict[str, tuple[int, float]] = {}  # key -> (size, internaldate)
        self.meta_loaded = False
        self.meta_pending: list[str] = []  # keys whose meta is not in mailsuite-index yet
        self.meta_lines = 0
        self.infos: dict[int, MessageInfo] = {}
        self.snapshot: list[MessageInfo] | None = None
        self.synced = False
        self.unclaimed_recent: set[int] = set()
        self.generation = 0
        self.cur_prefix = os.path.join(path, "cur", "")
        self.flag_cache: dict[str, frozenset] = {}  # info letters -> IMAP flags

    # -- the sync algorithm -----------------------------------------------------------------
    def sync(self) -> None:
        path = self.path
        new_dir = os.path.join(path, "new")
        cur_dir = os.path.join(path, "cur")
        try:
            st_new = os.stat(new_dir)
            st_cur = os.stat(cur_dir)
        except FileNotFoundError:
            raise NoSuchFolder("folder was deleted")
        now_ns = time.time_ns()
        recent_new: list[str] = []
        if st_new.st_mtime_ns != self.new_mtime:
            recent_new = self._move_new_to_cur(new_dir, cur_dir)
            # A directory changed within the last second may change again within the same
            # mtime tick: do not trust the cached mtime until it has settled.
            self.new_mtime = st_new.st_mtime_ns if now_ns - st_new.st_mtime_ns > 1e9 else None
            if recent_new:
                st_cur = os.stat(cur_dir)
        touched: set[str] = set()  # keys added or renamed (flag change) in cur/
        removed: set[str] = set()
        if st_cur.st_mtime_ns != self.cur_mtime:
            files = {}
            intern = sys.intern  # one string per key, shared with dovecot-uidlist's dict
            for n in os.listdir(cur_dir):
                if n[0] != ".":
                    files[intern(n.split(":", 1)[0])] = n
            old = self.files
            if old:
                touched = {k for k, n in files.items() if old.get(k) != n}
                removed = old.keys() - files.keys()
            else:
                touched = set(files)
            self.files = files
            self.cur_mtime = st_cur.st_mtime_ns if now_ns - st_cur.st_mtime_ns > 1e9 else None
        full = not self.synced
        reload = self._reload_uidlist()
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
            self.register(sorted(unknown, key=_delivery_order))
            uids = self.uidlist.uids
        if full:
            self._rebuild_all()
        elif touched or removed:
            self._update(touched, removed)
        for key in recent_new:
            uid = uids.get(key)
            if uid is not None and uid in self.infos:
                self.unclaimed_recent.add(uid)
        self.synced = True
        if self.meta_pending:
            self._save_meta()

    def messages(self) -> list[MessageInfo]:
        """The current list (shared: callers must not modify it)."""
        if self.snapshot is None:
            self.snapshot = list(self.infos.values())
        return self.snapshot

    def _move_new_to_cur(self, new_dir: str, cur_dir: str) -> list[str]:
        """Maildir: a reader moves new/ mail to cur/ with an empty info (':2,')."""
        moved = []
        for name in os.listdir(new_dir):
            if name.startswith("."):
                continue
            key, letters = split_name(name)
            try:
                os.rename(os.path.join(new_dir, name),
                          os.path.join(cur_dir, info_name(key, letters)))
            except FileNotFoundError:
                continue  # another session moved it first
            moved.append(key)
        return moved

    def _make_info(self, uid: int, key: str, name: str) -> MessageInfo | None:
        meta = self._meta_for(key)
        if meta is None:
            meta = self._stat_meta(key, self.cur_prefix + name)
            if meta is None:
                return None
        letters = name.partition(":2,")[2]
        flags = self.flag_cache.get(letters)
        if flags is None:
            flags = self.flag_cache[letters] = letters_to_flags(letters, self.keywords)
        return MessageInfo(uid, key, flags, meta[0], meta[1], name, self.cur_prefix)

    def _meta_for(self, key: str) -> tuple[int, float] | None:
        """(size, internaldate) from the index, or from the message we already list."""
        meta = self.meta.get(key)
        if meta is not None:
            return meta
        uid = self.uidlist.uids.get(key) if self.uidlist else None
        info = self.infos.get(uid) if uid is not None else None
        if info is not None and info.key == key:
            return (info.size, info.internaldate)
        return None

    def _rebuild_all(self) -> None:
        uids = self.uidlist.uids if self.uidlist else {}
        self._load_meta()
        files = self.files
        infos: dict[int, MessageInfo] = {}
        old = self.infos
        for uid, key in sorted((uids[k], k) for k in files if k in uids):
            name = files[key]
            prev = old.get(uid)
            if prev is not None and prev.key == key and prev.name == name:
                infos[uid] = prev
                continue
            info = self._make_info(uid, key, name)
            if info is not None:
                infos[uid] = info
        self.infos = infos
        self._changed()
        if not self.meta_pending:
            self._drop_listed_meta()

    def _update(self, touched: set[str], removed: set[str]) -> None:
        uids = self.uidlist.uids if self.uidlist else {}
        infos = self.infos
        for key in removed:
            uid = uids.get(key)
            info = infos.get(uid) if uid is not None else None
            if info is not None and info.key == key:
                del infos[uid]
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

    # -- UIDs -----------------------------------------------------------------------------
    def ensure_uidlist(self) -> UidList:
        self._reload_uidlist()
        if self.uidlist is None:
            self.register([])
        return self.uidlist

    def _reload_uidlist(self):
        """False if unchanged; "full" if re-read; else the set of keys appended since."""
        path = os.path.join(self.path, UIDLIST)
        stamp = file_stamp(path)
        old = self.uidlist_stamp
        if stamp == old and self.uidlist is not None:
            return False
        self.uidlist_stamp = stamp
        if (stamp is not None and old is not None and self.uidlist is not None
                and stamp[0] == old[0] and stamp[1] > old[1]):
            # Same file, grown: only lines were appended (a rewrite is a rename: new inode).
            try:
                with open(path, "rb") as f:
                    f.seek(old[1])
                    tail = f.read()
                if tail.endswith(b"\n"):
                    return self.uidlist.add_lines(tail)
            except OSError:
                pass
        try:
            self.uidlist = read_uidlist(path)
        except (ValueError, IndexError):
            self.uidlist = None  # corrupt: rebuilt with a new UIDVALIDITY
        return "full"

    def register(self, keys: list[str], names: dict[str, str] | None = None) -> list[int]:
        """Give each key a UID (existing ones keep theirs) under the dotlock; returns them."""
        path = os.path.join(self.path, UIDLIST)
        with DotLock(path):
            # Re-read under the lock: another process may have assigned UIDs since.
            reload = self._reload_uidlist()
            ul = self.uidlist
            if reload == "full":
                self.synced = False  # our view of UIDs must be rebuilt at the next sync
            fresh = ul is None
            if fresh:
                ul = UidList.new()
            result = []
            added = []
            for key in keys:
                uid = ul.uids.get(key)
                if uid is None:
                    uid = ul.nextuid
                    ul.nextuid += 1
                    ul.uids[key] = uid
                    added.append((uid, key))
                result.append(uid)
            if fresh:
                atomic_write(path, ul.serialize())
            elif added:
                # Append, as Dovecot does; readers take max(N, last UID + 1) as next UID.
                with _open_append(path, "ab+") as f:
                    if f.tell() > 0:
                        f.seek(-1, os.SEEK_END)
                        if f.read(1) != b"\n":
                            f.write(b"\n")  # another tool left the last line unterminated
                    f.write("".join(f"{u} :{k}\n" for u, k in added)
                            .encode("utf-8", "surrogateescape"))
                    f.flush()
                    os.fsync(f.fileno())
            self.uidlist = ul
            self.uidlist_stamp = file_stamp(path)
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
                if key in self.meta:
                    self.meta_pending.append(key)
            self._changed()
            self._save_meta()
        return result

    def forget_uids(self, uids: list[int]) -> None:
        """Drop expunged/moved messages from dovecot-uidlist (their UIDs are never reused:
        N<nextuid> stays)."""
        gone = set(uids)
        path = os.path.join(self.path, UIDLIST)
        with DotLock(path):
            self._reload_uidlist()
            ul = self.uidlist
            if ul is not None:
                # While we rewrite anyway, drop lines whose file is gone (deleted by another
                # tool): if such a file came back it must get a new UID, not its old one.
                # Safe under the lock: every writer renames its file into place before it
                # registers the UID.
                present = set()
                for sub in ("new", "cur"):
                    present.update(n.split(":", 1)[0]
                                   for n in os.listdir(os.path.join(self.path, sub)))
                for k in [k for k, u in ul.uids.items() if u in gone or k not in present]:
                    del ul.uids[k]
                    ul.extra.pop(k, None)
                atomic_write(path, ul.serialize())
                self.uidlist_stamp = file_stamp(path)
        for uid in gone:
            info = self.infos.pop(uid, None)
            if info is not None:
                self.files.pop(info.key, None)
                self.meta.pop(info.key, None)
        self.unclaimed_recent -= gone
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
        with DotLock(path):
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
        entries = []
        for key in self.meta_pending:
            meta = self._meta_for(key)
            if meta is not None:
                entries.append((key, meta))
        self.meta_pending = []
        try:
            if self.meta_lines and self.meta_lines + len(entries) < 2 * len(self.files) + 1000:
                with _open_append(path, "ab") as f:
                    f.write("".join(f"{k}\t{m[0]}\t{m[1]!r}\n" for k, m in entries)
                            .encode("utf-8", "surrogateescape"))
                self.meta_lines += len(entries)
            else:
                live = {i.key: (i.size, i.internaldate) for i in self.infos.values()}
                for key, meta in entries:
                    live.setdefault(key, meta)
                out = ["mailsuite-index 1"]
                out += [f"{k}\t{m[0]}\t{m[1]!r}" for k, m in live.items()]
                atomic_write(path, ("\n".join(out) + "\n").encode("utf-8", "surrogateescape"))
                self.meta_lines = len(live)
        except OSError:
            pass  # a cache: failing to write it costs speed, not correctness
        self._drop_listed_meta()

    def _drop_listed_meta(self) -> None:
        infos, uids = self.infos, (self.uidlist.uids if self.uidlist else {})
        if self.meta:
            self.meta = {k: m for k, m in self.meta.items()
                         if (u := uids.get(k)) is None or u not in infos}


def _open_append(path: str, mode: str) -> BinaryIO:
    """open(path, mode) for appending, refusing a symlink planted in place of the file."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
    if "+" in mode:
        flags = (flags & ~os.O_WRONLY) | os.O_RDWR
    return cast(BinaryIO, os.fdopen(os.open(path, flags, 0o600), mode))


def _ascending(infos: dict[int, MessageInfo]) -> bool:
    prev = 0
    for uid in infos:
        if uid < prev:
            return False
        prev = uid
    return True


# -- names -----------------------------------------------------------------------------------
_FORBIDDEN = set("\\*%") | {chr(c) for c in range(32)} | {"\x7f"}


def canonical_name(name: str) -> str:
    """Validate an IMAP folder name (already decoded from modified UTF-7) and return it with
    INBOX normalised. Raises InvalidMailboxName for anything that could leave the Maildir."""
    if not isinstance(name, str) or not name:
        raise InvalidMailboxName("empty mailbox name")
    if name.upper() == "INBOX":
        return "INBOX"
    parts = name.split(DELIMITER)
    if parts[0].upper() == "INBOX":
        parts[0] = "INBOX"
    for part in parts:
        if not part:
            raise InvalidMailboxName("empty hierarchy level in mailbox name")
        if part.startswith("."):
            raise InvalidMailboxName("mailbox names cannot begin with '.'")
        if any(c in _FORBIDDEN for c in part):
            raise InvalidMailboxName("mailbox name contains a forbidden character")
        if part.strip() != part:
            raise InvalidMailboxName("mailbox name begins or ends with a space")
    result = DELIMITER.join(parts)
    if len(encode_folder_dir(result)) > 250:
        raise InvalidMailboxName("mailbox name too long")
    return result


def encode_folder_dir(name: str) -> str:
    """IMAP name -> Maildir++ directory: "Archive/2026" -> ".Archive.2026" (modified UTF-7
    as Dovecot stores it; a '.' inside a name is written as its UTF-7 form '&AC4-')."""
    parts = []
    for part in name.split(DELIMITER):
        enc = part.encode("imap4-utf-7").decode("ascii")
        parts.append(enc.replace(".", "&AC4-"))
    return "." + ".".join(parts)


def decode_folder_dir(entry: str) -> str:
    parts = entry[1:].split(".")
    if not all(parts):
        raise ValueError(entry)
    return DELIMITER.join(p.encode("ascii").decode("imap4-utf-7") for p in parts)


_TAB_ESCAPES = {"\x01": "1", "\t": "t", "\r": "r", "\n": "n"}
_TAB_UNESCAPES = {v: k for k, v in _TAB_ESCAPES.items()}


def _tab_escape(text: str) -> str:
    """Dovecot's str_append_tabescaped()."""
    return "".join("\x01" + _TAB_ESCAPES[c] if c in _TAB_ESCAPES else c for c in text)


def _tab_unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\x01" and i + 1 < len(text):
            out.append(_TAB_UNESCAPES.get(text[i + 1], text[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _valid_keyword(flag: str) -> bool:
    # RFC 3501 atom: no specials, no spaces; stored in a file whose format is space-separated.
    return bool(flag) and all(33 <= ord(c) < 127 and c not in '(){%*"\\]' for c in flag)


_LEADING_DIGITS = re.compile(r"\d+")


def _delivery_order(key: str) -> tuple:
    """New files get UIDs in delivery order: `<sec>.M<usec>...` sorted numerically (what
    follows the digits is P<pid> for our fresh names, Q<queue id> for queue deliveries)."""
    sec, _, rest = key.partition(".")
    usec = 0
    if rest.startswith("M"):
        m = _LEADING_DIGITS.match(rest, 1)
        usec = int(m.group()) if m else 0
    return (int(sec) if sec.isdigit() else 0, usec, key)

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
Folder lives in `folder.py`, exceptions in `errors.py`, folder names in `names.py`, the
per-folder index that Folders share in `index.py`; all are importable from here.
"""
from __future__ import annotations

import collections
import fcntl
import os
import secrets
import shutil
import stat
import threading
import weakref
from typing import Callable, Iterable

import twisted.mail.imap4  # noqa: F401  (registers the "imap4-utf-7" codec for folder names)

from mailsuite.directory.addresses import mailbox_local_problem
from mailsuite.mailbox.maildir import FLAG_LETTERS, flags_to_letters, make_maildir
from mailsuite.mailbox import maildir as _maildir
from mailsuite.mailbox.dotlock import DEFAULT_RULES, LockRules
from mailsuite.mailbox.errors import (  # noqa: F401 (the store's public exceptions)
    FolderExists, InvalidMailboxName, LockBusy, MailboxError, NoSuchFolder, NoSuchMessage,
    StoreUnavailable, UnsafePath, translate_faults,
)
from mailsuite.mailbox.folder import Folder
from mailsuite.mailbox.index import FolderIndex, MessageInfo  # noqa: F401 (public)
from mailsuite.mailbox.memo import FileMemo
from mailsuite.mailbox.names import (  # noqa: F401 (public through the store)
    DELIMITER, SPECIAL_USE, _tab_escape, _tab_unescape, canonical_name, decode_folder_dir,
    encode_folder_dir,
)
from mailsuite.safeio import atomic_write

SYSTEM_FLAGS = frozenset(FLAG_LETTERS)


class MailStore:
    """All users' Maildirs under `mail_dir` (<mail_dir>/<domain>/<localpart>/).

    One MailStore per process: it shares each folder's in-memory index between the sessions
    of this process, so a second SELECT of a large folder costs a few stat() calls."""

    def __init__(self, mail_dir: str, max_cached_folders: int = 32,
                 folder_cache_bytes: int = 8 * 1024 * 1024,
                 lock_rules: LockRules = DEFAULT_RULES):
        self.mail_dir = os.path.abspath(mail_dir)
        self.lock_rules = lock_rules  # when a dotlock is stale (dotlock.py)
        # mail_dir itself may legitimately be a symlink (/var/mail -> /srv/mail): paths are
        # compared after resolving, against where it resolves.
        self.mail_dir_real = os.path.realpath(self.mail_dir)
        # Folder states (docs/design/maildir.md, "Folder states in memory"): a state lives while
        # a Folder (session) uses it; unused ones stay in _recent, least recently used first,
        # while they fit in max_cached_folders and folder_cache_bytes (estimated).
        self.max_cached_folders = max_cached_folders
        self.folder_cache_bytes = folder_cache_bytes
        self._states: weakref.WeakValueDictionary[str, FolderIndex] = (
            weakref.WeakValueDictionary())
        self._recent: collections.OrderedDict[str, FolderIndex] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._trim_pending = False
        # ENVELOPE/BODYSTRUCTURE of recently fetched messages (memo.py).
        self.memo = FileMemo()
        # on_delivery(address, folder), from the delivering thread, after each new delivery:
        # service.py tells IDLE sessions through it (mailsuite/notify.py).
        self.on_delivery: Callable[[str, str], None] | None = None

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
        if not self._plain_below_root(path):
            real = os.path.realpath(path)
            if not real.startswith(self.mail_dir_real + os.sep):
                raise UnsafePath(f"mailbox path leaves the mail directory: {path}")
        for sub in subdirs:
            try:
                mode = os.lstat(os.path.join(path, sub)).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(mode):
                raise UnsafePath(f"mailbox path leaves the mail directory: {path}/{sub}")

    def _plain_below_root(self, path: str) -> bool:
        """Whether `path` is mail_dir/a/b/... with no symlink (and no `.`/`..`) among a, b, ...:
        then it resolves under the resolved mail_dir without a realpath, which would lstat
        every component from `/` on (docs/design/maildir.md, "Paths"). False sends the caller
        to realpath, which decides (a symlink that stays inside mail_dir is allowed)."""
        prefix = self.mail_dir + os.sep
        if not path.startswith(prefix):
            return False
        current = self.mail_dir
        for part in path[len(prefix):].split(os.sep):
            if part in ("", ".", ".."):
                return False
            current = current + os.sep + part
            try:
                mode = os.lstat(current).st_mode
            except FileNotFoundError:
                return True  # nothing below exists yet, so nothing below can be a link
            except OSError:
                return False
            if stat.S_ISLNK(mode):
                return False
        return True

    def _state(self, path: str) -> "FolderIndex":
        with self._lock:
            state = self._states.get(path)
            if state is None:
                state = self._states[path] = FolderIndex(path, self.lock_rules)
            self._recent[path] = state
            self._recent.move_to_end(path)
            self._trim_locked()
            return state

    def _released(self) -> None:
        """A Folder went away (any thread, from its finalizer): drop unused states beyond the
        budget now, or at the next _state() if the lock is busy (never wait in a finalizer)."""
        if self._lock.acquire(blocking=False):
            try:
                self._trim_locked()
            finally:
                self._lock.release()
        else:
            self._trim_pending = True

    def _trim_locked(self) -> None:
        self._trim_pending = False
        unused = [(p, s) for p, s in self._recent.items() if not s.in_use()]
        count = len(unused)
        total = sum(s.memory_estimate() for _, s in unused)
        for path, state in unused:  # least recently used first
            if count <= self.max_cached_folders and total <= self.folder_cache_bytes:
                break
            del self._recent[path]
            count -= 1
            total -= state.memory_estimate()

    def cached_folders(self) -> dict[str, int]:
        """Folder states held in memory though no session uses them: path -> estimated bytes
        (the accounting the budget is enforced on)."""
        with self._lock:
            if self._trim_pending:
                self._trim_locked()
            return {p: s.memory_estimate() for p, s in self._recent.items() if not s.in_use()}

    def loaded_folders(self) -> list[str]:
        """Paths of every folder state alive in this process (used or cached)."""
        with self._lock:
            return sorted(self._states.keys())

    def _forget(self, path: str) -> None:
        with self._lock:
            for p in [p for p in list(self._states.keys())
                      if p == path or p.startswith(path + ".")]:
                self._states.pop(p, None)
                self._recent.pop(p, None)


@translate_faults()
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

    def deliver_once(self, header: bytes, message_path: str | None, *, when: float,
                     unique: str, hostname: str | None = None, recheck: bool = False,
                     folder: str = "INBOX", flags: Iterable[str] = (),
                     sync_dir: bool = True, data: bytes | None = None) -> tuple[str, bool]:
        """The queue's delivery: the file name is fixed by (when, unique), and with `recheck`
        a copy already in new/ or cur/ is found instead of written again; returns (path,
        written). See maildir.deliver_once and docs/design/maildir.md, "Exactly once".

        `folder` other than INBOX (e.g. Junk, for mail the trust checks quarantine) is created
        with the account's special folders if missing; `flags` (e.g. "$Junk") are set on arrival.
        `sync_dir=False`: the caller fsyncs the directory of the returned path (group commit).
        `data`: the message itself, in memory (`message_path` None).
        """
        path = self.path
        if canonical_name(folder) != "INBOX":
            self.store.prove(self.path, _maildir.SUBDIRS)
            path = self._path_of(folder)
            self.store.prove(path, _maildir.SUBDIRS)
            if not os.path.isdir(os.path.join(path, "cur")):
                if not os.path.isdir(os.path.join(self.path, "cur")):
                    make_maildir(self.path, subfolder=False)
                make_maildir(path, subfolder=True)
                self.subscribe(folder)
        else:
            self.store.prove(path, _maildir.SUBDIRS)
        letters = None
        flags = list(flags)
        if flags:
            keywords = self.store._state(path).keywords_for(flags)
            letters = flags_to_letters(flags, keywords)
        result = _maildir.deliver_once(path, header, message_path, when=when, unique=unique,
                                       hostname=hostname, recheck=recheck, letters=letters,
                                       sync_dir=sync_dir, data=data)
        if result[1] and self.store.on_delivery is not None:
            self.store.on_delivery(self.address, folder)
        return result

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
        # The subscription stays: RFC 3501 §6.3.6 forbids removing it unilaterally.

    def rename_folder(self, old: str, new: str) -> None:
        """Rename a folder and its children. Renaming INBOX moves its messages into the new
        folder and leaves INBOX empty (RFC 3501 6.3.5)."""
        old, new = canonical_name(old), canonical_name(new)
        new_path = self._path_of(new)
        if new == "INBOX" or os.path.exists(new_path):
            raise FolderExists(f"folder {new} already exists")
        if old == "INBOX":
            source = self.folder("INBOX")
            # Locked before the new folder exists: a busy INBOX leaves nothing behind.
            with source._state.hold_uidlist():
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

"""The Maildir++ mailbox store, compatible with Dovecot's on-disk layout.

INBOX is the user's Maildir itself; folder `Archive/2026` is the directory `.Archive.2026/`.
Each folder keeps Dovecot's `dovecot-uidlist` (UIDs, UIDVALIDITY) and `dovecot-keywords`
(keyword letters a-z), flags live in the file name (`:2,FRS`). Everything here is synchronous and
blocking: protocol code calls it through `suite.pools.io.run(...)`.

Public API (used by IMAP, POP3, delivery and the tests):
    MailStore(mail_dir).account(address) -> Account
    Account: ensure_layout, list_folders, folder, create_folder, delete_folder, rename_folder,
             subscribe, unsubscribe, subscriptions, special_use, folder_exists
    Folder:  sync, messages, get, uidvalidity, uidnext, open_message, set_flags, append,
             copy, move, expunge, keywords, state_token, recent
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Iterable


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


# RFC 6154 attributes of the folders every account gets on first login.
SPECIAL_USE: dict[str, str] = {
    "Sent": "\\Sent",
    "Drafts": "\\Drafts",
    "Trash": "\\Trash",
    "Junk": "\\Junk",
    "Archive": "\\Archive",
}

# IMAP system flags <-> Maildir info letters (https://cr.yp.to/proto/maildir.html).
FLAG_LETTERS: dict[str, str] = {
    "\\Draft": "D",
    "\\Flagged": "F",
    "\\Answered": "R",
    "\\Seen": "S",
    "\\Deleted": "T",
}
SYSTEM_FLAGS = frozenset(FLAG_LETTERS)
DELIMITER = "/"


@dataclass(frozen=True)
class MessageInfo:
    """One message of a folder as of the last sync().

    key: the Maildir base name before ':2,' (POP3 UIDL, stable identity).
    flags: IMAP flags (system flags and keywords; never \\Recent).
    size: octets of the stored file (CRLF line endings), internaldate: POSIX time.
    path: absolute path of the file as of the last sync (it changes when flags change).
    """

    uid: int
    key: str
    flags: frozenset
    size: int
    internaldate: float
    path: str


class MailStore:
    """All users' Maildirs under `mail_dir` (<mail_dir>/<domain>/<localpart>/)."""

    def __init__(self, mail_dir: str):
        self.mail_dir = mail_dir

    def account(self, address: str) -> "Account":
        """The account of a canonical address (does not create anything on disk)."""
        raise NotImplementedError


class Account:
    """One user's Maildir++ tree."""

    def __init__(self, store: MailStore, address: str, path: str):
        self.store = store
        self.address = address
        self.path = path

    def ensure_layout(self) -> None:
        """Create the Maildir and Sent, Drafts, Trash, Junk, Archive (subscribed) if missing."""
        raise NotImplementedError

    def special_use(self, name: str) -> str | None:
        """The RFC 6154 attribute of a folder name (e.g. "\\Sent"), or None."""
        raise NotImplementedError

    def list_folders(self) -> list[str]:
        """Every existing folder's IMAP name ("INBOX", "Sent", "Archive/2026"), sorted."""
        raise NotImplementedError

    def folder_exists(self, name: str) -> bool:
        raise NotImplementedError

    def folder(self, name: str) -> "Folder":
        """An existing folder (INBOX case-insensitively); NoSuchFolder otherwise."""
        raise NotImplementedError

    def create_folder(self, name: str) -> "Folder":
        """Create a folder; FolderExists, InvalidMailboxName."""
        raise NotImplementedError

    def delete_folder(self, name: str) -> None:
        """Delete a folder and its messages (not its children); INBOX cannot be deleted."""
        raise NotImplementedError

    def rename_folder(self, old: str, new: str) -> None:
        """Rename a folder and its children. Renaming INBOX moves its messages (RFC 3501 6.3.5)."""
        raise NotImplementedError

    def subscribe(self, name: str) -> None:
        raise NotImplementedError

    def unsubscribe(self, name: str) -> None:
        raise NotImplementedError

    def subscriptions(self) -> list[str]:
        """Subscribed names from Dovecot's `subscriptions` file."""
        raise NotImplementedError


class Folder:
    """One Maildir (INBOX or a .Sub folder). Keep one instance per IMAP session/selection:
    it remembers which messages this session saw first (\\Recent)."""

    def __init__(self, account: Account, name: str, path: str):
        self.account = account
        self.name = name
        self.path = path

    @property
    def uidvalidity(self) -> int:
        raise NotImplementedError

    @property
    def uidnext(self) -> int:
        raise NotImplementedError

    @property
    def keywords(self) -> list[str]:
        """Keywords known in this folder's dovecot-keywords (index = letter a..z)."""
        raise NotImplementedError

    @property
    def recent(self) -> frozenset:
        """UIDs this Folder instance was first to see (approximate \\Recent)."""
        raise NotImplementedError

    def sync(self) -> list[MessageInfo]:
        """Pick up changes (new/ -> cur/, UIDs for new files), return messages in UID order."""
        raise NotImplementedError

    def messages(self) -> list[MessageInfo]:
        """The result of the last sync() without touching the disk (sync() first if never)."""
        raise NotImplementedError

    def get(self, uid: int) -> MessageInfo | None:
        raise NotImplementedError

    def state_token(self) -> tuple:
        """A cheap value (stat of new/, cur/, dovecot-uidlist) that changes when sync() may
        find something new: IMAP NOOP/IDLE poll this and sync() only when it differs."""
        raise NotImplementedError

    def open_message(self, uid: int) -> BinaryIO:
        """The message file opened for binary reading; NoSuchMessage if it is gone."""
        raise NotImplementedError

    def set_flags(self, uid: int, flags: Iterable[str]) -> frozenset:
        """Replace the flags of a message; returns the flags actually stored."""
        raise NotImplementedError

    def add_flags(self, uid: int, flags: Iterable[str]) -> frozenset:
        raise NotImplementedError

    def remove_flags(self, uid: int, flags: Iterable[str]) -> frozenset:
        raise NotImplementedError

    def append(self, data: bytes | BinaryIO, flags: Iterable[str] = (),
               internaldate: float | None = None) -> int:
        """Store a message (bytes or a binary file object) with fsync; returns its UID."""
        raise NotImplementedError

    def copy(self, uids: Iterable[int], dest: "Folder") -> list[tuple[int, int]]:
        """Copy messages to `dest` with their flags; returns (source uid, new uid) pairs."""
        raise NotImplementedError

    def move(self, uids: Iterable[int], dest: "Folder") -> list[tuple[int, int]]:
        """Move messages (RFC 6851 semantics); returns (source uid, new uid) pairs."""
        raise NotImplementedError

    def expunge(self, uids: Iterable[int] | None = None) -> list[int]:
        """Remove messages: the given UIDs, or (None) every message flagged \\Deleted.
        Returns the UIDs actually removed, ascending."""
        raise NotImplementedError

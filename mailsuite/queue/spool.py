"""The durable spool: one message file and one JSON envelope per accepted message.

Contract shared with the SMTP server (which submits), the courier (remote delivery, DSNs) and the
admin CLI: `Recipient`, `QueueEntry`, `DeliveryResult`.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Literal

from mailsuite.safeio import atomic_write, fsync_dir

RecipientState = Literal["pending", "sent", "bounced"]
DeliveryStatus = Literal["sent", "deferred", "bounced"]


@dataclass
class Recipient:
    """One delivery target of a queue entry (after alias expansion)."""

    address: str  # where it goes: a canonical local mailbox or a remote address
    original: str  # the RCPT TO address it came from (for DSN Original-Recipient)
    local: bool  # True: Maildir of one of our users; False: remote SMTP
    state: RecipientState = "pending"
    attempts: int = 0
    next_attempt: float = 0.0  # epoch seconds; 0 = as soon as possible
    last_error: str = ""  # e.g. "451 4.3.0 cannot write Maildir: No space left on device"
    remote_mta: str = ""  # host that gave the last answer (DSN Remote-MTA)


@dataclass
class QueueEntry:
    """The envelope of one accepted message."""

    id: str
    sender: str  # "" is the null reverse-path <>
    recipients: list[Recipient]
    created: float  # epoch seconds when the 250 was given
    meta: dict[str, Any] = field(default_factory=dict)  # client_ip, helo, auth_user, protocol
    held: bool = False  # `mailsuite queue hold`: not attempted until released
    warned: bool = False  # the delay warning (on_delay) was sent
    # Recipients (indexes) whose bounce could not be queued yet (database down, disk full):
    # the entry stays until it is, retried at `bounce_at` (docs/design/queue.md).
    bounce_pending: list[int] = field(default_factory=list)
    bounce_at: float = 0.0


@dataclass
class DeliveryResult:
    """The outcome of one delivery attempt for one recipient."""

    address: str
    status: DeliveryStatus
    detail: str  # e.g. "550 5.1.1 no such user"
    remote_mta: str = ""
    enhanced: str = ""  # RFC 3463 code, e.g. "5.1.1"
    path: str = ""  # where a local copy was written (its Maildir file), for the event record


# --- the spool on disk ---------------------------------------------------------------------------
#
# <queue_dir>/<id>.eml   the message, exactly as accepted (CRLF), never rewritten
# <queue_dir>/<id>.json  the envelope (QueueEntry); its presence is what makes an entry exist
# <queue_dir>/.<...>.tmp files being written; renamed into place after fsync
# <queue_dir>/.kick      touched by `mailsuite queue retry`: a running server rescans at once
# <queue_dir>/incoming/  messages being received (SMTP DATA streams there); `store_file` renames
#                        one into the spool, so it must be on the same filesystem
#
# Every write is tmp -> write -> fsync -> rename -> fsync(directory), so after a crash a file is
# either complete or absent. One directory keeps that to a single directory fsync per change.
# Claims: a process works on an entry only while holding an exclusive flock on <id>.eml (the file
# that is never replaced, so every process locks the same inode); the kernel drops the lock of a
# process that dies, so a kill -9 never leaves an entry stuck.

ENVELOPE_VERSION = 1
_ID_RE = re.compile(r"^[0-9a-f]{12,40}$")
STALE_TMP_AGE = 3600.0  # a tmp file this old was left by a crash, not by a writer still at work
INCOMING = "incoming"
STALE_STAGED_AGE = 24 * 3600.0  # a staged file this old is abandoned, whoever its writer was


class SpoolError(Exception):
    """A spool operation refused (unknown id, entry busy)."""


def new_queue_id(now: float | None = None) -> str:
    """Time-ordered and unique across processes: <seconds hex><microseconds hex><random>."""
    t = time.time() if now is None else now
    return f"{int(t):08x}{int((t % 1) * 1_000_000):05x}{secrets.token_hex(4)}"


def valid_queue_id(queue_id: str) -> bool:
    return bool(_ID_RE.match(queue_id))


def entry_to_json(entry: QueueEntry) -> bytes:
    data = {"version": ENVELOPE_VERSION, **asdict(entry)}
    return json.dumps(data, indent=1, default=str).encode("utf-8")


def entry_from_json(raw: bytes) -> QueueEntry:
    data = json.loads(raw.decode("utf-8"))
    data.pop("version", None)
    recipients = [Recipient(**r) for r in data.pop("recipients")]
    return QueueEntry(recipients=recipients, **data)


def write_file_durably(directory: str, name: str, chunks: Iterator[bytes] | list[bytes],
                       sync_dir: bool = True) -> int:
    """Write <directory>/<name> atomically (safeio: hidden tmp file, fsync, rename)."""
    return atomic_write(os.path.join(directory, name), chunks, sync_dir=sync_dir)


class Claim:
    """An exclusive flock on one entry's message file; release() (or `with`) gives it back."""

    def __init__(self, spool: "Spool", queue_id: str, fd: int):
        self.spool = spool
        self.id = queue_id
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class Spool:
    """Synchronous spool operations; the runner calls them in its io pool."""

    def __init__(self, directory: str):
        self.directory = directory

    def ensure(self) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)

    # -- paths ---------------------------------------------------------------------------------
    def message_path(self, queue_id: str) -> str:
        return os.path.join(self.directory, queue_id + ".eml")

    def envelope_path(self, queue_id: str) -> str:
        return os.path.join(self.directory, queue_id + ".json")

    @property
    def incoming_dir(self) -> str:
        """Where a receiver stages a message before `store_file` takes it over."""
        return os.path.join(self.directory, INCOMING)

    @property
    def kick_path(self) -> str:
        return os.path.join(self.directory, ".kick")

    # -- writing -------------------------------------------------------------------------------
    def store(self, entry: QueueEntry, data: bytes) -> None:
        """Spool a new entry; when this returns, message and envelope survive a crash."""
        self.ensure()
        # Message first: an envelope never points at a missing message. A message without an
        # envelope (crash in between) is garbage that cleanup() removes.
        write_file_durably(self.directory, entry.id + ".eml", [data], sync_dir=False)
        write_file_durably(self.directory, entry.id + ".json", [entry_to_json(entry)])

    def store_file(self, entry: QueueEntry, staged_path: str, sync_dir: bool = True) -> None:
        """Spool a new entry from a complete message file in `incoming_dir` (SMTP DATA streams
        there), taking the file over: when this returns, message and envelope survive a crash
        and the staged name is gone. On failure the staged file is left to the caller.

        `sync_dir=False`: both files are fsynced and renamed, and the caller fsyncs the spool
        directory (the group commit, docs/design/queue.md); only then is the entry durable."""
        self.ensure()
        fd = os.open(staged_path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)  # the writer's data, before any name points at it
        finally:
            os.close(fd)
        os.rename(staged_path, self.message_path(entry.id))
        try:
            # The envelope's directory fsync also makes the message's rename durable.
            write_file_durably(self.directory, entry.id + ".json", [entry_to_json(entry)],
                               sync_dir=sync_dir)
        except BaseException:
            try:  # give the staged file back so the caller's clean-up finds it
                os.rename(self.message_path(entry.id), staged_path)
            except OSError:
                pass
            raise

    def ensure_incoming(self) -> str:
        path = self.incoming_dir
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def clean_incoming(self, now: float | None = None) -> list[str]:
        """Remove staged files of receivers that are gone: files named `<pid>.*` whose process no
        longer runs (a crash, a restart) or is this one (called at start-up, before we receive),
        and any staged file older than a day. Other processes on the same spool keep theirs."""
        now = time.time() if now is None else now
        removed: list[str] = []
        try:
            names = os.listdir(self.incoming_dir)
        except FileNotFoundError:
            return removed
        for name in names:
            path = os.path.join(self.incoming_dir, name)
            pid_text = name.split(".", 1)[0]
            try:
                if not (pid_text.isdigit() and _pid_alive(int(pid_text))
                        and now - os.lstat(path).st_mtime < STALE_STAGED_AGE):
                    os.unlink(path)
                    removed.append(name)
            except FileNotFoundError:
                continue
        return removed

    def unstore(self, queue_id: str) -> None:
        """Take back an entry whose directory fsync failed (nobody was told it exists):
        envelope first, then the message. No fsync: a crash may leave them, and then they are
        delivered, which is the at-least-once side of a 451 the client retries."""
        for path in (self.envelope_path(queue_id), self.message_path(queue_id)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def save(self, entry: QueueEntry) -> None:
        """Atomically replace the envelope (call with the entry claimed)."""
        write_file_durably(self.directory, entry.id + ".json", [entry_to_json(entry)])

    def remove(self, queue_id: str) -> None:
        """Delete an entry (call with it claimed). Envelope first: it defines existence."""
        for path in (self.envelope_path(queue_id), self.message_path(queue_id)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        # Without this a crash could bring a delivered entry back and deliver it twice.
        fsync_dir(self.directory)

    def kick(self) -> None:
        """Tell running servers to rescan now (they poll this file's mtime every second)."""
        self.ensure()
        with open(self.kick_path, "a"):
            pass
        os.utime(self.kick_path)

    def kick_mtime(self) -> int:
        try:
            return os.stat(self.kick_path).st_mtime_ns
        except FileNotFoundError:
            return 0

    # -- reading -------------------------------------------------------------------------------
    def ids(self) -> list[str]:
        """Ids of all entries with an envelope, oldest first."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names
                      if n.endswith(".json") and not n.startswith(".") and valid_queue_id(n[:-5]))

    def load(self, queue_id: str) -> QueueEntry:
        """The envelope of one entry; SpoolError if there is none."""
        if not valid_queue_id(queue_id):
            raise SpoolError(f"no queue entry {queue_id}")
        try:
            with open(self.envelope_path(queue_id), "rb") as f:
                return entry_from_json(f.read())
        except FileNotFoundError:
            raise SpoolError(f"no queue entry {queue_id}") from None
        except (ValueError, TypeError, KeyError) as e:
            raise SpoolError(f"queue entry {queue_id} has a damaged envelope: {e}") from None

    def entries(self) -> list[QueueEntry]:
        """Every readable entry; entries that vanish while we read are skipped."""
        found = []
        for queue_id in self.ids():
            try:
                found.append(self.load(queue_id))
            except SpoolError:
                continue
        return found

    def read_headers(self, queue_id: str, limit: int = 256 * 1024) -> bytes:
        """The header section of the spooled message (up to the blank line)."""
        return read_head(self.message_path(queue_id), limit)

    # -- claims --------------------------------------------------------------------------------
    def claim(self, queue_id: str) -> Claim | None:
        """Lock an entry for this process, or None if another claim holds it or it is gone."""
        if not valid_queue_id(queue_id):
            return None
        path = self.message_path(queue_id)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        # The holder before us may have delivered and removed the entry while we waited:
        # a lock on an unlinked file, or an entry without envelope, is no claim at all.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
            alive = same and os.path.exists(self.envelope_path(queue_id))
        except FileNotFoundError:
            alive = False
        if not alive:
            os.close(fd)
            return None
        return Claim(self, queue_id, fd)

    def claim_wait(self, queue_id: str, timeout: float = 10.0) -> Claim:
        """Claim for the admin CLI: wait a little for a delivery in progress to finish."""
        deadline = time.monotonic() + timeout
        while True:
            if not valid_queue_id(queue_id) or not os.path.exists(self.envelope_path(queue_id)):
                raise SpoolError(f"no queue entry {queue_id}")
            if not os.path.exists(self.message_path(queue_id)):
                raise SpoolError(f"queue entry {queue_id} is damaged: no message file")
            claim = self.claim(queue_id)
            if claim is not None:
                return claim
            if time.monotonic() > deadline:
                raise SpoolError(f"queue entry {queue_id} is being delivered right now; "
                                 f"try again in a moment")
            time.sleep(0.05)

    # -- housekeeping --------------------------------------------------------------------------
    def cleanup(self, now: float | None = None) -> list[str]:
        """Remove what crashes leave behind: stale tmp files and messages without envelope."""
        now = time.time() if now is None else now
        removed = []
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return removed
        present = set(names)
        for name in names:
            path = os.path.join(self.directory, name)
            stale = name.endswith(".tmp") and name.startswith(".")
            orphan = name.endswith(".eml") and name[:-4] + ".json" not in present
            if not (stale or orphan):
                continue
            try:
                # Young files may belong to a writer (maybe another process) still at work.
                if now - os.stat(path).st_mtime < STALE_TMP_AGE:
                    continue
                if orphan and os.path.exists(path[:-4] + ".json"):
                    continue
                os.unlink(path)
                removed.append(name)
            except FileNotFoundError:
                continue
        return removed


def read_head(path: str, limit: int = 256 * 1024) -> bytes:
    """The header section of the message file at `path` (up to the blank line, or `limit`)."""
    with open(path, "rb") as f:
        head = f.read(limit)
    end = head.find(b"\r\n\r\n")
    return head if end < 0 else head[:end + 2]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers: from a previous process that had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

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
import threading
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Iterator, Literal

from mailsuite import unique
from mailsuite.queue.instances import Instances, split_owner
from mailsuite.safeio import atomic_write, fsync_dir, write_all

Stamp = tuple[int, int]
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
# <queue_dir>/incoming/<host>/<pid>.<random>  messages being received (SMTP DATA streams there);
#                        `store_file` renames one into the spool, so it must be on the same
#                        filesystem. `<...>.env`: the envelope of a message delivered at spool
#                        time whose log lines may not be written yet (docs/design/queue.md)
# <queue_dir>/instances/<host>.<pid>.lock  held (flock) by each live process: who is gone
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


SIDECAR = ".env"  # beside a staged file: the envelope of its delivery at spool time


@dataclass
class Leftover:
    """A file of the spool that is not (yet, or any more) part of an entry: what `queue list`
    shows and what is removed once its writer is known to be gone."""

    kind: str  # "staged" | "spool-time" | "orphan" | "temporary"
    path: str
    owner: str  # instance name `<host>.<pid>`, or "" when only a lock tells (orphan, temporary)
    alive: bool  # its writer is still at work
    age: float  # seconds since its last change


class SpoolError(Exception):
    """A spool operation refused (unknown id, entry busy)."""


def new_queue_id(now: float | None = None) -> str:
    """Time-ordered and unique across processes: <seconds hex><microseconds hex><random>."""
    t = time.time() if now is None else now
    return f"{int(t):08x}{int((t % 1) * 1_000_000):05x}{unique.token_hex(4)}"


def valid_queue_id(queue_id: str) -> bool:
    return bool(_ID_RE.match(queue_id))


def entry_to_json(entry: QueueEntry, compact: bool = False) -> bytes:
    """The envelope as JSON: indented for the spool's files (people read them), `compact`
    for the spool-time envelope nobody reads unless a process died (json's C encoder only
    runs without indent)."""
    data = {"version": ENVELOPE_VERSION, **vars(entry),
            "recipients": [vars(r) for r in entry.recipients]}
    if compact:
        return json.dumps(data, separators=(",", ":"), default=_json_default).encode("utf-8")
    return json.dumps(data, indent=1, default=_json_default).encode("utf-8")


def _json_default(value: Any) -> Any:
    # What asdict would have made of a dataclass in meta; anything else as text.
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else str(value)


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


@dataclass(eq=False)
class Sidecar:
    """One open spool-time envelope file of this process (`Spool.write_sidecar`)."""

    fd: int
    path: str


# Forks of this process so far, counted in the child (twistd forks after our imports): a
# _Sidecars compares it instead of calling getpid(2) at every delivery.
_forks = [0]
os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))


class _Sidecars:
    """The spool-time envelope files of this process: the free ones (empty), and how many
    exist. Shared by the io threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[Sidecar] = []
        self._open: set[Sidecar] = set()
        self._forks = _forks[0]
        self._closed = False  # stopping: files given back are closed and removed

    def take(self, spool: "Spool") -> Sidecar:
        with self._lock:
            if self._forks != _forks[0]:  # forked (twistd): those files are the parent's
                self._free, self._open, self._forks = [], set(), _forks[0]
            if self._free:
                return self._free.pop()
        fd, path = spool.create_staged(os.O_RDWR, SIDECAR)
        sidecar = Sidecar(fd, path)
        with self._lock:
            self._open.add(sidecar)
        return sidecar

    def give_back(self, sidecar: Sidecar) -> bool:
        """Keep an emptied file for reuse; False when it is to go (closed here: after
        `close()`, by a job that was still running at the stop)."""
        with self._lock:
            if sidecar in self._open and not self._closed:
                self._free.append(sidecar)
                return True
            self._open.discard(sidecar)
        try:
            os.close(sidecar.fd)
        except OSError:
            pass
        return False

    def drop(self, sidecar: Sidecar) -> None:
        with self._lock:
            self._open.discard(sidecar)
        try:
            os.close(sidecar.fd)
        except OSError:
            pass

    def close(self) -> list[Sidecar]:
        """Close the free (empty) files and return them; a file in use is closed when its
        job gives it back (never under a running job: its descriptor could be reused)."""
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
            self._open.difference_update(free)
        if self._forks != _forks[0]:
            return []
        for sidecar in free:
            try:
                os.close(sidecar.fd)
            except OSError:
                pass
        return free


class Spool:
    """Synchronous spool operations; the runner calls them in its io pool."""

    def __init__(self, directory: str, instance: str | None = None):
        self.directory = directory
        self._sidecars = _Sidecars()
        # The liveness locks of the processes on this spool; `instance` is our name in them.
        self.instances = Instances(os.path.join(directory, "instances"), instance)

    def ensure(self) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)

    # -- paths ---------------------------------------------------------------------------------
    def message_path(self, queue_id: str) -> str:
        return os.path.join(self.directory, queue_id + ".eml")

    def envelope_path(self, queue_id: str) -> str:
        return os.path.join(self.directory, queue_id + ".json")

    @property
    def incoming_dir(self) -> str:
        """Where this process stages a message before `store_file` takes it over: one
        directory per host, in which the receivers name their files `<pid>.<random>`, so the
        owner of every staged file is known (docs/design/queue.md, "Instances")."""
        host, _ = split_owner(self.instances.name) or (self.instances.name, 0)
        return os.path.join(self.directory, INCOMING, host)

    @property
    def kick_path(self) -> str:
        return os.path.join(self.directory, ".kick")

    # -- writing -------------------------------------------------------------------------------
    def store(self, entry: QueueEntry, data: bytes, sync_dir: bool = True) -> None:
        """Spool a new entry; when this returns, message and envelope survive a crash (with
        `sync_dir=False`, once the caller fsynced the spool directory, as for `store_file`)."""
        fd, staged = self.create_staged(os.O_WRONLY)
        try:
            try:
                write_all(fd, data)
            finally:
                os.close(fd)
            self.store_file(entry, staged, sync_dir=sync_dir)
        except BaseException:
            try:
                os.unlink(staged)
            except FileNotFoundError:
                pass
            raise

    def store_file(self, entry: QueueEntry, staged_path: str, sync_dir: bool = True) -> None:
        """Spool a new entry from a complete message file in `incoming_dir` (SMTP DATA streams
        there), taking the file over: when this returns, message and envelope survive a crash
        and the staged name is gone. On failure the staged file is left to the caller.

        `sync_dir=False`: both files are fsynced and renamed, and the caller fsyncs the spool
        directory (the group commit, docs/design/queue.md); only then is the entry durable."""
        self.ensure()
        fd = os.open(staged_path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            # The writer's lock: until the envelope exists, a message file whose lock is free
            # was left by a dead writer (cleanup() removes it at once, not after an hour).
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.fsync(fd)  # the writer's data, before any name points at it
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
        finally:
            os.close(fd)

    def create_staged(self, mode: int, suffix: str = "") -> tuple[int, str]:
        """Create a new file of this process, `incoming/<host>/<pid>.<random><suffix>`, opened
        with `mode` (os.O_WRONLY or os.O_RDWR): (descriptor, path). incoming/ is made when
        missing."""
        name = f"{unique.pid()}.{unique.token_hex(8)}{suffix}"
        flags = mode | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        path = os.path.join(self.incoming_dir, name)
        try:
            return os.open(path, flags, 0o600), path
        except FileNotFoundError:
            path = os.path.join(self.ensure_incoming(), name)
            return os.open(path, flags, 0o600), path

    def ensure_incoming(self) -> str:
        path = self.incoming_dir
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def clean_incoming(self, now: float | None = None) -> list[str]:
        """Remove staged files whose receiver is gone (a crash, a restart; called at start-up,
        before we receive, our own name counts as gone), and any older than a day. Files of
        live processes, on this host or another sharing the spool, are kept. Envelopes of
        deliveries at spool time (`.env`) are left to `takeover()`, which logs them."""
        removed: list[str] = []
        for leftover in self.leftovers(now, spool=False):
            if leftover.kind == "staged" and (not leftover.alive
                                              or leftover.age >= STALE_STAGED_AGE):
                if _unlink(leftover.path):
                    removed.append(os.path.relpath(leftover.path, self.incoming_root))
        return removed

    @property
    def incoming_root(self) -> str:
        return os.path.join(self.directory, INCOMING)

    def leftovers(self, now: float | None = None, spool: bool = True,
                  empty: bool = False) -> list[Leftover]:
        """Files that are no entry: staged messages and spool-time envelopes (owner from the
        name), messages without envelope and temporary files (alive while their entry's lock
        is held). With `spool=False` only incoming/ is looked at. Empty spool-time envelope
        files (kept for reuse, `write_sidecar`) hold nothing and are listed only with
        `empty`, as kind "spool-time-empty"."""
        now = time.time() if now is None else now
        found: list[Leftover] = []
        owners: dict[str, bool] = {}

        def alive(owner: str) -> bool:
            if owner not in owners:
                owners[owner] = self._owner_alive(owner)
            return owners[owner]

        for path, owner in self._staged_files():
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            kind = "staged"
            if path.endswith(SIDECAR):
                kind = "spool-time" if st.st_size else "spool-time-empty"
                if kind == "spool-time-empty" and not empty:
                    continue
            found.append(Leftover(kind, path, owner, alive(owner), now - st.st_mtime))
        if not spool:
            return found
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return found
        present = set(names)
        for name in names:
            path = os.path.join(self.directory, name)
            if name.endswith(".eml") and name[:-4] + ".json" not in present:
                kind, entry = "orphan", name[:-4]
            elif name.startswith(".") and name.endswith(".tmp"):
                kind, entry = "temporary", name[1:].split(".", 1)[0]
            else:
                continue
            age = _age(path, now)
            if age is None or (kind == "orphan" and os.path.exists(path[:-4] + ".json")):
                continue
            busy = valid_queue_id(entry) and self._locked(self.message_path(entry))
            found.append(Leftover(kind, path, "", busy, age))
        return found

    def _staged_files(self) -> Iterator[tuple[str, str]]:
        """(path, owner instance) of every file under incoming/: `<host>/<pid>.*`, and the
        flat `<pid>.*` of older versions (their owner is on this host)."""
        root = self.incoming_root
        here, _ = split_owner(self.instances.name) or (self.instances.name, 0)
        try:
            hosts = os.listdir(root)
        except FileNotFoundError:
            return
        for host in hosts:
            directory = os.path.join(root, host)
            if not os.path.isdir(directory):
                yield directory, f"{here}.{host.split('.', 1)[0]}"
                continue
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                continue
            for name in names:
                yield os.path.join(directory, name), f"{host}.{name.split('.', 1)[0]}"

    def _owner_alive(self, owner: str) -> bool:
        """Is the instance `owner` at work? Its liveness lock says; without a lock file, a
        process on this host that runs under that pid (an older version, without locks) is
        taken for alive."""
        if owner == self.instances.name:
            return self.instances.registered
        if self.instances.alive(owner):
            return True
        parsed = split_owner(owner)
        here = split_owner(self.instances.name)
        return (parsed is not None and here is not None and parsed[0] == here[0]
                and not os.path.exists(self.instances.lock_path(owner))
                and _pid_alive(parsed[1]))

    @staticmethod
    def _locked(path: str) -> bool:
        """Does some process hold the flock on `path` (a claim, a writer)?"""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        finally:
            os.close(fd)

    # -- deliveries at spool time ---------------------------------------------------------------
    def write_sidecar(self, entry: QueueEntry) -> "Sidecar":
        """Before a delivery at spool time writes its copies: its envelope in a file of
        incoming/ (no fsync: it only has to outlive a killed process, like the log it stands
        in for). Cleared (`clear_sidecars`) once the log lines of those copies are written;
        one a dead process left tells `takeover()` which copies may lack their line.

        The files are this process's `<pid>.<random>.env`, kept open and reused: writing is
        one pwrite into an empty one, clearing one ftruncate, where a file per message cost a
        create and an unlink (and, on ext4, an inode allocated and freed) per message."""
        data = entry_to_json(entry, compact=True)
        sidecar = self._sidecars.take(self)
        try:
            view = memoryview(data)
            offset = 0
            while offset < len(view):
                offset += os.pwrite(sidecar.fd, view[offset:], offset)
        except BaseException:
            self.clear_sidecars([sidecar])
            raise
        return sidecar

    def clear_sidecars(self, sidecars: "list[Sidecar]") -> None:
        """io thread: empty these spool-time envelopes (their lines are written, or their
        copies taken back) and keep their files for the next deliveries. A file that cannot
        be emptied is removed instead."""
        for sidecar in sidecars:
            try:
                os.ftruncate(sidecar.fd, 0)
            except OSError:
                self._sidecars.drop(sidecar)
                _unlink(sidecar.path)
                continue
            if not self._sidecars.give_back(sidecar):
                _unlink(sidecar.path)  # emptied after the stop

    def close_sidecars(self) -> None:
        """At a clean stop: remove the empty spool-time envelope files; one still in use
        stays for the next process's `takeover()` (its lines may not be written)."""
        for sidecar in self._sidecars.close():
            _unlink(sidecar.path)

    def takeover(self, now: float | None = None) -> tuple[list[str], list[QueueEntry]]:
        """Remove the leftovers of dead writers: staged files, messages without envelope,
        temporary files (their lock is free). Returns what was removed and the envelopes of
        deliveries at spool time whose log lines the dead process may not have written (the
        caller logs the copies it finds, docs/design/queue.md, "The mail log")."""
        removed: list[str] = []
        unlogged: list[QueueEntry] = []
        for leftover in self.leftovers(now, empty=True):
            if leftover.alive and leftover.age < STALE_STAGED_AGE:
                continue
            if leftover.kind == "spool-time-empty":
                _unlink(leftover.path)  # held nothing: not worth a line
                continue
            if leftover.kind == "spool-time":
                try:
                    with open(leftover.path, "rb") as f:
                        unlogged.append(entry_from_json(f.read()))
                except (OSError, ValueError, TypeError, KeyError):
                    pass  # cut short while written: its copies were not started
            elif leftover.kind == "orphan" and os.path.exists(leftover.path[:-4] + ".json"):
                continue  # its writer finished after we looked
            if _unlink(leftover.path):
                removed.append(os.path.relpath(leftover.path, self.directory))
        return removed, unlogged

    def unstore(self, queue_id: str) -> None:
        """Take back an entry whose directory fsync failed (nobody was told it exists):
        envelope first, then the message. No fsync: a crash may leave them, and then they are
        delivered, which is the at-least-once side of a 451 the client retries."""
        for path in (self.envelope_path(queue_id), self.message_path(queue_id)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def save(self, entry: QueueEntry) -> Stamp | None:
        """Atomically replace the envelope (call with the entry claimed); returns its stamp."""
        write_file_durably(self.directory, entry.id + ".json", [entry_to_json(entry)])
        return self.stamp(entry.id)

    def stamp(self, queue_id: str) -> Stamp | None:
        """(inode, mtime) of the envelope: changes with every save (a rename to a new inode)
        and every `mark()`; None when there is none."""
        try:
            st = os.stat(self.envelope_path(queue_id))
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns)

    def mark(self, queue_id: str) -> None:
        """Change the envelope's stamp without rewriting it (call with the entry claimed):
        what a process does before it writes copies of an entry it cannot vouch for, so that
        the process which last saved the envelope can tell someone else may have delivered
        (docs/design/queue.md, "Exactly once"). One second on, for coarse file clocks."""
        path = self.envelope_path(queue_id)
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

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
        """Remove what crashes leave behind in the spool directory: messages without envelope
        and temporary files whose writer is gone (the entry's lock is free), and any older than
        an hour (a writer on a filesystem without working locks)."""
        removed = []
        for leftover in self.leftovers(now):
            if leftover.kind not in ("orphan", "temporary"):
                continue
            if leftover.alive and leftover.age < STALE_TMP_AGE:
                continue
            if leftover.kind == "orphan" and os.path.exists(leftover.path[:-4] + ".json"):
                continue
            if _unlink(leftover.path):
                removed.append(os.path.basename(leftover.path))
        return removed


_HEAD_READ = 16 * 1024  # bytes per read of read_head: most header sections fit one


def head_of(message: bytes, limit: int = 256 * 1024) -> bytes:
    """What `read_head` returns for a file holding `message`."""
    end = message.find(b"\r\n\r\n", 0, limit)
    return message[:limit] if end < 0 else message[:end + 2]


def read_head(path: str, limit: int = 256 * 1024) -> bytes:
    """The header section of the message file at `path` (up to the blank line, or `limit`).
    Plain reads until the blank line is in: open, read, close for the usual message."""
    fd = os.open(path, os.O_RDONLY)
    try:
        head = b""
        end = -1
        while end < 0 and len(head) < limit:
            # Pieces, not `limit` at once: a 100 KiB message is not read whole for its header.
            chunk = os.read(fd, min(_HEAD_READ, limit - len(head)))
            if not chunk:
                break
            head += chunk
            end = head.find(b"\r\n\r\n", max(0, len(head) - len(chunk) - 3))
    finally:
        os.close(fd)
    return head if end < 0 else head[:end + 2]


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _age(path: str, now: float) -> float | None:
    try:
        return now - os.lstat(path).st_mtime
    except FileNotFoundError:
        return None


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

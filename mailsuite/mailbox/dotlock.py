"""Dovecot's dotlock (`<file>.lock`, created with O_CREAT|O_EXCL, holding `<pid>:<host>`), taken
without ever waiting: a live lock raises LockBusy at once, so the io pool thread goes back to the
pool and the caller waits on the reactor (waits.py). A stale lock is broken at once, with one
log line. The rules are in docs/design/maildir.md, "The dotlock"."""
from __future__ import annotations

import errno
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from twisted.logger import Logger

from mailsuite.mailbox.errors import LockBusy

log = Logger()

STALE_LOCK_SECONDS = 120.0  # Dovecot's default stale timeout for dovecot-uidlist.lock
# A lock without a readable owner is being written (created, content not yet written) for a
# moment; one this old was left by a crash between the two.
UNWRITTEN_GRACE_SECONDS = 2.0
# /proc gives a process start time to the clock tick and boot time to the second.
PID_REUSE_SLACK_SECONDS = 2.0
_READ_LIMIT = 256


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this host (signal 0 checks, sends nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError:
        return True  # never call a lock stale on a doubt
    return True


_boot_time: float | None = None


def process_start(pid: int) -> float | None:
    """The POSIX time a process started (Linux /proc), None where it cannot be read."""
    global _boot_time
    try:
        if _boot_time is None:
            with open("/proc/stat", "rb") as f:
                for line in f:
                    if line.startswith(b"btime "):
                        _boot_time = float(line.split()[1])
                        break
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # Field 22 (starttime, clock ticks after boot); the name in field 2 may hold spaces.
        ticks = int(stat.rpartition(b")")[2].split()[19])
        if _boot_time is None:
            return None
        return _boot_time + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class LockRules:
    """When a dotlock someone else made is stale. Functions are arguments so unit tests can fake
    PIDs, host names and the clock."""

    stale_seconds: float = STALE_LOCK_SECONDS  # for locks of other hosts only
    hostname: str = field(default_factory=socket.gethostname)
    now: Callable[[], float] = time.time
    alive: Callable[[int], bool] = pid_alive
    started: Callable[[int], "float | None"] = process_start
    pid: Callable[[], int] = os.getpid

    def stale(self, content: bytes, mtime: float, held_here: bool) -> str | None:
        """Why a lock with this content and mtime is stale, or None if it must be respected.
        `held_here`: a thread of this process holds this lock now."""
        age = self.now() - mtime
        pid_text, sep, host = content.decode("utf-8", "replace").strip().partition(":")
        if not sep or not host or not pid_text.isdigit():
            if age > UNWRITTEN_GRACE_SECONDS:
                return f"no owner written in it for {age:.0f} s (a crash while locking)"
            return None
        pid = int(pid_text)
        if host != self.hostname:
            # We cannot look at another host's processes: only age tells (as Dovecot does).
            if age > self.stale_seconds:
                return f"owner on host {host} has not released it for {age:.0f} s"
            return None
        if pid == self.pid():
            # Our own PID: either a thread of ours holds it, or a former process of ours that
            # had the same PID (a restart in a container often gets the same one) left it.
            return None if held_here else "this process's PID, and no thread of it holds it"
        if not self.alive(pid):
            return f"owner process {pid} is gone"
        start = self.started(pid)
        if start is not None and start > mtime + PID_REUSE_SLACK_SECONDS:
            return f"process {pid} started after the lock was made (its PID was reused)"
        return None


DEFAULT_RULES = LockRules()

def _stamp(st: os.stat_result) -> tuple:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


# Lock paths held by this process -> the DotLock holding it (see LockRules.stale).
_held: dict[str, "DotLock"] = {}
_held_lock = threading.Lock()


class DotLock:
    """`with DotLock(path, rules):` holds `<path>.lock` or raises LockBusy at once."""

    def __init__(self, path: str, rules: LockRules = DEFAULT_RULES):
        self.lock_path = path + ".lock"
        self.rules = rules
        self._stamp: tuple | None = None  # (inode, size, mtime) of our lock file once written
        self._owner = f"{rules.pid()}:{rules.hostname}\n".encode()

    def __enter__(self) -> "DotLock":
        owner = "unknown"
        for _ in range(4):  # freed or broken between two of our looks: try again
            try:
                fd = os.open(self.lock_path,
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except FileExistsError:
                broken, owner = self._break_if_stale()
                if broken:
                    continue
                raise LockBusy(self.lock_path, owner)
            try:
                with _held_lock:  # before the owner is written: see LockRules.stale
                    _held[self.lock_path] = self
                os.write(fd, self._owner)
                self._stamp = _stamp(os.fstat(fd))
            except BaseException:
                os.close(fd)
                os.unlink(self.lock_path)
                self.__exit__()
                raise
            os.close(fd)
            return self
        raise LockBusy(self.lock_path, owner)

    def __exit__(self, *exc: object) -> None:
        try:
            # Only our own file: if it was broken and taken by another, it is theirs now. The
            # inode number alone may be reused at once, so its size and mtime are compared too:
            # a lock is broken only once it looks stale (LockRules.stale: at least
            # UNWRITTEN_GRACE_SECONDS old), so a lock made after ours has another mtime.
            # One lstat instead of reading the owner back (docs/design/maildir.md, "The dotlock").
            if _stamp(os.lstat(self.lock_path)) == self._stamp:
                os.unlink(self.lock_path)
        except FileNotFoundError:
            pass
        finally:
            with _held_lock:
                if _held.get(self.lock_path) is self:
                    del _held[self.lock_path]

    def _break_if_stale(self) -> tuple[bool, str]:
        """(True, _) if the lock is gone now (freed, or stale and broken by us); else (False,
        who holds it)."""
        path = self.lock_path
        try:
            before = os.stat(path, follow_symlinks=False)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                content = os.read(fd, _READ_LIMIT)
            finally:
                os.close(fd)
        except FileNotFoundError:
            return True, ""
        owner = content.decode("utf-8", "replace").strip() or "none written"
        with _held_lock:
            held_here = path in _held
        why = self.rules.stale(content, before.st_mtime, held_here)
        if why is None:
            return False, owner
        try:
            # Still the file we judged? (Another process may have broken it and locked anew
            # since; we must not remove theirs. The window left is a stat and an unlink.)
            now = os.stat(path, follow_symlinks=False)
            if (now.st_ino, now.st_mtime_ns, now.st_size) != (
                    before.st_ino, before.st_mtime_ns, before.st_size):
                return True, owner
            os.unlink(path)
        except FileNotFoundError:
            return True, owner
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return False, owner
            raise
        log.warn("mailbox: broke stale lock {path} (owner {owner}): {why}", path=path,
                 owner=owner, why=why)
        return True, owner

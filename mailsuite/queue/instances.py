"""Which processes work on this spool, and which of them are gone (docs/design/queue.md,
"Instances").

Every process that writes to the spool holds an exclusive flock on
`<queue_dir>/instances/<host>.<pid>.lock` for as long as it lives. The kernel drops the lock of
a process that dies, even with SIGKILL, so any other process can tell at once, with a
non-blocking flock of its own, that a peer is gone: its leftovers (staged files, half-written
files, entries it had claimed) can be taken over without waiting for a timeout. The name says
whose files are whose: staged messages live under `incoming/<host>/<pid>.*`.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket

LOCK_SUFFIX = ".lock"
# Lock path -> (descriptor, users): an flock conflicts between two descriptors even within one
# process, so every Instances of this process on one spool shares one (tests run several).
_HELD: dict[str, list[int]] = {}


def instance_name(host: str | None = None, pid: int | None = None) -> str:
    """`<host>.<pid>`: unique among the live processes of every machine sharing the spool."""
    host = (host or socket.gethostname()).replace("/", "_")
    return f"{host}.{os.getpid() if pid is None else pid}"


class Instances:
    """The liveness locks of the processes on one spool; blocking calls (io pool)."""

    def __init__(self, directory: str, name: str | None = None):
        self.directory = directory
        self.name = name or instance_name()
        self._fd: int | None = None

    def lock_path(self, name: str) -> str:
        return os.path.join(self.directory, name + LOCK_SUFFIX)

    # -- our own lock ----------------------------------------------------------------------------
    def register(self) -> None:
        """Take our liveness lock (once). A file left under our name by a dead process with the
        same host and pid is simply taken over."""
        if self._fd is not None:
            return
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        path = self.lock_path(self.name)
        held = _HELD.get(path)
        if held is not None:
            held[1] += 1
            self._fd = held[0]
            return
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                # A peer that found the old file free may have unlinked it meanwhile: our lock
                # must be on the file at the path, or nobody sees it.
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    self._fd = fd
                    _HELD[path] = [fd, 1]
                    return
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def unregister(self) -> None:
        """At a clean stop: remove our lock file, then drop the lock."""
        if self._fd is None:
            return
        path = self.lock_path(self.name)
        self._fd = None
        held = _HELD[path]
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[path]
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(held[0])

    @property
    def registered(self) -> bool:
        return self._fd is not None

    # -- the others ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every instance with a lock file (alive, or dead and not reaped yet)."""
        try:
            entries = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(n[:-len(LOCK_SUFFIX)] for n in entries
                      if n.endswith(LOCK_SUFFIX) and not n.startswith("."))

    def alive(self, name: str) -> bool:
        """Does the process `name` hold its lock right now? (Ourselves: while registered.)"""
        if name == self.name:
            return self._fd is not None
        return self._probe(name, reap=False)

    def reap(self) -> list[str]:
        """The peers found dead now (their lock free): their lock files are removed, so each
        death is reported once, by whichever process looked first."""
        return [name for name in self.names()
                if name != self.name and not self._probe(name, reap=True)]

    def _probe(self, name: str, reap: bool) -> bool:
        """True while `name` holds its lock. A free lock means the process is gone."""
        path = self.lock_path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return True
                raise
            if reap:
                try:  # unlinked while we hold the lock: a restarted namesake makes a new file
                    if os.stat(path).st_ino == os.fstat(fd).st_ino:
                        os.unlink(path)
                except FileNotFoundError:
                    pass
            return False
        finally:
            os.close(fd)


def split_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of an instance name, None if it is not one."""
    host, _, pid = name.rpartition(".")
    return (host, int(pid)) if host and pid.isdigit() else None

"""The atomic, durable Maildir writer used for every final delivery.

A message appears in `new/` only by rename from `tmp/` after fsync, and `new/` is fsynced after the
rename, so a reader (IMAP, POP3, another Maildir tool) never sees half a message and a delivery
that returned survives a crash (TWISTED-NOTES §3: twisted.mail.maildir has no fsync at all).

Names follow the Maildir convention: `<sec>.M<usec>P<pid>Q<n>.<host>,S=<size>`; pid is read at
every call (a daemonised or forked process must not reuse its parent's), Q is a per-process counter
shared by all threads, and the host has `/` and `:` escaped as the Maildir spec asks.
"""
from __future__ import annotations

import itertools
import os
import socket
import threading
import time

from mailsuite.safeio import fsync_dir, write_all

SUBDIRS = ("cur", "new", "tmp")
_CHUNK = 1024 * 1024
_counter = itertools.count(1)
_counter_lock = threading.Lock()


def ensure_maildir(path: str) -> None:
    """Create the Maildir (and its parents) with cur/ new/ tmp/, private to the owner."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    for sub in SUBDIRS:
        # exist_ok still raises FileExistsError when a non-directory is in the way: good, that
        # is a broken Maildir and the delivery must be deferred, not written elsewhere.
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)


def unique_name(size: int, hostname: str | None = None) -> str:
    """`<sec>.M<usec>P<pid>Q<n>.<host>,S=<size>`: unique across threads, processes and hosts."""
    with _counter_lock:
        n = next(_counter)
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    host = (hostname or socket.gethostname()).replace("/", r"\057").replace(":", r"\072")
    return f"{sec}.M{usec:06d}P{os.getpid()}Q{n}.{host},S={size}"


def deliver_to_maildir(maildir: str, header: bytes, message_path: str | None = None,
                       data: bytes = b"", hostname: str | None = None) -> str:
    """Write `header` + (the file at message_path, or data) into maildir/new/; return the path.

    Blocking (fsync): call it in suite.pools.io. On any failure nothing is left in tmp/ or new/
    and the OSError propagates, so the caller can defer the delivery.
    """
    ensure_maildir(maildir)
    body_size = os.path.getsize(message_path) if message_path is not None else len(data)
    size = len(header) + body_size
    tmp_dir = os.path.join(maildir, "tmp")
    new_dir = os.path.join(maildir, "new")
    while True:
        name = unique_name(size, hostname)
        tmp_path = os.path.join(tmp_dir, name)
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            break
        except FileExistsError:  # only if the clock went backwards; Q makes the next name new
            continue
    try:
        try:
            written = write_all(fd, header)
            if message_path is not None:
                with open(message_path, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        written += write_all(fd, chunk)
            else:
                written += write_all(fd, data)
            if written != size:  # the spool file changed under us: never publish a wrong S=
                raise OSError(f"message size changed while copying ({written} != {size})")
            os.fsync(fd)
        finally:
            os.close(fd)
        final_path = os.path.join(new_dir, name)
        os.rename(tmp_path, final_path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except OSError:
            pass
        raise
    fsync_dir(new_dir)
    return final_path

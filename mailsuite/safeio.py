"""Durable, atomic file writes shared by the spool, the Maildir writer and the mailbox store.

A file that a crash must neither lose nor show half-written is written under a hidden temporary
name in its own directory, fsynced, renamed into place, and the directory is fsynced so that the
rename itself survives a power loss (chasquid's `safeio`; twisted.mail fsyncs nothing).
"""
from __future__ import annotations

import os
import secrets
from typing import Iterable


def fsync_dir(path: str) -> None:
    """Make the entries of directory `path` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> int:
    """os.write until every byte of `data` is written (a write may be short); returns len(data)."""
    view = memoryview(data)
    total = len(view)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    return total


def atomic_write(path: str, data: bytes | Iterable[bytes], *, mode: int = 0o600,
                 sync_dir: bool = True) -> int:
    """Write `data` (bytes or an iterable of chunks) to `path`: readers see the old file or the
    new one, never part of one; on any failure the temporary file is removed. Returns the size.

    The temporary name starts with "." so spool and Maildir scans pass over it.
    """
    directory, name = os.path.split(path)
    directory = directory or "."
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    size = 0
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            for chunk in chunks:
                size += write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sync_dir:
        fsync_dir(directory)
    return size

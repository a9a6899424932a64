"""Durable, atomic file writes shared by the spool, the Maildir writer and the mailbox store.

A file that a crash must neither lose nor show half-written is written under a hidden temporary
name in its own directory, fsynced, renamed into place, and the directory is fsynced so that the
rename itself survives a power loss (chasquid's `safeio`; twisted.mail fsyncs nothing).
"""
from __future__ import annotations

import ctypes
import errno
import os
import secrets
from typing import BinaryIO, Iterable, cast


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


def open_append(path: str, mode: str) -> BinaryIO:
    """open(path, mode) for appending ("ab" or "ab+"), refusing a symlink planted in place of
    the file."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
    if "+" in mode:
        flags = (flags & ~os.O_WRONLY) | os.O_RDWR
    return cast(BinaryIO, os.fdopen(os.open(path, flags, 0o600), mode))


# -- unnamed files (docs/design/maildir.md, "Unnamed files") -------------------------------------
# A file opened with O_TMPFILE has an inode but no name until linkat() gives it one, so a writer
# needs no temporary name in another directory and no rename across directories. CPython's
# os.link() cannot pass AT_SYMLINK_FOLLOW (it calls link(2), which refuses the /proc link with
# EXDEV), so linkat is called through libc.
_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400


def _find_linkat():
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        linkat = ctypes.CDLL(None, use_errno=True).linkat
    except (OSError, AttributeError):
        return None
    linkat.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                       ctypes.c_int)
    linkat.restype = ctypes.c_int
    return linkat


_linkat = _find_linkat()
# Set once a filesystem of this process refused O_TMPFILE: every writer then uses named files.
_unnamed_refused = False


def open_unnamed(directory: str, mode: int = 0o600) -> int | None:
    """A writable file without a name in `directory` (O_TMPFILE), or None where the kernel,
    the filesystem or a missing /proc cannot make or later name one. A missing directory
    raises FileNotFoundError."""
    global _unnamed_refused
    if _linkat is None or _unnamed_refused:
        return None
    try:
        return os.open(directory, os.O_TMPFILE | os.O_WRONLY, mode)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        _unnamed_refused = True
        return None


def link_unnamed(fd: int, path: str) -> None:
    """Give the unnamed file `fd` the name `path` (in the directory it was opened in).
    FileExistsError if the name is taken: an existing file is never replaced."""
    assert _linkat is not None
    if _linkat(_AT_FDCWD, f"/proc/self/fd/{fd}".encode(), _AT_FDCWD, os.fsencode(path),
               _AT_SYMLINK_FOLLOW) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)

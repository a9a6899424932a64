"""Moving many new/ files to cur/ beside the sync that lists them (docs/design/maildir.md,
"Syncing a folder"): the renames of a first sync of a large folder are kernel work that
serializes on the two directories, and the Python work of the sync (UIDs, dovecot-uidlist,
the MessageInfos) does not need them done. A thread cannot overlap the two (after each rename
it waits for the GIL the other thread holds), so a short-lived helper process renames while
the io thread goes on, and the sync waits for it before it shows anyone the result.

The helper is `python -I -S -c` running `move_all` on the directory descriptors it
inherits; it needs nothing of mailsuite. Blocking: io pool.
"""
from __future__ import annotations

import errno
import inspect
import os
import subprocess
import sys
import tempfile

# Fewer renames than this are done in the io thread: starting the helper costs ~20 ms.
APART_MIN = 5000


def cur_name(name: str) -> tuple[str, str]:
    """(key, name in cur/) of a file in new/: the info part is kept if it is ':2,...',
    else it becomes an empty ':2,' (the Maildir specification)."""
    key, sep, info = name.partition(":")
    if not sep:
        return name, name + ":2,"
    return key, key + ":2," + (info[2:] if info.startswith("2,") else "")


def move_all(nfd: int, cfd: int, names) -> list[tuple[int, int]]:
    """Rename new/<name> (directory descriptor nfd) to cur/<cur_name(name)> (cfd) for each
    of `names`; returns (index, errno) of each failed rename. Also the helper's code: it may
    use only the standard library."""
    failed = []
    rename = os.rename
    for i, name in enumerate(names):
        try:
            rename(name, cur_name(name)[1] if ":" in name else name + ":2,",
                   src_dir_fd=nfd, dst_dir_fd=cfd)
        except OSError as e:
            failed.append((i, e.errno or 0))
    return failed


# The helper: NUL-separated names on stdin, a line `<index> <errno>` per failure and `done`
# on stdout.
_HELPER = ("import os, sys\n" + inspect.getsource(cur_name) + inspect.getsource(move_all) +
           """
names = sys.stdin.buffer.read().decode("utf-8", "surrogateescape").split("\\0")
failed = move_all(int(sys.argv[1]), int(sys.argv[2]), names)
sys.stdout.buffer.write(b"".join(b"%d %d\\n" % f for f in failed) + b"done\\n")
""")


class Moves:
    """Moves new/<name> -> cur/<cur_name(name)> for each of `names`: `start()` hands the
    renames to the helper when there are many, `wait()` finishes them and returns the indices
    of the names whose file was gone (another process moved or deleted it first); any other
    failure raises its OSError. `close()` closes the two directory descriptors."""

    def __init__(self, nfd: int, cfd: int, names: list[str]):
        self.nfd, self.cfd, self.names = nfd, cfd, names
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the helper; without one (too few renames, no interpreter, the spawn failed)
        `wait()` does the renames itself."""
        if len(self.names) < APART_MIN or not sys.executable:
            return
        try:
            # A file, not a pipe: the io thread never waits for the helper to read.
            with tempfile.TemporaryFile() as f:
                f.write("\0".join(self.names).encode("utf-8", "surrogateescape"))
                f.seek(0)
                self.proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _HELPER, str(self.nfd), str(self.cfd)],
                    stdin=f, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                    pass_fds=(self.nfd, self.cfd))
        except OSError:
            self.proc = None

    def wait(self) -> set[int]:
        failed: list[tuple[int, int]] | None = None
        if self.proc is not None:
            report = self.proc.communicate()[0]
            self.proc = None
            if report.endswith(b"done\n"):
                failed = [(int(i), int(e)) for i, e in
                          (line.split() for line in report.splitlines()[:-1])]
        if failed is None:
            # Not started, or the helper died: rename here, and take a file already at its
            # destination (the helper got that far) as moved.
            names, cfd = self.names, self.cfd
            failed = [(i, e) for i, e in move_all(self.nfd, cfd, names)
                      if e != errno.ENOENT or not _exists(cur_name(names[i])[1], cfd)]
        gone = set()
        for i, err in failed:
            if err != errno.ENOENT:
                raise OSError(err, os.strerror(err))
            gone.add(i)
        return gone
    def close(self) -> None:
        """Close the directory descriptors (after `wait()`; a helper still running is waited
        for, its renames are not undone)."""
        if self.proc is not None:
            self.proc.communicate()
            self.proc = None
        for fd in (self.nfd, self.cfd):
            if fd >= 0:
                os.close(fd)
        self.nfd = self.cfd = -1


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False

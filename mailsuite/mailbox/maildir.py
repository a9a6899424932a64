"""Low-level Maildir and Dovecot file formats: names, flags, dovecot-uidlist,
dovecot-keywords, atomic rewrites, and the writer that delivers into new/ (the dotlock is in
dotlock.py). Synchronous; no knowledge of accounts or IMAP. The layout and the rules we follow
are in docs/design/maildir.md."""
from __future__ import annotations

import errno
import itertools
import operator
import os
import re
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable

from mailsuite import safeio, unique
from mailsuite.safeio import atomic_write, fsync_dir, write_all

UIDLIST = "dovecot-uidlist"
KEYWORDS = "dovecot-keywords"
INDEX = "mailsuite-index"
MAX_KEYWORDS = 26  # letters a..z

# IMAP system flags <-> Maildir info letters (https://cr.yp.to/proto/maildir.html).
FLAG_LETTERS: dict[str, str] = {
    "\\Draft": "D",
    "\\Flagged": "F",
    "\\Answered": "R",
    "\\Seen": "S",
    "\\Deleted": "T",
}
LETTER_FLAGS = {v: k for k, v in FLAG_LETTERS.items()}


# -- names -------------------------------------------------------------------------------------
_counter = itertools.count(1)
_counter_lock = threading.Lock()
_last_uidvalidity = 0


def unique_key(size: int, hostname: str | None = None) -> str:
    """`<sec>.M<usec>P<pid>Q<n>R<random>.<host>,S=<size>`: unique across threads, processes
    and hosts.

    The pid is read at every call, not at import: twistd forks after importing us, and a child
    must not reuse its parent's. Q is a per-process counter shared by all threads; `/` and `:`
    in the host name are escaped as the Maildir specification asks."""
    now = time.time()
    with _counter_lock:
        n = next(_counter)
    host = (hostname or socket.gethostname()).replace("/", "\\057").replace(":", "\\072")
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    return f"{sec}.M{usec:06d}P{unique.pid()}Q{n}R{unique.token_hex(4)}.{host},S={size}"


def split_name(name: str) -> tuple[str, str]:
    """File name -> (key, info letters). The key is the part before ':2,' (or before ':')."""
    key, sep, info = name.partition(":")
    if sep and info.startswith("2,"):
        return key, info[2:]
    return key, ""


def size_from_key(key: str) -> int | None:
    """`,S=<size>` from the base name (Maildir++ quota extension), None if absent."""
    head, sep, digits = key.rpartition(",S=")
    if sep and digits.isdigit() and digits.isascii() and ",S=" not in head:
        return int(digits)  # the common name, S= last: found from the end at once
    i = key.find(",S=")
    if i < 0:
        return None
    end = key.find(",", i + 3)
    digits = key[i + 3:] if end < 0 else key[i + 3:end]
    if digits.isdigit() and digits.isascii():
        return int(digits)
    for part in key.split(",")[1:]:
        if part.startswith("S="):
            try:
                return int(part[2:])
            except ValueError:
                return None
    return None


def letters_to_flags(letters: str, keywords: list[str]) -> frozenset:
    flags = set()
    for c in letters:
        if c in LETTER_FLAGS:
            flags.add(LETTER_FLAGS[c])
        elif "a" <= c <= "z":
            i = ord(c) - ord("a")
            if i < len(keywords):
                flags.add(keywords[i])
    return frozenset(flags)


def flags_to_letters(flags: Iterable[str], keywords: list[str], keep: str = "") -> str:
    """Sorted info letters for IMAP flags; keywords must already be in `keywords`.

    `keep` carries uppercase letters we do not map (e.g. P "passed") from the old name, so a
    flag change here does not drop what another Maildir tool set."""
    letters = set(c for c in keep if c.isupper() and c not in LETTER_FLAGS)
    lower = {k.lower(): i for i, k in enumerate(keywords)}
    for flag in flags:
        if flag in FLAG_LETTERS:
            letters.add(FLAG_LETTERS[flag])
        elif not flag.startswith("\\"):
            i = lower.get(flag.lower())
            if i is not None and i < MAX_KEYWORDS:
                letters.add(chr(ord("a") + i))
    return "".join(sorted(letters))


def info_name(key: str, letters: str) -> str:
    return f"{key}:2,{letters}"


_LEADING_DIGITS = re.compile(r"\d+")
_ORDER = re.compile(r"(\d+)\.M(\d+)")
# After "/", which no file name holds; ASCII digits only (int() reads other digits too).
_FIXED_WIDTH = re.compile(r"/[0-9]{10}\.M[0-9]{6}(?![0-9])")


def in_delivery_order(keys: list[str]) -> list[str]:
    """`keys` sorted by `delivery_order`. Names that all begin `<10 digits>.M<6 digits>`
    (ours, the queue's, most MDAs') sort the same as plain strings, which is several times
    faster for the 100,000 files of a folder another MDA filled (one regex over all)."""
    if len(_FIXED_WIDTH.findall("/" + "/".join(keys))) == len(keys):
        return sorted(keys)
    return sorted(keys, key=delivery_order)


def delivery_order(key: str) -> tuple:
    """New files get UIDs in delivery order: `<sec>.M<usec>...` sorted numerically (what
    follows the digits is P<pid> for our fresh names, Q<queue id> for queue deliveries)."""
    m = _ORDER.match(key)
    if m is not None:
        return (int(m[1]), int(m[2]), key)
    sec, _, rest = key.partition(".")
    usec = 0
    if rest.startswith("M"):
        m = _LEADING_DIGITS.match(rest, 1)
        usec = int(m.group()) if m else 0
    return (int(sec) if sec.isdigit() else 0, usec, key)


# -- directories and delivery --------------------------------------------------------------------
SUBDIRS = ("cur", "new", "tmp")
_CHUNK = 1024 * 1024


def make_maildir(path: str, subfolder: bool = False) -> None:
    """Create the Maildir (and its parents) with cur/ new/ tmp/, private to the owner.

    `subfolder` marks a Maildir++ folder with the `maildirfolder` file. An existing
    non-directory in the way raises FileExistsError: that is a broken Maildir, and a delivery
    must then be deferred, never written elsewhere."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    for sub in SUBDIRS:
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
    if subfolder:
        marker = os.path.join(path, "maildirfolder")
        if not os.path.exists(marker):
            open(marker, "ab").close()


def deliver(maildir: str, header: bytes, message_path: str | None = None, data: bytes = b"",
            hostname: str | None = None) -> str:
    """Write `header` + (the file at message_path, or data) into maildir/new/; return the path.

    Written unnamed (or in tmp/), fsynced, named in new/, then new/ fsynced: a reader never
    sees half a message, and a delivery that returned survives a crash (docs/design/maildir.md,
    "Delivery"). Blocking: run it in the io pool. On any failure nothing is left in tmp/ or
    new/ and the OSError propagates."""
    make_maildir(maildir)
    size = len(header) + (os.path.getsize(message_path) if message_path is not None
                          else len(data))
    while True:
        name = unique_key(size, hostname)
        try:
            return _write_into_new(maildir, name, header, message_path, data, size)
        except FileExistsError:  # only if the clock went backwards; Q makes the next name new
            continue


def delivery_marker(when: float, unique: str) -> str:
    """The start of a queue delivery's file name, `<sec>.M<usec>Q<queue id>N<index>.`: what
    `deliver_once` looks for after a crash (the host and `,S=` that follow may differ)."""
    sec = int(when)
    usec = min(int(round((when - sec) * 1_000_000)), 999_999)
    return f"{sec}.M{usec:06d}{unique}."


def deliver_once(maildir: str, header: bytes, message_path: str | None, *, when: float,
                 unique: str, hostname: str | None = None, recheck: bool = False,
                 letters: str | None = None, sync_dir: bool = True,
                 data: bytes | None = None) -> tuple[str, bool]:
    """Deliver like `deliver`, under a name fixed by (`when`, `unique`) instead of a fresh one,
    so the same queue delivery always writes the same file (docs/design/maildir.md,
    "Exactly once"). Returns (path, written): written is False when `recheck` found the copy a
    crashed attempt had already put in new/ or cur/ (a reader may have moved and flagged it).

    Without `recheck` nothing is listed: a copy still in new/ under the same name is complete
    and is kept.

    `letters` (info flags, e.g. "a" for the first keyword) delivers into cur/ as
    `<name>:2,<letters>`: a message in new/ carries no flags (docs/design/maildir.md).

    `sync_dir=False` leaves the fsync of the directory the file was renamed into to the caller
    (the queue's group commit, docs/design/queue.md): the copy is durable only after it.

    `data` (with `message_path` None): the message is in memory, written from there."""
    marker = delivery_marker(when, unique)
    made = maildir in _made and not recheck
    if not made:
        make_maildir(maildir)
    if recheck:
        found = find_delivered(maildir, marker)
        if found is not None:
            return found, False
    if data is not None:
        message_path, body = None, data
    else:
        assert message_path is not None
        body = b""
    size = len(header) + (len(body) if message_path is None else os.path.getsize(message_path))
    host = (hostname or socket.gethostname()).replace("/", "\\057").replace(":", "\\072")
    name = f"{marker}{host},S={size}"
    subdir, info = ("new", "") if letters is None else ("cur", ":2," + letters)
    try:
        path = _write_into_new(maildir, name, header, message_path, body, size,
                               replace_tmp=True, subdir=subdir, info=info, sync_dir=sync_dir)
    except FileNotFoundError:
        if not made:
            raise
        # Removed since we made it (an admin, a test): made again, written once more.
        _made.discard(maildir)
        make_maildir(maildir)
        path = _write_into_new(maildir, name, header, message_path, body, size,
                               replace_tmp=True, subdir=subdir, info=info, sync_dir=sync_dir)
    _remember_made(maildir)
    return path, True


# Maildirs a delivery of this process made or found complete: the next delivery into one skips
# make_maildir's eight system calls and makes it again only if a write finds a piece missing.
_made: set[str] = set()
_MADE_MAX = 10_000


def _remember_made(maildir: str) -> None:
    if len(_made) >= _MADE_MAX:
        _made.clear()
    _made.add(maildir)


def find_delivered(maildir: str, marker: str) -> str | None:
    """The file of new/ or cur/ whose name starts with `marker`, or None (lists both)."""
    for sub in ("new", "cur"):
        directory = os.path.join(maildir, sub)
        for name in os.listdir(directory):
            if name.startswith(marker):
                return os.path.join(directory, name)
    return None


def _write_into_new(maildir: str, name: str, header: bytes, message_path: str | None,
                    data: bytes, size: int, replace_tmp: bool = False, subdir: str = "new",
                    info: str = "", sync_dir: bool = True) -> str:
    """write -> fsync -> name it new/<name> -> fsync(new/). With `subdir` "cur" and `info`
    ":2,<letters>" the message arrives already flagged.

    The file is written unnamed in new/ itself and linked there once complete
    (docs/design/maildir.md, "Unnamed files"); where the filesystem has no unnamed files, in
    tmp/<name> and renamed. FileExistsError if the name is taken (unless `replace_tmp`: the
    same delivery by an attempt that crashed, whose copy in new/ is complete and is kept, and
    whose tmp/<name> is half-written and is replaced)."""
    new_dir = os.path.join(maildir, subdir)
    final_path = os.path.join(new_dir, name + info)
    fd = safeio.open_unnamed(new_dir)
    if fd is None:
        return _write_renamed(maildir, name, header, message_path, data, size, replace_tmp,
                              final_path, sync_dir)
    try:
        _write_message(fd, header, message_path, data, size)
        try:
            safeio.link_unnamed(fd, final_path)
        except FileExistsError:
            if not replace_tmp:
                raise
    finally:
        os.close(fd)
    if sync_dir:
        fsync_dir(new_dir)
    return final_path


def _write_message(fd: int, header: bytes, message_path: str | None, data: bytes,
                   size: int) -> None:
    """header + (the file at message_path, or data) into fd, then fsync."""
    if message_path is not None:
        written = write_all(fd, header)
        written += _copy_file(message_path, fd)
    else:  # in memory: one write
        written = write_all(fd, header + data)
    if written != size:  # the spool file changed under us: never publish a wrong S=
        raise OSError(f"message size changed while copying ({written} != {size})")
    os.fsync(fd)


def _write_renamed(maildir: str, name: str, header: bytes, message_path: str | None,
                   data: bytes, size: int, replace_tmp: bool, final_path: str,
                   sync_dir: bool) -> str:
    """tmp/<name> -> write -> fsync -> rename to final_path -> fsync of its directory."""
    tmp_path = os.path.join(maildir, "tmp", name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        fd = os.open(tmp_path, flags, 0o600)
    except FileExistsError:
        if not replace_tmp:
            raise
        os.unlink(tmp_path)  # half-written by an attempt that crashed; we hold the claim
        fd = os.open(tmp_path, flags, 0o600)
    try:
        try:
            _write_message(fd, header, message_path, data, size)
        finally:
            os.close(fd)
        os.rename(tmp_path, final_path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except OSError:
            pass
        raise
    if sync_dir:
        fsync_dir(os.path.dirname(final_path))
    return final_path


def _copy_file(source: str, fd: int) -> int:
    """Append the file at `source` to `fd`; returns the bytes copied. In the kernel
    (copy_file_range) where it can, so no buffer passes through Python; by reads otherwise."""
    with open(source, "rb", buffering=0) as src:
        copied = 0
        try:
            while n := os.copy_file_range(src.fileno(), fd, _CHUNK):
                copied += n
            return copied
        except OSError as e:  # not on this filesystem pair or kernel: read and write
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                               errno.EPERM) or copied:
                raise
        while chunk := src.read(_CHUNK):
            copied += write_all(fd, chunk)
        return copied


# -- files ---------------------------------------------------------------------------------------
def file_stamp(path: str) -> tuple | None:
    """(inode, size, mtime_ns) of a file, None if missing: tells whether it changed."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


# -- dovecot-uidlist -----------------------------------------------------------------------------
@dataclass
class UidList:
    """Contents of a dovecot-uidlist (version 3; version 1 is read too).

    uids maps key (base name before ':2,') -> uid; extra keeps Dovecot's per-line extension
    fields (`W<vsize>`, `S<size>`, `G<guid>`...) so our rewrites do not drop them."""

    uidvalidity: int
    nextuid: int
    guid: str = ""
    header_extra: list[str] = field(default_factory=list)
    uids: dict[str, int] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)
    # old UID -> key, for keys whose line came again with another UID (FolderIndex._update)
    renumbered: dict[int, str] = field(default_factory=dict)

    @classmethod
    def new(cls) -> "UidList":
        # UIDVALIDITY from the clock, as Dovecot does, so a recreated folder gets a new one;
        # never the same value twice in this process (a folder deleted and created again
        # within one second must not get its old UIDVALIDITY back: RFC 3501 §2.3.1.1).
        global _last_uidvalidity
        with _counter_lock:
            value = max(int(time.time()), _last_uidvalidity + 1)
            _last_uidvalidity = value
        return cls(uidvalidity=value, nextuid=1, guid=secrets.token_hex(16))

    @classmethod
    def parse(cls, data: bytes) -> "UidList":
        lines = data.decode("utf-8", "surrogateescape").split("\n")
        header = lines[0].split()
        if not header:
            raise ValueError("empty dovecot-uidlist")
        ul = cls(uidvalidity=0, nextuid=1)
        if header[0] == "1":
            # Version 1: "1 <uidvalidity> <nextuid>", then "<uid> <filename>".
            ul.uidvalidity, ul.nextuid = int(header[1]), int(header[2])
            for line in lines[1:]:
                uid, _, name = line.partition(" ")
                if uid.isdigit() and name:
                    ul.uids[name.split(":", 1)[0]] = int(uid)
            return ul
        if header[0] != "3":
            raise ValueError(f"unsupported dovecot-uidlist version {header[0]}")
        for token in header[1:]:
            if token[:1] == "V":
                ul.uidvalidity = int(token[1:])
            elif token[:1] == "N":
                ul.nextuid = int(token[1:])
            elif token[:1] == "G":
                ul.guid = token[1:]
            else:
                ul.header_extra.append(token)
        ul._parse_records(lines[1:])
        return ul

    def add_lines(self, data: bytes) -> set[str]:
        """Parse records appended to the file since we read it; returns their keys."""
        return self._parse_records(data.decode("utf-8", "surrogateescape").split("\n"))

    def _parse_records(self, lines: list[str]) -> set[str]:
        uids = self.uids
        extra = self.extra
        nextuid = self.nextuid
        seen = set()
        for line in lines:
            if not line:
                continue
            head, sep, name = line.partition(" :")
            if not sep:
                # "<uid> [ext...] :<name>" is the only record form; skip anything else.
                continue
            uid_s, _, ext = head.partition(" ")
            try:
                uid = int(uid_s)
            except ValueError:
                continue
            key = sys.intern(name.split(":", 1)[0])
            prev = uids.get(key)
            if prev is not None and prev != uid:
                self.renumbered[prev] = key
            uids[key] = uid
            seen.add(key)
            if ext:
                extra[key] = ext
            if uid >= nextuid:
                nextuid = uid + 1
        self.nextuid = nextuid
        return seen

    def serialize(self) -> bytes:
        header = ["3", f"V{self.uidvalidity}", f"N{self.nextuid}"]
        if self.guid:
            header.append(f"G{self.guid}")
        header += self.header_extra
        out = [" ".join(header)]
        extra = self.extra
        records = sorted(self.uids.items(), key=operator.itemgetter(1))
        out += [f"{uid} {ext} :{key}" if (ext := extra.get(key)) else f"{uid} :{key}"
                for key, uid in records]
        return ("\n".join(out) + "\n").encode("utf-8", "surrogateescape")


def read_uidlist(path: str) -> UidList | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if not data.strip():
        return None
    return UidList.parse(data)


# -- dovecot-keywords ----------------------------------------------------------------------------
def read_keywords(path: str) -> list[str]:
    """`<n> <name>` lines -> list indexed by n (gaps become "")."""
    try:
        with open(path, "rb") as f:
            data = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    found: dict[int, str] = {}
    for line in data.splitlines():
        n, _, name = line.strip().partition(" ")
        if n.isdigit() and name and int(n) < MAX_KEYWORDS:
            found[int(n)] = name
    result = [""] * (max(found) + 1 if found else 0)
    for n, name in found.items():
        result[n] = name
    return result


def write_keywords(path: str, keywords: list[str]) -> None:
    data = "".join(f"{i} {k}\n" for i, k in enumerate(keywords) if k)
    atomic_write(path, data.encode("utf-8"))

"""One message of a folder as the store hands it out (`MessageInfo`), split from index.py:
what a sync learns from a Maildir file name, and its INTERNALDATE read on demand
(docs/design/maildir.md, "Dates on demand").
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from mailsuite.mailbox.maildir import INDEX


UNDATED = -1.0  # MessageInfo.date not read yet


def date_from_key(key: str) -> int:
    """The delivery second at the start of a Maildir name (`<sec>.M...`), 0 if none."""
    sec = key.partition(".")[0]
    return int(sec) if sec.isdigit() else 0


# slots: 100,000 of these per large folder. Not frozen: a frozen dataclass sets each field
# through object.__setattr__, which doubles the cost of the first listing of a large folder;
# the store never changes a MessageInfo it has handed out (it builds a new one), except to
# memoize `date` and, before anyone holds them, `modseq`. unsafe_hash: hashed as if frozen.
@dataclass(slots=True, unsafe_hash=True)
class MessageInfo:
    """One message of a folder as of the last sync().

    key: the Maildir base name before ':2,' (POP3 UIDL, stable identity).
    flags: IMAP flags (system flags and keywords; never \\Recent).
    size: octets of the stored file (CRLF line endings).
    date: the INTERNALDATE (POSIX time, the file's mtime) or UNDATED: a name with `,S=` needs
    no stat at sync, and the date is read when first needed (docs/design/maildir.md, "Dates
    on demand"); read it through `internaldate`, which always gives a real value.
    name: the file name in cur/ as of the last sync (it changes when flags change);
    path: the same as an absolute path (computed: the folder prefix is one shared string).
    """

    uid: int
    key: str
    flags: frozenset
    size: int
    date: float = field(compare=False)  # UNDATED until stat()ed; memoized in place
    name: str
    cur_dir: str  # "<folder>/cur/", shared by all messages of the folder
    modseq: int = 0  # RFC 7162 mod-sequence (modseq.py); 0 until the log has recorded it

    @property
    def path(self) -> str:
        return self.cur_dir + self.name

    @property
    def internaldate(self) -> float:
        d = self.date
        return d if d != UNDATED else self.stat_date(os.stat, self.path)

    def known_date(self) -> float | None:
        """The INTERNALDATE if it can be known: None for a message expunged by another
        process before anyone here dated it, whose date nothing recorded (FETCH omits such
        a message, as it does one whose file it cannot read, rather than guess)."""
        d = self.date
        if d == UNDATED:
            d = self.stat_date(os.stat, self.path)
            if self.date == UNDATED:
                return None
        return d

    def stat_date(self, stat, where, **kw) -> float:
        """The file's mtime (`stat(where, **kw)`), memoized: the date of a file never
        changes while its key lives. A file renamed meanwhile (its flags changed by another
        process) is found under its new name; one expunged meanwhile gets the date
        mailsuite-index recorded for it, else the delivery time in its name, which is not
        memoized (docs/design/maildir.md, "Dates on demand")."""
        try:
            d = stat(where, **kw).st_mtime
        except OSError:
            found = date_of_renamed(self.cur_dir, self.key)
            if found is None:
                found = recorded_date(self.cur_dir, self.key)
            if found is None:
                return float(date_from_key(self.key))
            d = found
        self.date = d  # a cache of an immutable fact, seen by all copies
        return d


def recorded_date(cur_dir: str, key: str) -> float | None:
    """The date `mailsuite-index` recorded for `key` (APPEND and COPY record theirs before
    the message is visible, under the folder lock), or None. Reads the whole file: only for
    the rare file expunged by another process before this one dated it."""
    line = index_lines(os.path.join(os.path.dirname(cur_dir.rstrip("/")), INDEX)).get(key)
    try:
        return float(line.split("\t")[2]) if line is not None else None
    except ValueError:
        return None


def index_lines(path: str) -> dict[str, str]:
    """key -> its last line in the mailsuite-index at `path` ({} if there is none)."""
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "surrogateescape").split("\n")
    except OSError:
        return {}
    if not lines or lines[0] != "mailsuite-index 1":
        return {}
    return {line.partition("\t")[0]: line for line in lines[1:] if line.count("\t") == 2}


def renamed_path(cur_dir: str, key: str) -> str | None:
    """The path of the file of `key` in `cur_dir` under whatever flags it has now, or None
    if there is none. Lists the directory: only for the rare file renamed under us."""
    prefix = key + ":"
    try:
        with os.scandir(cur_dir) as entries:
            for entry in entries:
                if entry.name.startswith(prefix) or entry.name == key:
                    return entry.path
    except OSError:
        pass
    return None


def date_of_renamed(cur_dir: str, key: str) -> float | None:
    """The mtime of the file of `key` in `cur_dir` under whatever flags it has now, or None
    if there is none (renamed_path)."""
    path = renamed_path(cur_dir, key)
    try:
        return os.stat(path, follow_symlinks=False).st_mtime if path is not None else None
    except OSError:
        return None

"""Mod-sequences of one folder (RFC 7162 CONDSTORE/QRESYNC), kept in `mailsuite-modseq` beside
Dovecot's files (docs/design/maildir.md, "Mod-sequences"). Blocking: runs in the io pool,
under the FolderIndex's lock.

The file is an append-only log, shared by every process that opens the folder:

    mailsuite-modseq 1 V<uidvalidity>
    H <modseq>                 the highest mod-sequence so far (written at compaction)
    F <modseq>                 expunges up to this mod-sequence were forgotten (compaction)
    R <modseq>                 mod-sequences up to this one may be handed out (fsynced)
    <uid> <modseq> :<letters>  the message's flag letters (from its file name) as of modseq
    <uid> <modseq> -           the message was expunged at modseq

A later line for a UID replaces an earlier one. Only an `R` line is fsynced: mod-sequences are
handed out below the last one without an fsync each, and a process that reads the log from the
start (after a crash, lines without fsync may be lost) hands out new ones above it. Lines are appended under the dotlock
`mailsuite-modseq.lock` (the same DotLock Dovecot's files use), after reading what other
processes appended, so mod-sequences grow across processes. A change is found by comparing the
letters of a message's file name with the letters recorded for it: a flag changed by another
process or another Maildir tool gets a new mod-sequence when this process notices it, and a
change made while no process was running is noticed at the next full sync.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

from mailsuite.mailbox.dotlock import DEFAULT_RULES, DotLock, LockRules
from mailsuite.mailbox.maildir import file_stamp
from mailsuite.safeio import atomic_write

MODSEQ_FILE = "mailsuite-modseq"
HEADER = "mailsuite-modseq 1"
MAX_EXPUNGED = 10000  # expunged UIDs remembered for VANISHED (EARLIER); older ones: `floor`
RESERVE = 1000  # mod-sequences one fsynced `R` line makes room for


class ModSeqLog:
    """What the log says, in memory: uid -> letters and uid -> modseq of the messages,
    expunged uid -> modseq."""

    def __init__(self, folder_path: str, rules: LockRules = DEFAULT_RULES):
        self.path = os.path.join(folder_path, MODSEQ_FILE)
        self.rules = rules
        self.uidvalidity = 0
        self.highest = 1
        self.floor = 0  # expunges with modseq <= floor are no longer listed
        self.reserved = 0  # the highest `R`: numbers up to it may have been handed out
        self.above = 0  # new mod-sequences are above this (`reserved` when read from the start)
        self.entries: dict[int, str] = {}  # uid -> flag letters as last recorded
        self.modseq: dict[int, int] = {}  # uid -> modseq (read by the reactor: see selection)
        self.expunged: dict[int, int] = {}  # uid -> modseq, in the order they were logged
        self.stamp: Optional[tuple] = None  # (inode, size read so far)
        self.lines = 0

    # -- reading ------------------------------------------------------------------------------
    def load(self) -> None:
        """Read what was appended since we last looked (everything after a rewrite)."""
        st = file_stamp(self.path)
        if st is None:
            if self.stamp is not None:
                self._reset(self.uidvalidity)
            return
        if self.stamp is not None and st[0] == self.stamp[0] and st[1] == self.stamp[1]:
            return
        offset = 0
        if self.stamp is not None and st[0] == self.stamp[0] and st[1] > self.stamp[1]:
            offset = self.stamp[1]
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1  # a line being written is read next time
        if offset == 0:
            self._reset(0)
        self._parse(data[:end].decode("utf-8", "surrogateescape"), offset == 0)
        if offset == 0:
            # Lines after the last `R` had no fsync: a crash may have lost some of them, whose
            # mod-sequences a client may have seen. Never hand those out again.
            self.above = max(self.above, self.reserved)
        self.stamp = (st[0], offset + end)

    def _reset(self, uidvalidity: int) -> None:
        self.uidvalidity = uidvalidity
        self.entries, self.modseq, self.expunged = {}, {}, {}
        self.floor = 0
        self.lines = 0
        self.stamp = None

    def _parse(self, text: str, first: bool) -> None:
        lines = text.split("\n")
        if first:
            head = lines[0].split(" ") if lines else []
            if len(head) != 3 or " ".join(head[:2]) != HEADER or not head[2][1:].isdigit():
                return  # unknown or corrupt: rebuilt at the next record()
            self.uidvalidity = int(head[2][1:])
            lines = lines[1:]
        entries, modseq, expunged = self.entries, self.modseq, self.expunged
        highest = self.highest
        for line in lines:
            parts = line.split(" ")
            try:
                if len(parts) == 2 and parts[0] == "R":
                    self.reserved = max(self.reserved, int(parts[1]))
                    continue
                if len(parts) == 2 and parts[0] in ("H", "F"):
                    v = int(parts[1])
                    if parts[0] == "F":
                        self.floor = max(self.floor, v)
                    highest = max(highest, v)
                    continue
                if len(parts) != 3:
                    continue
                uid, ms = int(parts[0]), int(parts[1])
            except ValueError:
                continue
            highest = max(highest, ms)
            self.lines += 1
            if parts[2] == "-":
                entries.pop(uid, None)
                modseq.pop(uid, None)
                expunged.pop(uid, None)
                expunged[uid] = ms
            elif parts[2].startswith(":"):
                entries[uid] = parts[2][1:]
                modseq[uid] = ms
                expunged.pop(uid, None)
        self.highest = highest

    # -- writing ------------------------------------------------------------------------------
    def record(self, uidvalidity: int, present: dict[int, str], check: Optional[Iterable[int]],
               full: bool = True, loaded: bool = False) -> Optional[bool]:
        """Bring the log up to date with the folder: `present` maps each UID listed now to the
        flag letters of its file name; `check` are the UIDs that may have changed (None: all).
        Every change found gets the next mod-sequence (one per call, RFC 7162 §3.1 lets several
        messages share it). Returns whether anything was written; None when the log has to be
        started afresh and `present` (full=False) lists only the changed UIDs. `loaded`: the
        caller has just called load()."""
        if not loaded:
            self.load()
        if not self._pending(uidvalidity, present, check):
            return False
        with DotLock(self.path, self.rules):
            self.load()  # what other processes appended meanwhile
            fresh = self.stamp is None or self.uidvalidity != uidvalidity
            if fresh and not full:
                return None
            if fresh:
                keep = self.highest
                self._reset(uidvalidity)
                self.highest = keep
                changed, gone = sorted(present), []  # nothing recorded: every UID is new
            else:
                changed, gone = self._pending(uidvalidity, present, check, collect=True)
                if not changed and not gone:
                    return False
            ms = max(self.highest, self.above) + 1
            self.highest = ms
            reserve = ms > self.reserved
            if reserve:
                self.reserved = ms + RESERVE
            self.entries.update({u: present[u] for u in changed})
            self.modseq.update(dict.fromkeys(changed, ms))
            if self.expunged:
                for uid in changed:
                    self.expunged.pop(uid, None)
            for uid in gone:
                self.entries.pop(uid, None)
                self.modseq.pop(uid, None)
                self.expunged[uid] = ms
            self.lines += len(changed) + len(gone)
            live = len(self.entries) + len(self.expunged)
            if fresh or self.lines > 2 * live + 1000 or len(self.expunged) > 2 * MAX_EXPUNGED:
                self._compact()
            else:
                out = [f"R {self.reserved}\n"] if reserve else []
                out += [f"{u} {ms} :{present[u]}\n" for u in changed]
                out += [f"{u} {ms} -\n" for u in gone]
                self._append("".join(out), reserve)
        return True

    def _pending(self, uidvalidity: int, present: dict[int, str], check, collect: bool = False):
        entries = self.entries
        if self.uidvalidity != uidvalidity or self.stamp is None:
            if not collect:
                return True
        uids = present.keys() if check is None else check
        changed = []
        for uid in uids:
            letters = present.get(uid)
            if letters is None:
                continue
            if entries.get(uid) != letters:
                if not collect:
                    return True
                changed.append(uid)
        if check is None:
            gone = [u for u in entries if u not in present]
        else:
            gone = [u for u in check if u not in present and u in entries]
        if not collect:
            return bool(gone)
        return sorted(changed), sorted(gone)

    def _append(self, text: str, sync: bool) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
        fd = os.open(self.path, flags, 0o600)
        try:
            data = text.encode("utf-8", "surrogateescape")
            os.write(fd, data)
            if sync:
                # A mod-sequence must never be handed out twice: the reservation survives a
                # crash (docs/design/maildir.md, "Mod-sequences").
                os.fsync(fd)
        finally:
            os.close(fd)
        st = file_stamp(self.path)
        if st is not None and self.stamp is not None and st[0] == self.stamp[0] \
                and st[1] == self.stamp[1] + len(data):
            self.stamp = (st[0], st[1])
        else:
            self.stamp = None  # someone else wrote too (cannot happen under the lock): re-read
            self.load()

    def _compact(self) -> None:
        if len(self.expunged) > MAX_EXPUNGED:
            drop = list(self.expunged)[:len(self.expunged) - MAX_EXPUNGED]
            for uid in drop:
                self.floor = max(self.floor, self.expunged.pop(uid))
        out = [f"{HEADER} V{self.uidvalidity}", f"H {self.highest}"]
        if self.reserved:
            out.append(f"R {self.reserved}")
        if self.floor:
            out.append(f"F {self.floor}")
        modseq = self.modseq
        out += [f"{u} {modseq[u]} :{letters}" for u, letters in self.entries.items()]
        out += [f"{u} {ms} -" for u, ms in self.expunged.items()]
        data = ("\n".join(out) + "\n").encode("utf-8", "surrogateescape")
        atomic_write(self.path, data)
        self.lines = len(self.entries) + len(self.expunged)
        st = file_stamp(self.path)
        self.stamp = (st[0], len(data)) if st is not None else None

    # -- questions ------------------------------------------------------------------------------
    def vanished_since(self, modseq: int) -> Optional[list[int]]:
        """UIDs expunged with a mod-sequence above `modseq`, ascending; None when the log no
        longer knows (modseq below the forgotten floor): the caller reports every missing UID."""
        if modseq < self.floor:
            return None
        return sorted(u for u, ms in self.expunged.items() if ms > modseq)

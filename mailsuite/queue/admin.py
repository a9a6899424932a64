"""The queue actions an administrator takes: `mailsuite queue ...` and the dashboard's queue page.

Blocking (file reads, flock, fsync): the dashboard runs them in the io pool. Every change is
made under the same claim (flock) the queue runner takes before delivering, on an envelope
re-read under it; `retry` and `release` touch `<queue_dir>/.kick`, which a running runner polls
(docs/design/queue.md). Refusals are `QueueActionError` with a one-line reason.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mailsuite.queue.spool import Leftover, QueueEntry, Spool, SpoolError, valid_queue_id


class QueueActionError(Exception):
    """An action the queue refused (unknown, damaged or busy entry), in one line."""


@dataclass
class QueueSnapshot:
    """What is in the spool now: the entries, the damaged ones, files not part of any entry."""

    entries: list[QueueEntry] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    leftovers: list[Leftover] = field(default_factory=list)

    def pending(self) -> int:
        return sum(1 for e in self.entries for r in e.recipients if r.state == "pending")


def snapshot(spool: Spool, now: float | None = None) -> QueueSnapshot:
    found = QueueSnapshot()
    for queue_id in spool.ids():
        try:
            found.entries.append(spool.load(queue_id))
        except SpoolError as e:
            if "damaged" in str(e):  # otherwise delivered and removed while we listed
                found.damaged.append(str(e))
    found.leftovers = spool.leftovers(time.time() if now is None else now)
    return found


def retry(spool: Spool, queue_id: str) -> QueueEntry:
    """Make every pending recipient of one entry due now. A held entry stays held."""
    entry = change(spool, queue_id, make_due)
    spool.kick()
    return entry


def retry_all(spool: Spool) -> tuple[int, list[str]]:
    """(entries made due, the ids of those that are held)."""
    count, held = 0, []
    for queue_id in spool.ids():
        try:
            entry = change(spool, queue_id, make_due)
        except QueueActionError:
            continue  # delivered and gone while we went through the list
        count += 1
        if entry.held:
            held.append(queue_id)
    spool.kick()
    return count, held


def hold(spool: Spool, queue_id: str) -> QueueEntry:
    return change(spool, queue_id, lambda e: setattr(e, "held", True))


def release(spool: Spool, queue_id: str) -> QueueEntry:
    entry = change(spool, queue_id, lambda e: (setattr(e, "held", False), make_due(e)))
    spool.kick()
    return entry


def delete(spool: Spool, queue_id: str) -> None:
    """Remove an entry without delivering or bouncing it (a damaged one too)."""
    # No envelope parsing here: a damaged entry must be removable too. Without a message file
    # there is nothing to lock, and no runner can claim (deliver) it either.
    if (valid_queue_id(queue_id) and os.path.exists(spool.envelope_path(queue_id))
            and not os.path.exists(spool.message_path(queue_id))):
        spool.remove(queue_id)
    else:
        with _claim(spool, queue_id):
            spool.remove(queue_id)


def load(spool: Spool, queue_id: str) -> QueueEntry:
    try:
        return spool.load(queue_id)
    except SpoolError as e:
        raise QueueActionError(str(e)) from None


def change(spool: Spool, queue_id: str, edit: Callable[[QueueEntry], Any]) -> QueueEntry:
    """Re-read the envelope under the claim (the runner may just have updated it), edit, save."""
    load(spool, queue_id)
    with _claim(spool, queue_id):
        entry = load(spool, queue_id)
        edit(entry)
        spool.save(entry)
    return entry


def make_due(entry: QueueEntry) -> None:
    for r in entry.recipients:
        if r.state == "pending":
            r.next_attempt = 0.0


def _claim(spool: Spool, queue_id: str) -> Any:
    try:
        return spool.claim_wait(queue_id)
    except SpoolError as e:
        raise QueueActionError(str(e)) from None


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def format_next(when: float, now: float) -> str:
    if when <= now:
        return "now"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when))
    return f"in {format_duration(when - now)} ({stamp} UTC)"

"""The seams of the queue: what it calls to deliver, and what others call to enqueue.

The queue runner receives one `DeliveryAgent` per kind of recipient (local Maildir, remote SMTP)
and a `BounceNotifier`; it imports neither implementation. The SMTP server and anything else that
accepts mail see the queue only as a `MessageQueue`. The notifier does not enqueue: it returns a
`Notification` and the runner submits it (docs/design/queue.md, "Notifications").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

from twisted.internet.defer import Deferred

from mailsuite.queue.spool import DeliveryResult, QueueEntry, Recipient


@runtime_checkable
class DeliveryAgent(Protocol):
    """Delivers some recipients of one spooled message.

    Fires with one `DeliveryResult` per recipient, in any order; never errbacks for a delivery
    problem (that is a "deferred" or "bounced" result). Blocking work runs in the agent's pool.
    The local agent also takes `after_crash=True`, passed only when the runner cannot vouch
    that no copy was written yet (docs/design/queue.md, "Exactly once").
    """

    def deliver(self, entry: QueueEntry, recipients: Sequence[Recipient],
                message_path: str) -> Deferred:
        ...


@dataclass(frozen=True)
class LocalCopy:
    """What a local agent's `deliver_now(entry, message_path) -> list[LocalCopy]` (optional,
    blocking, one per recipient of a new entry) did: the outcome and, when a copy was written,
    its path, whose directory the queue still has to fsync (docs/design/queue.md, "Delivery at
    spool time")."""

    result: DeliveryResult
    path: str | None


@dataclass(frozen=True)
class Notification:
    """A message the queue should send from <> (a DSN): what `MessageQueue.submit` takes."""

    recipients: Sequence[tuple[str, Any]]  # (address, its directory Route)
    data: bytes
    meta: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class BounceNotifier(Protocol):
    """Builds what tells the envelope sender what happened (RFC 3464 DSNs).

    Both methods fire with a `Notification` for the queue to submit, or None when there is
    nothing to send. The message file is still in the spool while they run (a DSN quotes its
    headers). They never submit anything themselves, so the notifier needs no queue.
    """

    def bounce(self, entry: QueueEntry, recipients: Sequence[Recipient],
               message_path: str) -> Deferred:
        ...

    def delay(self, entry: QueueEntry, recipients: Sequence[Recipient],
              message_path: str) -> Deferred:
        ...


class StagedFile(Protocol):
    """A message still being written to its file in `incoming_dir` (smtp/staging.py)."""

    def finish(self, then: Callable[[str], Any],
               then_data: Callable[[bytes], Any] | None = None) -> Deferred:
        """Completes the file, then runs `then(path)` in the same io job; fires with its
        result. A message still all in memory may go to `then_data(message)` instead (no
        file is made)."""
        ...


@runtime_checkable
class MessageQueue(Protocol):
    """Accepts a message durably: fires with the queue id once message and envelope are fsynced.

    A message held in memory (a DSN) goes to `submit`. A receiver that streams a message to disk
    (SMTP DATA) writes it to a file of its own in `incoming_dir` (same filesystem as the spool)
    and hands it to `submit_file`, which takes the file over (fsync, rename into the spool) or,
    on failure, leaves it where it was for the receiver to remove (docs/design/smtp.md). Given
    the StagedFile instead of its path, it takes the file over in the io job that completes it.
    """

    incoming_dir: str

    def submit(self, sender: str, recipients: Sequence[tuple[str, Any]], data: bytes,
               meta: Mapping[str, Any]) -> Deferred:
        ...

    def submit_file(self, sender: str, recipients: Sequence[tuple[str, Any]],
                    path: str | StagedFile, size: int, meta: Mapping[str, Any]) -> Deferred:
        ...

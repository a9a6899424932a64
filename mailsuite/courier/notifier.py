"""The bounce notifier: builds the DSNs (RFC 3464) the queue sends from <> to the sender.

It never submits anything: it returns a `Notification` and the queue runner, which calls it,
queues it like any other message. So the notifier needs no queue, and the runner can be built
with its notifier in one step (docs/design/queue.md, "Notifications").
"""
from __future__ import annotations

from typing import Any, Sequence

from twisted.internet import defer

from mailsuite.courier.dsn import Action, build_dsn
from mailsuite.directory.api import DirectoryService
from mailsuite.pools import WorkPool
from mailsuite.queue.agents import Notification
from mailsuite.queue.spool import QueueEntry, Recipient

HEADER_LIMIT = 256 * 1024  # octets of the original message read to find its header section


class Notifier:
    """A BounceNotifier: a "failed" DSN for bounced recipients, a "delayed" one for late ones.

    `directory` routes the DSN to the sender (one of our users, or remote); `io` reads the
    original header section off the reactor; `hostname` names us in the DSN; `max_age` gives
    the "will retry until" date of a delay warning.
    """

    def __init__(self, directory: DirectoryService, io: WorkPool, hostname: str,
                 max_age: float):
        self.directory = directory
        self.io = io
        self.hostname = hostname
        self.max_age = max_age

    def bounce(self, entry: QueueEntry, recipients: Sequence[Recipient],
               message_path: str) -> defer.Deferred:
        return self._build(entry, recipients, message_path, "failed")

    def delay(self, entry: QueueEntry, recipients: Sequence[Recipient],
              message_path: str) -> defer.Deferred:
        return self._build(entry, recipients, message_path, "delayed")

    @defer.inlineCallbacks
    def _build(self, entry: QueueEntry, recipients: Sequence[Recipient], message_path: str,
               action: Action) -> Any:
        if not entry.sender or not recipients:
            # RFC 5321 §4.5.5 / RFC 3464 §2: never a notification about a notification. (The
            # queue does not ask for one; this keeps the notifier right on its own.)
            return None
        try:
            headers = yield self.io.run(read_headers, message_path)
        except OSError:
            headers = b""
        retry_until = entry.created + self.max_age if action == "delayed" else None
        data = build_dsn(entry, list(recipients), action, headers, self.hostname,
                         retry_until=retry_until)
        route = yield self.directory.route(entry.sender)
        return Notification(recipients=[(entry.sender, route)], data=data,
                            meta={"client_ip": "", "helo": self.hostname, "auth_user": "",
                                  "protocol": "DSN"})


def read_headers(path: str, limit: int = HEADER_LIMIT) -> bytes:
    """The header section of the spooled message, read as bytes (8-bit safe)."""
    with open(path, "rb") as f:
        head = f.read(limit)
    end = head.find(b"\r\n\r\n")
    return head if end < 0 else head[:end + 2]

"""Local delivery agent: one copy per local recipient into `config.maildir_for(address)`.

Same interface as the courier's remote agent: `deliver(entry, recipients, message_path)` returns
a Deferred list of DeliveryResult. A write failure (disk full, permissions, a broken Maildir) is a
temporary failure: the queue retries it with backoff and never drops the message.
"""
from __future__ import annotations

import errno
import os
from typing import Any

from twisted.internet import defer

from mailsuite.delivery.maildir import deliver_to_maildir
from mailsuite.queue.spool import DeliveryResult, QueueEntry, Recipient


def trace_headers(sender: str, address: str) -> bytes:
    """`Return-Path` (RFC 5321 §4.4, added at final delivery) and `Delivered-To` (loop marker)."""
    def clean(s: str) -> str:  # addresses come from SMTP parsing; never let one split a header
        return s.replace("\r", "").replace("\n", "")

    return (f"Return-Path: <{clean(sender)}>\r\nDelivered-To: {clean(address)}\r\n"
            .encode("utf-8"))


class LocalDeliveryAgent:
    """Writes spooled messages into local Maildirs, in suite.pools.io."""

    def __init__(self, suite: Any):
        self.suite = suite

    def deliver(self, entry: QueueEntry, recipients: list[Recipient],
                message_path: str) -> defer.Deferred:
        return self.suite.pools.io.run(self.deliver_blocking, entry, recipients, message_path)

    def deliver_blocking(self, entry: QueueEntry, recipients: list[Recipient],
                         message_path: str) -> list[DeliveryResult]:
        """The same, synchronously (the queue runner calls this inside its own io job)."""
        return [self._deliver_one(entry, r, message_path) for r in recipients]

    def _deliver_one(self, entry: QueueEntry, recipient: Recipient,
                     message_path: str) -> DeliveryResult:
        config = self.suite.config
        maildir = config.maildir_for(recipient.address.lower())
        try:
            path = deliver_to_maildir(maildir, trace_headers(entry.sender, recipient.address),
                                      message_path=message_path, hostname=config.hostname)
        except OSError as e:
            reason = e.strerror or str(e)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                # RFC 3463 §3.4 / §3.5: mailbox or system full, both temporary.
                return DeliveryResult(recipient.address, "deferred",
                                      f"452 4.3.1 cannot write Maildir {maildir}: {reason}",
                                      enhanced="4.3.1")
            return DeliveryResult(recipient.address, "deferred",
                                  f"451 4.3.0 cannot write Maildir {maildir}: {reason}",
                                  enhanced="4.3.0")
        return DeliveryResult(recipient.address, "sent",
                              f"250 2.0.0 delivered to maildir as {os.path.basename(path)}",
                              enhanced="2.0.0")

"""Local delivery agent: one copy per local recipient into its INBOX, through the mailbox store.

The queue calls it like the remote agent, as a `DeliveryAgent`: `deliver(entry, recipients,
message_path)` fires with one DeliveryResult per recipient. The mailbox store owns the Maildir
layout and the durable write (docs/design/maildir.md); this module only adds the trace headers
and turns a write failure (disk full, permissions, a broken Maildir) into a temporary failure, so
the queue retries it with backoff and never drops the message.
"""
from __future__ import annotations

import errno
import os
from typing import Any, Mapping, Sequence

from twisted.internet import defer

from mailsuite.mailbox import MailStoreAPI
from mailsuite.mailbox.maildir import delivery_marker, find_delivered
from mailsuite.mailbox.store import MailboxError
from mailsuite.pools import WorkPool
from mailsuite.queue.agents import LocalCopy
from mailsuite.queue.spool import DeliveryResult, QueueEntry, Recipient


def trace_headers(sender: str, address: str) -> bytes:
    """`Return-Path` (RFC 5321 §4.4, added at final delivery) and `Delivered-To` (loop marker)."""
    def clean(s: str) -> str:  # addresses come from SMTP parsing; never let one split a header
        return s.replace("\r", "").replace("\n", "")

    return (f"Return-Path: <{clean(sender)}>\r\nDelivered-To: {clean(address)}\r\n"
            .encode("utf-8"))


def quarantine(meta: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    """(folder, flags) for a queue entry: the INBOX unless its meta names a quarantine folder
    (`folder`, `flags`: set by the SMTP server from the trust verdict)."""
    folder = meta.get("folder")
    flags = meta.get("flags") or ()
    if not isinstance(folder, str) or not folder:
        return "INBOX", ()
    return folder, tuple(f for f in flags if isinstance(f, str))


class LocalAgent:
    """A DeliveryAgent writing into our users' INBOXes; the writes run in the `io` pool."""

    def __init__(self, mailstore: MailStoreAPI, io: WorkPool, hostname: str):
        self.mailstore = mailstore
        self.io = io
        self.hostname = hostname

    def deliver(self, entry: QueueEntry, recipients: Sequence[Recipient],
                message_path: str, after_crash: bool = False) -> defer.Deferred:
        """`after_crash`: an attempt of this entry may have been cut short after writing some
        copies (the queue runner cannot tell otherwise); look for them before writing."""
        return self.io.run(self._deliver_all, entry, list(recipients), message_path,
                           after_crash)

    def deliver_now(self, entry: QueueEntry, message_path: str | None,
                    data: bytes | None = None) -> list[LocalCopy]:
        """Blocking, in the caller's io job: deliver every recipient of a new entry (not yet in
        the spool) from `message_path` (or from `data`, a message still in memory), without
        the directory fsyncs: the caller fsyncs each copy's directory (group commit) before it
        tells anyone (docs/design/queue.md, "Delivery at spool time"). Same fixed names as
        `deliver`, so a later attempt of a recipient recorded as pending writes the same
        name."""
        return [self._deliver_one(entry, r, i, message_path, False, sync_dir=False, data=data)
                for i, r in enumerate(entry.recipients)]

    def find_copies(self, entry: QueueEntry) -> list[tuple[Recipient, DeliveryResult]]:
        """Blocking: the copies of `entry` already in its recipients' Maildirs, found by their
        fixed names and written by nobody now; for the log lines of a delivery at spool time
        that a dead process may not have written (docs/design/queue.md, "The mail log")."""
        found = []
        folder, _ = quarantine(entry.meta)
        for index, recipient in enumerate(entry.recipients):
            if not recipient.local:
                continue
            try:
                account = self.mailstore.account(recipient.address.lower())
                path = (account.path if folder == "INBOX"
                        else account._path_of(folder))  # quarantine folder of the account
                copy = find_delivered(path, delivery_marker(entry.created, f"Q{entry.id}N{index}"))
            except (OSError, MailboxError):
                continue
            if copy is not None:
                found.append((recipient, DeliveryResult(
                    recipient.address, "sent",
                    f"250 2.0.0 already in maildir as {os.path.basename(copy)} (delivered at "
                    f"spool time by a process that died before logging it)", enhanced="2.0.0")))
        return found

    def _deliver_all(self, entry: QueueEntry, recipients: list[Recipient],
                     message_path: str, after_crash: bool) -> list[DeliveryResult]:
        # A recipient's place in the envelope names its file (see _deliver_one).
        index = {id(r): i for i, r in enumerate(entry.recipients)}
        return [self._deliver_one(entry, r, index.get(id(r)), message_path, after_crash).result
                for r in recipients]

    def _deliver_one(self, entry: QueueEntry, recipient: Recipient, index: int | None,
                     message_path: str | None, after_crash: bool, sync_dir: bool = True,
                     data: bytes | None = None) -> LocalCopy:
        return LocalCopy(*self._write_one(entry, recipient, index, message_path, after_crash,
                                          sync_dir, data))

    def _write_one(self, entry: QueueEntry, recipient: Recipient, index: int | None,
                   message_path: str | None, after_crash: bool, sync_dir: bool,
                   data: bytes | None = None) -> tuple[DeliveryResult, str | None]:
        try:
            account = self.mailstore.account(recipient.address.lower())
        except MailboxError as e:  # the directory never routes to one; defer, keep the message
            return DeliveryResult(recipient.address, "deferred", f"451 4.3.0 {e}",
                                  enhanced="4.3.0"), None
        # One file name per (queue id, recipient): a second attempt writes the same name, and
        # a recipient attempted before (by a crashed process, or deferred after a write that
        # may have landed) is looked for first. docs/design/maildir.md, "Exactly once".
        if index is None:  # a copy of the recipient, not the envelope's own object
            index = next((i for i, r in enumerate(entry.recipients)
                          if r.address == recipient.address and r.local), None)
        # Not in the envelope at all (a caller outside the queue): a name of its own.
        unique = (f"Q{entry.id}N{index}" if index is not None
                  else f"Q{entry.id}R{os.urandom(4).hex()}")
        try:
            # The trust checks may have quarantined the message (docs/design/trust.md,
            # "Dispositions"): it goes to that folder with its keywords instead of the INBOX.
            folder, flags = quarantine(entry.meta)
            path, written = account.deliver_once(
                trace_headers(entry.sender, recipient.address), message_path,
                when=entry.created, unique=unique, hostname=self.hostname,
                recheck=after_crash or recipient.attempts > 0, folder=folder, flags=flags,
                sync_dir=sync_dir, data=data)
        except OSError as e:
            reason = e.strerror or str(e)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                # RFC 3463 §3.4 / §3.5: mailbox or system full, both temporary.
                return DeliveryResult(recipient.address, "deferred",
                                      f"452 4.3.1 cannot write Maildir {account.path}: {reason}",
                                      enhanced="4.3.1"), None
            return DeliveryResult(recipient.address, "deferred",
                                  f"451 4.3.0 cannot write Maildir {account.path}: {reason}",
                                  enhanced="4.3.0"), None
        except MailboxError as e:  # UnsafePath: the Maildir resolves outside mail_dir
            return DeliveryResult(recipient.address, "deferred", f"451 4.3.0 {e}",
                                  enhanced="4.3.0"), None
        name = os.path.basename(path)
        if not written:
            return DeliveryResult(recipient.address, "sent",
                                  f"250 2.0.0 already in maildir as {name} (an interrupted "
                                  f"attempt delivered it)", enhanced="2.0.0", path=path), path
        return DeliveryResult(recipient.address, "sent",
                              f"250 2.0.0 delivered to maildir as {name}", enhanced="2.0.0",
                              path=path), path

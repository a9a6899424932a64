"""One delivery attempt's bookkeeping for the queue runner (docs/design/queue.md): the outcome
of each recipient applied to the envelope, when an entry is next due, and the RCPT addresses
expanded into delivery targets."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from mailsuite import maillog
from mailsuite.config import QueueSection
from mailsuite.queue.spool import Claim, DeliveryResult, QueueEntry, Recipient, Stamp


@dataclass
class Work:
    """One attempt in progress on a claimed entry."""

    claim: Claim | None
    entry: QueueEntry
    now: float
    message_path: str
    retry_schedule: list[int] = field(default_factory=lambda: [300])
    max_age: float = 5 * 24 * 3600
    local: list[Recipient] = field(default_factory=list)
    remote: list[Recipient] = field(default_factory=list)
    bounced: list[Recipient] = field(default_factory=list)  # newly bounced in this attempt
    changed: bool = False
    finished: bool = False  # removed from the spool in the first io job
    retry_bounce: bool = False  # entry.bounce_pending is due: try queuing that bounce again
    after_crash: bool = True  # look for local copies before writing them ("Exactly once")
    stamp: Stamp | None = None  # of the envelope as this attempt last saw or wrote it
    # Log lines made in io threads are emitted from the reactor thread (flush_logs).
    logs: list[tuple[QueueEntry, Recipient, str, DeliveryResult, float, str]] = field(
        default_factory=list)

    def can_finish_now(self, config: QueueSection) -> bool:
        """Only local recipients, all done, nothing to tell the sender: remove at once."""
        return (not self.remote and not self.bounced and not self.needs_warning(config)
                and not self.entry.bounce_pending
                and all(r.state != "pending" for r in self.entry.recipients))

    def needs_warning(self, config: QueueSection) -> bool:
        """Is a delay warning due (decided and sent by QueueRunner._notify)?"""
        return (not self.entry.warned and config.delay_warning > 0 and bool(self.entry.sender)
                and self.now - self.entry.created >= config.delay_warning
                and any(r.state == "pending" for r in self.entry.recipients))

    def flush_logs(self) -> None:
        logs, self.logs = self.logs, []
        for args in logs:
            maillog.attempt(*args)

    def record(self, recipients: list[Recipient], results: Iterable[DeliveryResult],
               relay: str | None) -> None:
        """Apply results to the recipients (matched by address) and log one line each."""
        by_address: dict[str, DeliveryResult] = {}
        for result in results:
            by_address.setdefault(result.address.lower(), result)
        for rcpt in recipients:
            result = by_address.get(rcpt.address.lower()) or DeliveryResult(
                rcpt.address, "deferred", "451 4.3.0 no result from the delivery agent")
            status = apply_result(self.entry, rcpt, result, self.now, self.retry_schedule,
                                  self.max_age)
            self.changed = True
            if status == "bounced":
                self.bounced.append(rcpt)
            self.logs.append((self.entry, rcpt, status, result, self.now,
                              relay or result.remote_mta or "none"))


def apply_result(entry: QueueEntry, rcpt: Recipient, result: DeliveryResult, now: float,
                 retry_schedule: list[int], max_age: float) -> str:
    """Record one outcome on a recipient; returns the final status (a deferral can expire)."""
    rcpt.attempts += 1
    if result.remote_mta:
        rcpt.remote_mta = result.remote_mta
    if result.status == "sent":
        rcpt.state = "sent"
        rcpt.last_error = ""
        return "sent"
    rcpt.last_error = result.detail
    if result.status == "bounced":
        rcpt.state = "bounced"
        return "bounced"
    if now - entry.created >= max_age:
        rcpt.state = "bounced"
        rcpt.last_error = f"{result.detail} (gave up: in the queue longer than {max_age:g}s)"
        return "bounced"
    # The last value of the schedule repeats until max_age.
    step = retry_schedule[min(rcpt.attempts - 1, len(retry_schedule) - 1)] if retry_schedule \
        else 300
    rcpt.next_attempt = now + step
    return "deferred"


def entry_due(entry: QueueEntry) -> float:
    """When an entry next needs an attempt: the earliest pending retry time (inf if held/done)."""
    if entry.held:
        return float("inf")
    times = [r.next_attempt for r in entry.recipients if r.state == "pending"]
    if entry.bounce_pending:
        times.append(entry.bounce_at)
    return min(times) if times else 0.0


def expand_recipients(recipients: Iterable[tuple[str, Any]]) -> list[Recipient]:
    """RCPT addresses with their Routes -> delivery targets, duplicates collapsed.

    Hosted: one local recipient per mailbox and one remote per forward target. Not hosted and
    no targets: the address itself, remote. `original` keeps the RCPT address (DSNs).
    """
    seen: set[tuple[str, bool]] = set()
    out: list[Recipient] = []
    for address, route in recipients:
        targets: list[tuple[str, bool]]
        if route is None or not (route.mailboxes or route.remote):
            targets = [] if (route is not None and route.hosted) else [(address, False)]
        else:
            targets = ([(m, True) for m in route.mailboxes]
                       + [(r, False) for r in route.remote])
        for target, local in targets:
            key = (target.lower() if local else _fold_domain(target), local)
            if key in seen:
                continue
            seen.add(key)
            out.append(Recipient(address=target.lower() if local else target,
                                 original=address, local=local))
    return out


def _fold_domain(address: str) -> str:
    local, at, domain = address.rpartition("@")
    return f"{local}{at}{domain.lower()}" if at else address

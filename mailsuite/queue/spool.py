"""The durable spool: one message file and one JSON envelope per accepted message.

Contract shared with the SMTP server (which submits), the courier (remote delivery, DSNs) and the
admin CLI: `Recipient`, `QueueEntry`, `DeliveryResult`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

RecipientState = Literal["pending", "sent", "bounced"]
DeliveryStatus = Literal["sent", "deferred", "bounced"]


@dataclass
class Recipient:
    """One delivery target of a queue entry (after alias expansion)."""

    address: str  # where it goes: a canonical local mailbox or a remote address
    original: str  # the RCPT TO address it came from (for DSN Original-Recipient)
    local: bool  # True: Maildir of one of our users; False: remote SMTP
    state: RecipientState = "pending"
    attempts: int = 0
    next_attempt: float = 0.0  # epoch seconds; 0 = as soon as possible
    last_error: str = ""  # e.g. "451 4.3.0 cannot write Maildir: No space left on device"
    remote_mta: str = ""  # host that gave the last answer (DSN Remote-MTA)


@dataclass
class QueueEntry:
    """The envelope of one accepted message."""

    id: str
    sender: str  # "" is the null reverse-path <>
    recipients: list[Recipient]
    created: float  # epoch seconds when the 250 was given
    meta: dict[str, Any] = field(default_factory=dict)  # client_ip, helo, auth_user, protocol
    held: bool = False  # `mailsuite queue hold`: not attempted until released
    warned: bool = False  # the delay warning (on_delay) was sent


@dataclass
class DeliveryResult:
    """The outcome of one delivery attempt for one recipient."""

    address: str
    status: DeliveryStatus
    detail: str  # e.g. "550 5.1.1 no such user"
    remote_mta: str = ""
    enhanced: str = ""  # RFC 3463 code, e.g. "5.1.1"

"""Plain records the directory hands out (never ORM objects: they would lazy-load on the reactor
thread: docs/design/twisted.md, "Blocking work"), and its errors."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


class DirectoryError(Exception):
    """A refused directory change or lookup (unknown domain, duplicate user, invalid address...).

    str(error) is one line meant for the operator.
    """


class DirectoryUnavailable(DirectoryError):
    """The database cannot be reached or is busy: a temporary failure (answer 4xx, not 5xx)."""


@dataclass(frozen=True)
class Route:
    """Where mail for one RCPT address goes.

    address:   the address asked about (lower-case when hosted; a remote local part keeps its case).
    hosted:    the domain is one of ours.
    mailboxes: canonical user addresses whose Maildir receives a copy (aliases expanded, nested,
               loop-safe, +tag stripped, duplicates collapsed).
    remote:    addresses outside our domains that an alias forwards to.
    An address of a hosted domain with neither mailboxes nor remote targets does not exist (550).
    """

    address: str
    hosted: bool
    mailboxes: tuple[str, ...] = field(default_factory=tuple)
    remote: tuple[str, ...] = field(default_factory=tuple)

    @property
    def exists(self) -> bool:
        return bool(self.mailboxes or self.remote)


@dataclass(frozen=True)
class DomainInfo:
    name: str
    created: datetime
    users: int
    aliases: int


@dataclass(frozen=True)
class UserInfo:
    address: str
    enabled: bool
    created: datetime


@dataclass(frozen=True)
class AliasInfo:
    source: str  # full address, or "@domain" for a catch-all
    targets: tuple[str, ...]


# -- inbound trust state (docs/design/trust-limits.md) --------------------------------------------
GREYLIST_WHITELISTED, GREYLIST_RETRIED, GREYLIST_NEW, GREYLIST_EARLY = (
    "whitelisted", "retried", "new", "early")


@dataclass(frozen=True)
class GreylistOutcome:
    """What `greylist_check` decided for one triplet.

    passed: accept it now. reason: "whitelisted" (the client network passes), "retried" (a retry
    after the delay: the network is whitelisted from now on), "new" (first sight, or not
    retried within the retry window) or "early" (retried before the delay was over).
    retry_in: seconds before a retry will be accepted (0 when passed)."""

    passed: bool
    reason: str
    retry_in: int = 0


@dataclass(frozen=True)
class RateOutcome:
    """What `rate_hit` decided: allowed (and counted) or not. count: the window's count after
    this hit (when allowed) or as it stands (when refused); retry_after: seconds until the
    window ends (0 when allowed)."""

    allowed: bool
    count: int
    limit: int
    retry_after: int = 0


@dataclass(frozen=True)
class RateCounter:
    """One current rate window, for `mailsuite limits show`."""

    key: str
    window_start: int
    window_end: int
    count: int


@dataclass(frozen=True)
class GreylistCounts:
    """Current greylist rows: triplets waiting for their retry, triplets that passed, client
    networks that pass."""

    pending: int
    passed: int
    whitelisted: int

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

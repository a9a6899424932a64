"""Contract of the directory (to be implemented; see issue 2)."""
from __future__ import annotations

from dataclasses import dataclass, field


class DirectoryError(Exception):
    """A refused directory change (unknown domain, duplicate user, invalid address...)."""


@dataclass(frozen=True)
class Route:
    """Where mail for one RCPT address goes.

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


class Directory:
    """Asynchronous directory used by the protocols: see the implementation."""

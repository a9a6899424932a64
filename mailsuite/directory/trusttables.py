"""`TrustTables`: the inbound-trust state every instance shares through the directory's
database, greylist triplets and whitelisted networks, and rate windows
(docs/design/trust-limits.md). A base of `DirectoryStore`; blocking, called in the db pool.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mailsuite.directory.database import DirectoryDatabase
from mailsuite.directory.models import GreylistEntry, GreylistPass, RateWindow
from mailsuite.directory.records import (GREYLIST_EARLY, GREYLIST_NEW, GREYLIST_RETRIED,
                                         GREYLIST_WHITELISTED, DirectoryUnavailable,
                                         GreylistCounts, GreylistOutcome, RateCounter,
                                         RateOutcome)


class TrustTables(DirectoryDatabase):
    """Greylist and rate-window tables (`ms_greylist`, `ms_greylist_pass`, `ms_rate`)."""

    def greylist_check(self, network: str, sender: str, recipient: str, now: float, delay: int,
                       retry_window: int, pass_ttl: int) -> GreylistOutcome:
        """Decide one (client network, sender, recipient) triplet at time `now` and record it.

        Passes when the network is whitelisted, or when the triplet was first seen at least
        `delay` seconds ago and less than `retry_window` ago (then the network is whitelisted
        until now + pass_ttl); otherwise records the triplet and says how long to wait. Safe
        when several instances decide the same new triplet at once (docs/design/trust-limits.md,
        "Atomicity")."""
        now = int(now)
        network = trust_text(network, 64)
        sender = trust_text(sender, 320).lower() or "<>"
        recipient = trust_text(recipient, 320).lower()
        with self._unit(write=True) as s:
            expires = s.scalar(select(GreylistPass.expires)
                               .where(GreylistPass.network == network))
            if expires is not None and expires > now:
                if expires - now < pass_ttl / 2:  # keep a network that keeps sending (one write
                    _whitelist(s, network, now + pass_ttl)  # per half pass_ttl at most)
                return GreylistOutcome(True, GREYLIST_WHITELISTED)
            triplet = (GreylistEntry.network == network, GreylistEntry.sender == sender,
                       GreylistEntry.recipient == recipient)
            for _attempt in range(3):
                row = s.execute(select(GreylistEntry.first_seen, GreylistEntry.passed_at,
                                       GreylistEntry.expires).where(*triplet)).first()
                if row is None:
                    if insert_new(s, GreylistEntry, network=network, sender=sender,
                                  recipient=recipient, first_seen=now, last_seen=now,
                                  passed_at=None, expires=now + retry_window):
                        return GreylistOutcome(False, GREYLIST_NEW, max(1, delay))
                    continue  # another instance inserted it meanwhile: read its row
                first_seen, passed_at, row_expires = row
                if row_expires <= now:  # forgotten: not retried in time, or passed long ago
                    s.execute(update(GreylistEntry).where(*triplet).values(
                        first_seen=now, last_seen=now, passed_at=None,
                        expires=now + retry_window).execution_options(synchronize_session=False))
                    return GreylistOutcome(False, GREYLIST_NEW, max(1, delay))
                if passed_at is not None or now - first_seen >= delay:
                    s.execute(update(GreylistEntry).where(*triplet).values(
                        last_seen=now, passed_at=passed_at if passed_at is not None else now,
                        expires=now + pass_ttl).execution_options(synchronize_session=False))
                    _whitelist(s, network, now + pass_ttl)
                    return GreylistOutcome(True, GREYLIST_RETRIED)
                s.execute(update(GreylistEntry).where(*triplet).values(last_seen=now)
                          .execution_options(synchronize_session=False))
                return GreylistOutcome(False, GREYLIST_EARLY, max(1, first_seen + delay - now))
        raise DirectoryUnavailable("greylist: the triplet row kept changing under us")

    def greylist_counts(self, now: float) -> GreylistCounts:
        now = int(now)
        with self._unit() as s:
            live = GreylistEntry.expires > now
            pending = s.scalar(select(func.count()).where(live, GreylistEntry.passed_at.is_(None)))
            passed = s.scalar(select(func.count()).where(live,
                                                         GreylistEntry.passed_at.is_not(None)))
            whitelisted = s.scalar(select(func.count()).where(GreylistPass.expires > now))
        return GreylistCounts(int(pending or 0), int(passed or 0), int(whitelisted or 0))

    def rate_hit(self, key: str, window_seconds: int, limit: int, now: float,
                 cost: int = 1) -> RateOutcome:
        """Count `cost` hits of `key` in the fixed window of `window_seconds` holding `now`,
        unless that would take the window past `limit` (then nothing is counted).

        One conditional UPDATE does check and increment at once, so instances sharing the
        database never let a window past its limit; the first hit of a window inserts its row,
        and an insert that loses a race to another instance's is retried as the UPDATE."""
        now = int(now)
        window_seconds = max(1, int(window_seconds))
        start = now - now % window_seconds
        end = start + window_seconds
        key = trust_text(key, 400)
        with self._unit(write=True) as s:
            window = (RateWindow.key == key, RateWindow.window_start == start)
            for _attempt in range(3):
                counted = s.execute(
                    update(RateWindow).where(*window, RateWindow.count + cost <= limit)
                    .values(count=RateWindow.count + cost)
                    .execution_options(synchronize_session=False)).rowcount
                count = s.scalar(select(RateWindow.count).where(*window))
                if counted:
                    return RateOutcome(True, int(count), limit)
                if count is not None:
                    return RateOutcome(False, int(count), limit, end - now)
                if cost > limit:
                    return RateOutcome(False, 0, limit, end - now)
                if insert_new(s, RateWindow, key=key, window_start=start, window_end=end,
                              count=cost):
                    return RateOutcome(True, cost, limit)
        raise DirectoryUnavailable(f"rate counter {key}: the window row kept changing under us")

    def rate_counters(self, now: float) -> list[RateCounter]:
        """The windows that have not ended at `now`, by key."""
        with self._unit() as s:
            rows = s.execute(select(RateWindow.key, RateWindow.window_start,
                                    RateWindow.window_end, RateWindow.count)
                             .where(RateWindow.window_end > int(now))
                             .order_by(RateWindow.key, RateWindow.window_start)).all()
        return [RateCounter(k, int(a), int(b), int(c)) for k, a, b, c in rows]

    def rate_reset(self, key: str) -> int:
        """Forget every window of `key` (the admin lifting a limit early); rows removed."""
        with self._unit(write=True) as s:
            return s.execute(delete(RateWindow).where(RateWindow.key == key)).rowcount

    def purge_trust(self, now: float) -> tuple[int, int, int]:
        """Delete expired greylist triplets, whitelisted networks and ended rate windows;
        (triplets, networks, windows) removed."""
        now = int(now)
        with self._unit(write=True) as s:
            triplets = s.execute(delete(GreylistEntry).where(GreylistEntry.expires <= now))
            networks = s.execute(delete(GreylistPass).where(GreylistPass.expires <= now))
            windows = s.execute(delete(RateWindow).where(RateWindow.window_end <= now))
            return triplets.rowcount, networks.rowcount, windows.rowcount


def trust_text(value: Any, size: int) -> str:
    """A key column's value: a string, cut to the column's size (a client's address can be
    anything it makes up; the column must not overflow on PostgreSQL)."""
    return (value if isinstance(value, str) else str(value))[:size]


def insert_new(s: Session, model: Any, **values: Any) -> bool:
    """Insert one row in a savepoint; False if a unique constraint says another transaction
    (another instance) inserted it first: the caller reads that row instead."""
    try:
        with s.begin_nested():
            s.execute(insert(model).values(**values))
        return True
    except IntegrityError:
        return False


def _whitelist(s: Session, network: str, expires: int) -> None:
    """Let `network` pass greylisting until `expires` (insert or update, race-safe)."""
    for _attempt in range(3):
        if s.execute(update(GreylistPass).where(GreylistPass.network == network)
                     .values(expires=expires)
                     .execution_options(synchronize_session=False)).rowcount:
            return
        if insert_new(s, GreylistPass, network=network, expires=expires):
            return

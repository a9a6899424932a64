"""Successful password verifications remembered for a while (docs/design/directory.md,
"Login cache").

    cache = LoginCache(ttl=300.0, clock=reactor)
    tag = cache.tag(address, password)        HMAC-SHA256 of the password under a key made
                                              for this object; the password itself is not kept
    cache.hit(address, tag, stored) -> bool   verified before, with this very stored hash
    cache.remember(address, tag, stored)      after argon2 said yes
    cache.verify_once(key, verify)            one verification for identical concurrent logins

A hit needs the stored hash string read from the directory for this login to be the one the
verification was made against: `mailsuite user passwd` (any process, any instance sharing the
database) writes a new hash with a new salt, so the next login everywhere misses and verifies
again. The caller checks `enabled` on the same row before asking. Failures are never
remembered. An entry lives `ttl` seconds from its verification (not from its last use), so a
password is checked with argon2 at least that often; `ttl=0` turns the cache off.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from twisted.internet import defer

MAX_ENTRIES = 50_000  # accounts remembered; the least recently verified are dropped beyond this


@dataclass(frozen=True)
class _Entry:
    tag: bytes
    stored: str
    expires: float


class LoginCache:
    def __init__(self, ttl: float, clock: Any, max_entries: int = MAX_ENTRIES):
        self.ttl = max(0.0, float(ttl))
        self._clock = clock
        self._max_entries = max_entries
        self._key = secrets.token_bytes(32)  # never leaves this object, never written anywhere
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._running: dict[Hashable, list[tuple[defer.Deferred, Callable[[], Any]]]] = {}
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def tag(self, address: str, password: str | bytes) -> bytes:
        """A keyed digest of (address, password): equal for the same pair within this object
        only, useless to anyone without the key."""
        secret = password.encode("utf-8", "surrogateescape") if isinstance(password, str) \
            else password
        mac = hmac.new(self._key, address.lower().encode("utf-8", "surrogateescape"),
                       hashlib.sha256)
        mac.update(b"\0")
        mac.update(secret)
        return mac.digest()

    def hit(self, address: str, tag: bytes, stored: str) -> bool:
        if not self.enabled:
            return False
        entry = self._entries.get(address)
        if entry is None:
            self.misses += 1
            return False
        if entry.stored != stored or self._clock.seconds() >= entry.expires:
            del self._entries[address]  # changed or stale: verify again
            self.misses += 1
            return False
        if not hmac.compare_digest(entry.tag, tag):
            self.misses += 1
            return False
        self.hits += 1
        return True

    def remember(self, address: str, tag: bytes, stored: str) -> None:
        if not self.enabled:
            return
        self._entries.pop(address, None)
        self._entries[address] = _Entry(tag, stored, self._clock.seconds() + self.ttl)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def forget(self, address: str) -> None:
        self._entries.pop(address, None)

    def verify_once(self, key: Hashable, verify: Callable[[], defer.Deferred]) -> defer.Deferred:
        """`verify()` (firing (ok, new hash)), unless one with the same key is running: then its
        outcome if it succeeds. A waiter whose shared verification failed runs its own, so
        every failure is still checked, and counted by the throttle, on its own.

        Only the first gets the replacement hash to store; the others get (True, None)."""
        if not self.enabled:
            return verify()
        waiters = self._running.get(key)
        if waiters is None:
            return self._lead(key, verify)
        mine: defer.Deferred = defer.Deferred()
        waiters.append((mine, verify))
        return mine

    def _lead(self, key: Hashable, verify: Callable[[], defer.Deferred]) -> defer.Deferred:
        self._running[key] = []

        def settle(outcome: Any) -> Any:
            ok = isinstance(outcome, tuple) and bool(outcome[0])
            for mine, own in self._running.pop(key, []):
                if ok:
                    mine.callback((True, None))
                else:
                    defer.maybeDeferred(own).chainDeferred(mine)
            return outcome
        return defer.maybeDeferred(verify).addBoth(settle)

    def __len__(self) -> int:
        return len(self._entries)

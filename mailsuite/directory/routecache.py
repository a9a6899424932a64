"""Routes of existing recipients remembered for a moment (docs/design/directory.md, "Route
cache").

    cache = RouteCache(ttl=2.0, clock=reactor)
    cache.get(address) -> Route | None     a route found less than `ttl` seconds ago
    era = cache.era                        before asking the directory
    cache.put(address, route, era)         after it answered; ignored if cleared meanwhile
    cache.clear()                          the directory changed (notify.py's bus)

Only a route that delivers somewhere (a hosted address with mailboxes or forwarding targets)
is kept: an address that does not exist, or a domain we do not host, is asked again at every
RCPT, so a user, alias or domain just added receives mail at once and a refusal (550) never
comes from memory. What a kept route can miss is a removal or a change of its targets in the
last `ttl` seconds: mail accepted meanwhile goes where the route said a moment before.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

from mailsuite.directory.records import Route

MAX_ENTRIES = 10_000  # addresses remembered; the least recently found are dropped beyond this


class RouteCache:
    def __init__(self, ttl: float, clock: Any, max_entries: int = MAX_ENTRIES):
        self.ttl = max(0.0, float(ttl))
        self._clock = clock
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, Route]] = OrderedDict()
        self.era = 0  # clear() counts up: an answer asked for before a clear is not kept
        self.hits = 0
        self.misses = 0

    def get(self, address: str) -> Route | None:
        entry = self._entries.get(address)
        if entry is not None:
            if entry[0] > self._clock.seconds():
                self.hits += 1
                return entry[1]
            del self._entries[address]
        self.misses += 1
        return None

    def put(self, address: str, route: Route, era: int) -> None:
        if self.ttl <= 0 or era != self.era or not (route.hosted and route.exists):
            return
        entries = self._entries
        entries[address] = (self._clock.seconds() + self.ttl, route)
        entries.move_to_end(address)
        while len(entries) > self._max_entries:
            entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
        self.era += 1

    def __len__(self) -> int:
        return len(self._entries)

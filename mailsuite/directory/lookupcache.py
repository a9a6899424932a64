"""The directory's answers that protocol sessions ask for again and again, remembered for a
moment (docs/design/directory.md, "Lookup cache").

    cache = LookupCache(ttl=2.0, clock=reactor, keep=lambda route: route.hosted and route.exists)
    cache.get(key) -> value | None         an answer found less than `ttl` seconds ago
    era = cache.era                        before asking the directory
    cache.put(key, value, era)             after it answered; not kept if cleared meanwhile,
                                           or if `keep(value)` says no
    cache.clear()                          the directory changed (notify.py's bus)

`Directory` keeps two: the routes of recipients that exist (an unknown address or a domain we
do not host is asked again at every RCPT, so what was just added receives mail at once and a
550 never comes from memory), and the addresses each user may send as (none: asked again;
the SMTP policy asks the database again before it refuses one). What a kept answer can miss is
a removal or a change within the last `ttl` seconds.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, TypeVar

MAX_ENTRIES = 10_000  # keys remembered; the least recently found are dropped beyond this

V = TypeVar("V")


class LookupCache(Generic[V]):
    def __init__(self, ttl: float, clock: Any, keep: Callable[[V], bool] = lambda value: True,
                 max_entries: int = MAX_ENTRIES):
        self.ttl = max(0.0, float(ttl))
        self._clock = clock
        self._keep = keep
        self._max_entries = max_entries
        self._entries: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()
        self.era = 0  # clear() counts up: an answer asked for before a clear is not kept

    def get(self, key: Hashable) -> V | None:
        entry = self._entries.get(key)
        if entry is not None:
            if entry[0] > self._clock.seconds():
                return entry[1]
            del self._entries[key]
        return None

    def put(self, key: Hashable, value: V, era: int) -> None:
        if self.ttl <= 0 or era != self.era or not self._keep(value):
            return
        entries = self._entries
        entries[key] = (self._clock.seconds() + self.ttl, value)
        entries.move_to_end(key)
        while len(entries) > self._max_entries:
            entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
        self.era += 1

    def __len__(self) -> int:
        return len(self._entries)

"""A small, bounded memory of values derived from message files (docs/design/maildir.md,
"Derived values of message files"): a Maildir file's content never changes, and its name
before ':2,' (folder path + key) never names another content, so a value computed from the
file (e.g. an IMAP ENVELOPE) stays right for as long as that name exists. Shared by every
session of the process; thread-safe (the io pool reads and fills it).
"""
from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Hashable, Optional


def content_id(path: str, size: int) -> tuple[str, int]:
    """What identifies a message file's content: its path without the flags part, and size."""
    return (path.partition(":2,")[0], size)


class BoundedMemo:
    """A thread-safe LRU whose entries together cost at most `max_cost` (`cost(value)` each,
    1 by default: a count); an entry costing more than a sixteenth of the budget is not kept,
    so one huge value cannot push everything else out."""

    def __init__(self, max_cost: int, cost: Callable[[Any], int] = lambda value: 1):
        self.max_cost = max_cost
        self._cost = cost
        self._entries: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Optional[Any]:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Any) -> None:
        cost = self._cost(value)
        if cost > max(1, self.max_cost // 16):
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._used -= self._cost(old)
            self._entries[key] = value
            self._used += cost
            while self._used > self.max_cost:
                _, dropped = self._entries.popitem(last=False)
                self._used -= self._cost(dropped)

    def __len__(self) -> int:
        return len(self._entries)


class FileMemo(BoundedMemo):
    """Serialized structures (bytes) of message files, bounded in bytes."""

    def __init__(self, max_bytes: int = 4 * 1024 * 1024):
        super().__init__(max_bytes, lambda value: len(value) + 200)  # + the key and dict entry

    @property
    def max_bytes(self) -> int:
        return self.max_cost

    @property
    def bytes_used(self) -> int:
        return self._used

"""A small, bounded memory of values derived from message files (docs/design/maildir.md,
"Derived values of message files"): a Maildir file's content never changes, and its name
before ':2,' (folder path + key) never names another content, so a value computed from the
file (e.g. an IMAP ENVELOPE) stays right for as long as that name exists. Shared by every
session of the process; thread-safe (the io pool reads and fills it).
"""
from __future__ import annotations

import collections
import threading
from typing import Hashable, Optional


def content_id(path: str, size: int) -> tuple[str, int]:
    """What identifies a message file's content: its path without the flags part, and size."""
    return (path.partition(":2,")[0], size)


class FileMemo:
    """Least recently used entries (bytes values) beyond `max_bytes` are dropped."""

    def __init__(self, max_bytes: int = 4 * 1024 * 1024):
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[Hashable, bytes] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Optional[bytes]:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: Hashable, value: bytes) -> None:
        cost = len(value) + 200  # the key and the dict entry, roughly
        if cost > self.max_bytes // 16:
            return  # one huge structure must not push everything else out
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old) + 200
            self._entries[key] = value
            self._bytes += cost
            while self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= len(dropped) + 200

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_used(self) -> int:
        return self._bytes

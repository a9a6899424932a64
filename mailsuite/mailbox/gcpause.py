"""The cyclic garbage collector paused while a folder's state is built from scratch
(docs/design/maildir.md, "Syncing a folder").

A full sync creates one record, one name and one key per message. Every 700 new container
objects start a collection, and the survivors of those start the older generations' collections,
each a walk over everything the process holds: on a 100,000-message folder that was a third of
the sync's time. Nothing a sync creates is cyclic garbage; its records are freed by reference
counting. So the collector is off while any full sync runs and back on (if it was on) when the
last one ends. Blocking: none (two C calls under a lock).
"""
from __future__ import annotations

import gc
import threading
from contextlib import contextmanager
from typing import Iterator

_lock = threading.Lock()
_holders = 0  # full syncs running now, in any thread
_was_enabled = False  # the collector's state when the first of them began


@contextmanager
def collector_paused() -> Iterator[None]:
    global _holders, _was_enabled
    with _lock:
        if _holders == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _was_enabled:
                gc.enable()

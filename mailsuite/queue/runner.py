"""The queue runner: delivers every recipient of every spooled message (stub, being built)."""
from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer


class QueueRunner(Service):
    def __init__(self, suite: Any):
        self.suite = suite
        self.remote_agent: Any = None
        self.on_bounce: Any = None
        self.on_delay: Any = None

    def submit(self, sender: str, recipients: list, data: bytes, meta: dict) -> defer.Deferred:
        raise NotImplementedError("queue not built yet")

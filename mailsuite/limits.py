"""Connection limits shared by the listeners: in total and per client IP ([limits])."""
from __future__ import annotations

from collections import Counter


class ConnectionCounter:
    """Open connections of one listener; `admit(ip)` counts a new one if the limits allow it."""

    def __init__(self, max_total: int, max_per_ip: int):
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.active: Counter[str] = Counter()
        self._total = 0

    @property
    def full(self) -> bool:
        """The listener's total is reached (as opposed to one client's share)."""
        return self._total >= self.max_total

    def admit(self, ip: str) -> bool:
        if self.full or self.active[ip] >= self.max_per_ip:
            return False
        self.active[ip] += 1
        self._total += 1
        return True

    def release(self, ip: str) -> None:
        if self.active[ip] > 0:
            self._total -= 1
            self.active[ip] -= 1
        if self.active[ip] <= 0:
            del self.active[ip]

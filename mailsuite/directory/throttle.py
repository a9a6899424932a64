"""A failed-login throttle shared by every protocol of one process (SMTP AUTH, IMAP, POP3).

API (all on the reactor thread; no I/O):

    throttle = LoginThrottle(delay=1.0, max_delay=15.0, window=900.0, clock=reactor)
    (every method also takes `user`, the login name tried, lower-cased)
    throttle.failed(ip) -> float      record one failure from `ip`; returns the seconds to hold
                                      back the failure reply: delay * (recent failures), capped
                                      at max_delay
    throttle.succeeded(ip)            forget `ip`'s failures (a user who mistyped once is not
                                      punished for the rest of the window)
    throttle.failures(ip) -> int      failures from `ip` within the last `window` seconds
    throttle.delay_for(ip) -> float   the delay the next failure would get, without recording it
                                      (protocols may use it to hold back even the next attempt)

`Directory.authenticate(..., client_ip=ip)` and `Directory.checker(client_ip=ip)` use the
directory's own instance (`suite.directory.throttle`), so a password-guessing client that hops
between SMTP, IMAP and POP3 is slowed down everywhere. Counting is per exact IP address; a
failure older than `window` seconds is forgotten. `delay=0` (tests) disables the delay but still
counts.
"""
from __future__ import annotations

from typing import Any

MAX_TRACKED = 50_000  # clients remembered at most; the oldest are dropped beyond this


class LoginThrottle:
    def __init__(self, delay: float = 1.0, max_delay: float = 15.0, window: float = 900.0,
                 clock: Any = None):
        if clock is None:
            from twisted.internet import reactor as clock  # noqa: N813
        self.delay = max(0.0, float(delay))
        self.max_delay = max_delay
        self.window = window
        self._clock = clock
        self._failures: dict[str, tuple[int, float]] = {}  # ip -> (count, time of the last one)

    def failures(self, ip: str, user: str = "") -> int:
        entry = self._failures.get(ip)
        if entry is None:
            return 0
        count, last = entry
        if self._clock.seconds() - last > self.window:
            del self._failures[ip]
            return 0
        return count

    def delay_for(self, ip: str, user: str = "") -> float:
        return min(self.delay * (self.failures(ip) + 1), self.max_delay)

    def failed(self, ip: str, user: str = "") -> float:
        delay = self.delay_for(ip)
        count = self.failures(ip) + 1
        self._failures.pop(ip, None)  # re-insert: dict order = least recently failed first
        self._failures[ip] = (count, self._clock.seconds())
        if len(self._failures) > MAX_TRACKED:
            for old in list(self._failures)[: len(self._failures) - MAX_TRACKED]:
                del self._failures[old]
        return delay

    def succeeded(self, ip: str, user: str = "") -> None:
        self._failures.pop(ip, None)

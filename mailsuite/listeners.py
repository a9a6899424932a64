"""Connection limits for every listener: one counter, one factory shape, one refusal path.

`LimitedFactory` admits a connection while the listener's `[limits] max_connections` and
`max_connections_per_ip` allow it and builds the protocol with `build(addr)`; over a limit it
writes the protocol's refusal greeting and hangs up. A built protocol reports to its factory
through three hooks the factory sets on it:

- `self.on_close()`, once from `connectionLost`: gives its slot back;
- `self.on_progress()`, after each complete command it has processed: the client is doing
  something (fairness prefers such clients to silent ones);
- `self.on_authenticated()`, once after a successful login: the session leaves the pre-auth pool.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from twisted.internet import protocol
from twisted.logger import Logger

log = Logger()


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


class Refusal:
    """The greetings a protocol gives a connection it will not serve."""

    def __init__(self, listener_full: bytes, client_share_used: bytes):
        self.listener_full = listener_full
        self.client_share_used = client_share_used


class _Refused(protocol.Protocol):
    def __init__(self, greeting: bytes):
        self.greeting = greeting

    def connectionMade(self) -> None:
        self.transport.write(self.greeting)
        self.transport.loseConnection()


class LimitedFactory(protocol.ServerFactory):
    """A server factory that counts connections per listener and per client IP."""

    noisy = False  # service.py logs the listeners

    def __init__(self, name: str, counter: ConnectionCounter, refusal: Refusal,
                 build: Callable[[Any], protocol.Protocol]):
        self.name = name
        self.connections = counter
        self.refusal = refusal
        self._build = build

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        ip = getattr(addr, "host", "?")
        if not self.connections.admit(ip):
            full = self.connections.full
            log.warn("{listener}: refused a connection from {ip}: {which} connection limit "
                     "reached", listener=self.name, ip=ip,
                     which="listener" if full else "per-client")
            return _Refused(self.refusal.listener_full if full
                            else self.refusal.client_share_used)
        p = self._build(addr)
        p.factory = self
        released = False

        def on_close() -> None:
            nonlocal released
            if not released:
                released = True
                self.connections.release(ip)

        p.on_close = on_close  # type: ignore[attr-defined]
        p.on_progress = _nothing  # type: ignore[attr-defined]
        p.on_authenticated = _nothing  # type: ignore[attr-defined]
        return p


def _nothing() -> None:
    pass

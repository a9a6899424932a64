"""Connection limits and fairness for every listener (docs/design/limits.md).

`LimitedFactory` admits a connection while the listener's limits allow it and builds the protocol
with `build(addr)`. A built protocol reports to its factory through three hooks the factory sets
on it:

- `self.on_close()`, once from `connectionLost`: gives its slot back;
- `self.on_progress()`, after each complete command it has processed: the client is doing
  something (fairness prefers such clients to silent ones);
- `self.on_authenticated()`, once after a successful login: the session leaves the pre-auth pool.

A protocol may also implement `evict(reason: str)`: say goodbye (SMTP `421 4.7.0`, IMAP `* BYE`,
POP3 `-ERR [SYS/TEMP]`) and `transport.loseConnection()`. The factory calls it when it drops the
connection; without it the factory writes the listener's `Refusal.evicted` line and closes. Either
way the connection is aborted `EVICT_GRACE` seconds later if it is still open.

service.py calls `limit(name, factory, limits, clock, budget)` on every listener's factory: that
sets the fairness rules of `[limits]`, the clock and the process-wide `FileBudget`. A factory that
was never given them (unit tests of one protocol) only counts `max_connections(_per_ip)`. With
worker processes, service.py also gives each shared listener's factory its `ListenerCounts`
(`share()`, mailsuite/conncount.py): then every count but the descriptors is the whole server's.

The rules, checked on each new connection from the narrowest scope to the widest (client
address, its network prefix, the listener, the process): when a scope is full, its slowest
pre-auth connection (oldest last progress, idle at least `evict_idle_after`) is dropped to make
room; when there is none, the newcomer is refused.
"""
from __future__ import annotations

import functools
import ipaddress
import resource
from collections import Counter
from typing import Any, Callable, Iterable, Optional

from twisted.internet import protocol
from twisted.logger import Logger

from mailsuite.conncount import NOWHERE, Elsewhere, ListenerCounts

log = Logger()

EVICT_GRACE = 2.0  # seconds an evicted connection has to close politely before it is aborted
LOG_BURST = 10  # eviction/refusal lines per listener per LOG_PERIOD, then one aggregate line
LOG_PERIOD = 60.0
FD_RESERVE_MIN = 128  # descriptors kept for the spool, Maildir writes, SQL and outbound delivery
FD_RESERVE_PERCENT = 20

# The goodbye written to an evicted connection whose protocol has no `evict()`, per listener.
EVICTED = {
    "mx": b"421 4.7.0 Too many connections, closing this idle one\r\n",
    "submission": b"421 4.7.0 Too many connections, closing this idle one\r\n",
    "submissions": b"421 4.7.0 Too many connections, closing this idle one\r\n",
    "imap": b"* BYE [UNAVAILABLE] Too many connections, closing this idle one\r\n",
    "imaps": b"* BYE [UNAVAILABLE] Too many connections, closing this idle one\r\n",
    "pop3": b"-ERR [SYS/TEMP] Too many connections, closing this idle one\r\n",
    "pop3s": b"-ERR [SYS/TEMP] Too many connections, closing this idle one\r\n",
}
# Listeners whose clients never log in: every connection is in the pre-auth pool.
# (The admin dashboard logs in per request, with a session cookie, not per connection.)
NEVER_AUTHENTICATE = frozenset({"mx", "autoconfig", "metrics", "admin"})


@functools.lru_cache(maxsize=4096)
def network_prefix(ip: str) -> str:
    """The network a client address belongs to for fairness: its /24 (IPv4) or /64 (IPv6).
    An IPv4-mapped IPv6 address counts as the IPv4 address. Anything else is its own prefix.
    (Cached: a client reconnecting for each message needs it once, not per connection.)"""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    bits = 24 if addr.version == 4 else 64
    return str(ipaddress.ip_network(f"{addr}/{bits}", strict=False))


def client_address(addr: Any) -> str:
    """The client's IP address from a Twisted address, IPv4-mapped IPv6 as plain IPv4."""
    host = str(getattr(addr, "host", "?"))
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def client_ip(transport: Any) -> str:
    """The IP address of the client on the other end of `transport`, for everything that judges
    or records the client (trust checks, rate limits, the login throttle, Received:, logs).

    On a PROXY protocol listener the transport is a `proxyproto.ProxyHeaderReceiver` (or TLS over
    one), whose getPeer() is the client the proxy declared; otherwise the TCP peer."""
    return client_address(transport.getPeer())


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

    @property
    def total(self) -> int:
        return self._total

    def ip_full(self, ip: str) -> bool:
        return self.active[ip] >= self.max_per_ip

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
    """The greetings a protocol gives a connection it will not serve, and the line an evicted
    connection gets when its protocol has no `evict()` (b"": closed without a word)."""

    def __init__(self, listener_full: bytes, client_share_used: bytes, evicted: bytes = b""):
        self.listener_full = listener_full
        self.client_share_used = client_share_used
        self.evicted = evicted


class FairnessRules:
    """The `[limits]` fairness settings of one listener (docs/design/limits.md)."""

    def __init__(self, max_preauth: int, max_preauth_per_ip: int, max_preauth_per_prefix: int,
                 preauth_timeout: float, evict_idle_after: float, progress_bytes: int):
        self.max_preauth = max_preauth
        self.max_preauth_per_ip = max_preauth_per_ip
        self.max_preauth_per_prefix = max_preauth_per_prefix
        self.preauth_timeout = preauth_timeout  # 0: none
        self.evict_idle_after = evict_idle_after
        self.progress_bytes = progress_bytes  # 0: only commands count

    @classmethod
    def from_limits(cls, limits: Any, authenticates: bool = True) -> "FairnessRules":
        if not authenticates:
            # MX and autoconfig: the whole listener is "pre-auth"; no time limit to log in (the
            # protocol's idle timeout applies), eviction of silent connections keeps it fair.
            return cls(limits.max_connections, limits.max_connections_per_ip,
                       limits.max_preauth_per_prefix, 0, limits.evict_idle_after,
                       limits.progress_bytes)
        share = max(1, limits.max_connections * limits.preauth_share_percent // 100)
        return cls(share, limits.max_preauth_per_ip, limits.max_preauth_per_prefix,
                   limits.preauth_timeout, limits.evict_idle_after, limits.progress_bytes)

    @classmethod
    def unlimited(cls) -> "FairnessRules":
        big = 1 << 62
        return cls(big, big, big, 0, float("inf"), 0)


class FileBudget:
    """The file descriptors all listeners together may hold for connections (one per
    connection, TLS or not), below RLIMIT_NOFILE less a reserve for everything else the process
    opens; one listener holds at most `listener_cap` of them, so none can starve the others.

    `closing` connections (evicted, not yet gone) still hold a descriptor; up to `closing_cap`
    of them are not counted against admission, since each is aborted within EVICT_GRACE."""

    def __init__(self, total: int, listener_percent: int = 50):
        self.total = max(1, total)
        self.listener_cap = max(1, self.total * max(1, min(100, listener_percent)) // 100)
        self.closing_cap = max(1, self.total // 8)
        self.open = 0
        self.closing = 0
        self.factories: list["LimitedFactory"] = []

    @classmethod
    def from_limits(cls, limits: Any, nofile: int | None = None) -> "FileBudget":
        if nofile is None:
            nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if nofile == resource.RLIM_INFINITY or nofile <= 0:
            nofile = 1 << 20
        total = nofile - max(FD_RESERVE_MIN, nofile * FD_RESERVE_PERCENT // 100)
        if limits.max_open_files > 0:
            total = min(limits.max_open_files, total) if total > 0 else limits.max_open_files
        return cls(max(1, total), limits.listener_files_percent)

    def in_use(self) -> int:
        return self.open - min(self.closing, self.closing_cap)

    @property
    def full(self) -> bool:
        return self.in_use() >= self.total

    def spare(self) -> int:
        """Descriptors the listeners may still take (the reserve is not included)."""
        return max(0, self.total - self.in_use())


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) as now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warn("could not raise the open files limit to {target}: {error}", target=target,
                     error=e)
    return soft, hard


class TokenBucket:
    """A rate limit on the injected clock: `rate` tokens per second, at most `burst` saved up.

    `take(n)` spends n tokens if there are that many (True) or spends nothing (False);
    `wait_time(n)` says how long until n tokens are there. For commands per second, say."""

    def __init__(self, rate: float, burst: float, clock: Any):
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock.seconds()

    def _refill(self) -> None:
        now = self._clock.seconds()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self, n: float = 1.0) -> bool:
        self._refill()
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False

    def wait_time(self, n: float = 1.0) -> float:
        self._refill()
        if self._tokens >= n:
            return 0.0
        return float("inf") if self.rate <= 0 else (n - self._tokens) / self.rate


class _Refused(protocol.Protocol):
    """Writes the refusal and hangs up; aborted after EVICT_GRACE if still open (a TLS client
    that never completes its handshake would otherwise keep the descriptor). Until then it
    holds a descriptor of the budget, counted as closing."""

    def __init__(self, greeting: bytes, clock: Any = None, budget: Optional[FileBudget] = None):
        self.greeting = greeting
        self._clock = clock
        self._budget = budget
        self._abort: Any = None

    def connectionMade(self) -> None:
        if self._budget is not None:
            self._budget.open += 1
            self._budget.closing += 1
        transport: Any = self.transport
        if self.greeting:
            transport.write(self.greeting)
        transport.loseConnection()
        if self._clock is not None:
            self._abort = self._clock.callLater(EVICT_GRACE, transport.abortConnection)

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        if self._budget is not None:
            self._budget.open -= 1
            self._budget.closing -= 1
            self._budget = None


class _Connection:
    """What the factory knows of one admitted connection."""

    __slots__ = ("proto", "transport", "ip", "prefix", "since", "last_progress", "received",
                 "authenticated", "evicted", "released", "closed", "timer")

    def __init__(self, proto: Any, ip: str, prefix: str, now: float):
        self.proto = proto
        self.transport: Any = None  # from makeConnection (some protocols do not keep it)
        self.ip = ip
        self.prefix = prefix
        self.since = now
        self.last_progress = now
        self.received = 0
        self.authenticated = False
        self.evicted = False  # dropped by the factory: its slots are already given back
        self.released = False  # closed by its own protocol: its slots are already given back
        self.closed = False
        self.timer: Any = None


class RateLimitedLog:
    """LOG_BURST lines per LOG_PERIOD, then one line counting what was left out."""

    def __init__(self, clock: Any, what: str):
        self._clock = clock
        self._what = what
        self._start = float("-inf")
        self._lines = 0
        self._suppressed = 0
        self._listener = "?"
        self._flush: Any = None

    def emit(self, fmt: str, **fields: Any) -> None:
        if self._clock is None:
            log.info(fmt, **fields)
            return
        now = self._clock.seconds()
        if now - self._start >= LOG_PERIOD:
            self._start, self._lines = now, 0
        if self._lines < LOG_BURST:
            self._lines += 1
            log.info(fmt, **fields)
            return
        self._suppressed += 1
        self._listener = fields.get("listener", "?")
        if self._flush is None:
            self._flush = self._clock.callLater(self._start + LOG_PERIOD - now, self._summary)

    def _summary(self) -> None:
        self._flush = None
        n, self._suppressed = self._suppressed, 0
        if n:
            log.info("{listener}: {n} more connections {what} in the last {period:.0f} s (not "
                     "logged one by one)", listener=self._listener, n=n, what=self._what,
                     period=LOG_PERIOD)

    def stop(self) -> None:
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._flush = None
        self._summary()


class LimitedFactory(protocol.ServerFactory):
    """A server factory that counts connections per listener, per client IP and per network
    prefix, keeps pre-auth connections to their share and drops the slowest when full."""

    noisy = False  # service.py logs the listeners

    def __init__(self, name: str, counter: ConnectionCounter, refusal: Refusal,
                 build: Callable[[Any], protocol.Protocol]):
        self.name = name
        self.connections = counter
        self.refusal = refusal
        self._build = build
        self.rules = FairnessRules.unlimited()
        self.authenticates = True
        self.fairness_clock: Any = None
        self.budget: Optional[FileBudget] = None
        # The other worker processes' connections, and our row for them to read (None: one
        # process, the counts below are the whole server's).
        self.shared: Optional[ListenerCounts] = None
        self._conns: set[_Connection] = set()
        self._preauth = 0
        self._preauth_ip: Counter[str] = Counter()
        self._preauth_prefix: Counter[str] = Counter()
        self.files = 0  # descriptors held, evicted connections not yet closed included
        self.closing = 0
        self.evictions = 0
        self.refusals = 0
        # Read by the metrics at scrape time (mailsuite/metrics.py): admitted connections,
        # logins, and logged-in sessions open now.
        self.admitted = 0
        self.logins = 0
        self.sessions = 0
        self._log = RateLimitedLog(None, "evicted")
        self._refusal_log = RateLimitedLog(None, "refused")

    def configure(self, limits: Any, clock: Any, budget: Optional[FileBudget] = None,
                  authenticates: bool = True) -> None:
        """Apply the fairness rules of `[limits]` (see `limit()`)."""
        self.rules = FairnessRules.from_limits(limits, authenticates)
        self.authenticates = authenticates
        self.fairness_clock = clock
        self.budget = budget
        self._log = RateLimitedLog(clock, "evicted")
        self._refusal_log = RateLimitedLog(clock, "refused")
        if budget is not None and self not in budget.factories:
            budget.factories.append(self)

    def share(self, counts: ListenerCounts) -> None:
        """Count with the other worker processes (docs/design/limits.md): admission adds what
        they hold; our own connections are written to our row of their table."""
        self.shared = counts

    def doStop(self) -> None:
        self._log.stop()
        self._refusal_log.stop()
        super().doStop()

    # -- admission ----------------------------------------------------------------------------
    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        ip = client_address(addr)
        prefix = network_prefix(ip)
        for _ in range(4):  # one eviction usually makes room; a few at most per newcomer
            scope = self._full_scope(ip, prefix)
            if scope is None:
                break
            victim = None
            if not (scope.endswith("files") and self.budget is not None
                    and self.budget.closing >= self.budget.closing_cap):
                # (descriptors of connections still closing are not free yet: evicting more
                # would not make room)
                victim = self._slowest(scope, ip, prefix)
            if victim is None:
                return self._refuse(ip, scope)
            victim_factory, victim_conn = victim
            victim_factory.evict(victim_conn, f"{scope} full, making room for a new connection")
        else:
            return self._refuse(ip, "listener")
        self.connections.admit(ip)  # cannot fail: _full_scope checked it
        if self.shared is not None:
            self.shared.add(ip, prefix, 1, 0)
        self.admitted += 1
        p = self._build(addr)
        if getattr(p, "factory", None) is None:
            p.factory = self
        conn = _Connection(p, ip, prefix, self._now())
        self._conns.add(conn)
        self._count_preauth(conn, +1)
        self.files += 1
        if self.budget is not None:
            self.budget.open += 1
        self._attach_hooks(p, conn)
        clock = self.fairness_clock
        if clock is not None and self.authenticates and self.rules.preauth_timeout > 0:
            conn.timer = clock.callLater(self.rules.preauth_timeout, self._login_timeout, conn)
        return p

    def _full_scope(self, ip: str, prefix: str) -> Optional[str]:
        """The narrowest scope that has no room for one more connection from `ip`, or None.
        Our own counts are exact; what other worker processes hold is added (an upper bound)."""
        r, c = self.rules, self.connections
        o: Elsewhere = NOWHERE if self.shared is None else self.shared.elsewhere(ip, prefix)
        if (c.active[ip] + o.ip >= c.max_per_ip
                or self._preauth_ip[ip] + o.preauth_ip >= r.max_preauth_per_ip):
            return "per-client"
        if self._preauth_prefix[prefix] + o.preauth_prefix >= r.max_preauth_per_prefix:
            return "per-network"
        if c.total + o.total >= c.max_total or self._preauth + o.preauth >= r.max_preauth:
            return "listener"
        budget = self.budget
        if budget is not None:
            if self.files - min(self.closing, budget.closing_cap) >= budget.listener_cap:
                return "listener files"
            if budget.full:
                return "process files"
        return None

    def _slowest(self, scope: str, ip: str, prefix: str
                 ) -> Optional[tuple["LimitedFactory", _Connection]]:
        """The pre-auth connection of `scope` that has gone longest without progress, if it has
        been idle at least `evict_idle_after` seconds.

        When the newcomer's own address is not what is full, only an address holding more
        pre-auth connections than the newcomer's (two more, unless the newcomer's holds none)
        gives one up: a client new to the listener always finds room among the silent
        connections of a crowd, while the crowd cannot take its own or each other's places over
        and over (a reconnecting slowloris would otherwise keep every connection younger than
        `evict_idle_after`, and nobody else would find one to replace)."""
        if self.fairness_clock is None:
            return None
        now = self._now()
        mine = self._preauth_ip[ip]
        factories: Iterable[LimitedFactory] = [self]
        if scope == "process files" and self.budget is not None:
            factories = self.budget.factories
        best: Optional[tuple[LimitedFactory, _Connection]] = None
        for f in factories:
            for c in f._conns:
                if c.authenticated or c.evicted or c.released:
                    continue
                if (scope == "per-client" and c.ip != ip
                        or scope == "per-network" and c.prefix != prefix):
                    continue
                if now - c.last_progress < f.rules.evict_idle_after:
                    continue
                if scope != "per-client" and mine and (c.ip == ip
                                                       or f._preauth_ip[c.ip] < mine + 2):
                    continue
                if best is None or c.last_progress < best[1].last_progress:
                    best = (f, c)
        return best

    def _refuse(self, ip: str, scope: str) -> protocol.Protocol:
        self.refusals += 1
        self._refusal_log.emit("{listener}: refused a connection from {ip}: {which} connection "
                               "limit reached", listener=self.name, ip=ip, which=scope)
        share = scope in ("per-client", "per-network")
        return _Refused(self.refusal.client_share_used if share else self.refusal.listener_full,
                        self.fairness_clock, self.budget)

    # -- the hooks a protocol calls -----------------------------------------------------------
    def _attach_hooks(self, p: Any, conn: _Connection) -> None:
        def on_close() -> None:
            self._closed(conn)

        def on_progress() -> None:
            conn.last_progress = self._now()
            conn.received = 0

        def on_authenticated() -> None:
            if not conn.authenticated:
                if not (conn.evicted or conn.released):
                    self._count_preauth(conn, -1)
                conn.authenticated = True
                self.logins += 1
                self.sessions += 1
                self._cancel_timer(conn)

        p.on_close = on_close
        p.on_progress = on_progress
        p.on_authenticated = on_authenticated
        # The slot must come back even from a protocol that does not call on_close (a wrapped
        # factory's, the autoconfig web Site's): connectionLost gives it back too (once).
        lost = p.connectionLost

        def connection_lost(reason: Any = protocol.connectionDone) -> None:
            try:
                lost(reason)
            finally:
                self._closed(conn)

        p.connectionLost = connection_lost
        made = p.makeConnection

        def make_connection(transport: Any) -> None:
            conn.transport = transport
            lose = getattr(transport, "loseConnection", None)
            if lose is not None:
                def lose_connection(*args: Any, **kwargs: Any) -> Any:
                    self._closing(conn)
                    return lose(*args, **kwargs)

                transport.loseConnection = lose_connection
            made(transport)

        p.makeConnection = make_connection
        if self.fairness_clock is not None and self.rules.progress_bytes > 0:
            # Octets received count as progress too, `progress_bytes` at a time: a message
            # being transferred is one long command (DATA, APPEND), a slowloris never gets there.
            received = p.dataReceived
            limit = self.rules.progress_bytes

            def data_received(data: bytes) -> None:
                conn.received += len(data)
                if conn.received >= limit:
                    conn.received = 0
                    conn.last_progress = self._now()
                received(data)

            p.dataReceived = data_received

    def _closed(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.authenticated:
            self.sessions -= 1
        self._cancel_timer(conn)
        self._conns.discard(conn)
        self.files -= 1
        if self.budget is not None:
            self.budget.open -= 1
        if conn.evicted:
            self.closing -= 1
            if self.budget is not None:
                self.budget.closing -= 1
        elif not conn.released:
            self._release(conn)

    def _closing(self, conn: _Connection) -> None:
        """The protocol closes the connection itself (QUIT, LOGOUT, a refusal): its client's
        slots are free at once, as an evicted connection's are; its descriptor counts until it
        has closed. The goodbye may already be on its way (mailsuite/writethrough.py), so the
        client can be back before the reactor closes this one, and must not find its own
        departing connection holding its place."""
        if conn.closed or conn.evicted or conn.released:
            return
        conn.released = True
        self._cancel_timer(conn)
        self._release(conn)

    def _release(self, conn: _Connection) -> None:
        self.connections.release(conn.ip)
        if self.shared is not None:
            self.shared.add(conn.ip, conn.prefix, -1, 0)
        if not conn.authenticated:
            self._count_preauth(conn, -1)

    def _count_preauth(self, conn: _Connection, n: int) -> None:
        if conn.authenticated:
            return
        if self.shared is not None:
            self.shared.add(conn.ip, conn.prefix, 0, n)
        self._preauth += n
        self._preauth_ip[conn.ip] += n
        self._preauth_prefix[conn.prefix] += n
        if self._preauth_ip[conn.ip] <= 0:
            del self._preauth_ip[conn.ip]
        if self._preauth_prefix[conn.prefix] <= 0:
            del self._preauth_prefix[conn.prefix]

    # -- eviction -----------------------------------------------------------------------------
    def evict(self, conn: _Connection, reason: str) -> None:
        """Drop `conn`: its slots are free at once, its descriptor once it has closed."""
        if conn.evicted or conn.released or conn.closed:
            return
        conn.evicted = True
        self._cancel_timer(conn)
        self._release(conn)
        self.closing += 1
        if self.budget is not None:
            self.budget.closing += 1
        self.evictions += 1
        idle = self._now() - conn.last_progress
        self._log.emit("{listener}: evicted a connection from {ip} ({reason}; idle {idle:.0f} s,"
                       " open {age:.0f} s)", listener=self.name, ip=conn.ip, reason=reason,
                       idle=idle, age=self._now() - conn.since)
        p = conn.proto
        transport = conn.transport
        goodbye = getattr(p, "evict", None)
        try:
            if callable(goodbye):
                goodbye(reason)
            elif transport is not None:
                if self.refusal.evicted:
                    transport.write(self.refusal.evicted)
                transport.loseConnection()
        except Exception:
            log.failure("{listener}: saying goodbye to an evicted connection failed",
                        listener=self.name)
            if transport is not None:
                transport.abortConnection()
        clock = self.fairness_clock
        if clock is not None and not conn.closed:
            clock.callLater(EVICT_GRACE, self._abort, conn)

    def _abort(self, conn: _Connection) -> None:
        if not conn.closed and conn.transport is not None:
            conn.transport.abortConnection()

    def _login_timeout(self, conn: _Connection) -> None:
        conn.timer = None
        if not conn.authenticated and not conn.closed:
            self.evict(conn, f"not logged in within {self.rules.preauth_timeout:.0f} s")

    def _cancel_timer(self, conn: _Connection) -> None:
        if conn.timer is not None and conn.timer.active():
            conn.timer.cancel()
        conn.timer = None

    def _now(self) -> float:
        return self.fairness_clock.seconds() if self.fairness_clock is not None else 0.0

    # -- for tests and the operator ------------------------------------------------------------
    @property
    def preauth(self) -> int:
        return self._preauth

    @property
    def open_connections(self) -> int:
        return len(self._conns)


class WrappedFactory(LimitedFactory):
    """The limits for a factory that is not a LimitedFactory itself (the autoconfig web Site):
    its protocols are built by it, counted by us."""

    def __init__(self, name: str, wrapped: Any, counter: ConnectionCounter, refusal: Refusal):
        super().__init__(name, counter, refusal, wrapped.buildProtocol)
        self.wrapped = wrapped

    def doStart(self) -> None:
        self.wrapped.doStart()
        super().doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()
        super().doStop()


HTTP_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 60\r\n"
             b"Content-Length: 0\r\n\r\n")


def limit(name: str, factory: Any, limits: Any, clock: Any,
          budget: Optional[FileBudget] = None) -> LimitedFactory:
    """The factory of listener `name` with the fairness rules of `[limits]`, on `clock`, sharing
    `budget`: `factory` itself when it is a LimitedFactory, else one wrapping it."""
    if not isinstance(factory, LimitedFactory):
        factory = WrappedFactory(name, factory,
                                 ConnectionCounter(limits.max_connections,
                                                   limits.max_connections_per_ip),
                                 Refusal(HTTP_BUSY, HTTP_BUSY))
    if not factory.refusal.evicted:
        factory.refusal.evicted = EVICTED.get(name, b"")
    factory.configure(limits, clock, budget, authenticates=name not in NEVER_AUTHENTICATE)
    return factory

"""A failed-login throttle shared by every protocol of one process (SMTP AUTH, IMAP, POP3).

API (all on the reactor thread; `user` is the login name tried, "" when unknown):

    throttle = LoginThrottle(delay=1.0, max_delay=15.0, window=900.0, clock=reactor,
                             shared=directory)
    throttle.count_failure(ip, user) -> Deferred[float]
                                           record one failure in every instance's counts;
                                           fires with the seconds to hold back the failure
                                           reply (see "Delays" below)
    throttle.succeeded(ip, user)           forget the failures of this (source, user) only,
                                           here at once and in the shared counts meanwhile
    throttle.failures(ip, user="") -> int  failures of (source, user) within `window`; without
                                           a user, of the source across every user (as this
                                           process last saw them)
    throttle.delay_for(ip, user) -> float  the delay the next failure of (ip, user) would get
    throttle.failed(ip, user) -> float     count a failure in this process only (no `shared`,
                                           or the shared counts unreachable)

Shared counts. With `shared` (the SQL directory, `FailureCounts`), the counts live in the
`ms_login_failure` table, so every instance on one database counts the failures of all: a
guesser alternating between instances waits as long as on one. Only a failure waits for that
SQL (one unit in the db pool, while its reply is held back anyway); a success is answered at
once and forgotten in the table afterwards. When the database cannot answer, the failure is
counted here only (fail open: the directory logs the outage, rate-limited). The in-memory
counts stay as this process's copy: each shared answer overwrites its entries.

Counting (docs/design/limits.md, "Login throttle"). The *source* of an attempt is its address
(IPv4; IPv4-mapped IPv6 counts as IPv4) or its /64 (IPv6: one host usually holds a whole /64).
Three counts, each forgotten `window` seconds after its last failure:

- per (source, user): a guesser working on one account from one place;
- per source, across users: one place trying many accounts (password spraying);
- per user, across sources: many places trying one account (distributed guessing).

Delays. Only a *failure* reply is ever held back; a correct password is answered at once, so a
guesser never slows anyone else's login, not even that of another user at the same address. The
delay is the largest of: `delay` x (source, user) failures, capped at `max_delay`; past
`source_threshold` failures of the source, `delay` x the excess, capped at `max_delay`; past
`user_threshold` failures of the user, `delay` x the excess capped at `user_max_delay` - kept
small on purpose, so that guessing someone's password cannot lock its owner out (the owner's
own mistyped password waits at most that long). A success forgets its (source, user) count and
takes those failures off the source's and the user's counts; failures for other users stay.

Memory: each count lives in an LRU map of at most `MAX_TRACKED` entries.

Password checks themselves (argon2, ~0.5 s of a core each) are a shared resource too: a guesser
with many connections would fill the hash pool's queue and every login would wait behind it.
`throttle.check_fairly(ip, user, run, fn, *args)` runs them `HASH_SLOTS` at a time, taking the
waiting ones in turn by source and, within a source, by user: another user's login waits for
at most one check per busy source, never behind a guesser's backlog.

`Directory.authenticate(..., client_ip=ip)` and `Directory.checker(client_ip=ip)` use the
directory's own instance (`suite.directory.throttle`), so a password-guessing client that hops
between SMTP, IMAP and POP3 is slowed down everywhere. `delay=0` (tests) disables the delay but
still counts.
"""
from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from typing import Any, Callable, Hashable, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsuite.directory.records import DirectoryError

log = Logger()

MAX_TRACKED = 50_000  # entries per count; the least recently failed are dropped beyond this
HASH_SLOTS = 2  # password checks at once: the hash pool's threads (mailsuite/pools.py)
MAX_USER_KEY = 320  # a user name longer than any address is counted by its first 320 chars
PURGE_INTERVAL = 60.0  # seconds between two purges of expired shared counts by one process


class FailureCounts(Protocol):
    """Where the counts of every instance meet (the SQL directory; `Directory` implements it).
    Each method fires in the reactor thread; the work runs elsewhere (the db pool)."""

    def login_failed(self, source: str, login: str, now: float,
                     window: float) -> defer.Deferred:
        """Count one failure; fires with the (pair, source, login) counts before it."""

    def login_succeeded(self, source: str, login: str, now: float) -> defer.Deferred:
        ...

    def purge_login_failures(self, now: float) -> defer.Deferred:
        ...


def login_source(ip: str) -> str:
    """Where a login attempt comes from, for counting: the IPv4 address, or the IPv6 /64."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


class _Counts:
    """count + time of the last failure per key, forgotten after `window`, LRU-bounded."""

    def __init__(self, window: float, clock: Any, cap: int):
        self.window = window
        self._clock = clock
        self._cap = cap
        self._entries: OrderedDict[Hashable, tuple[int, float]] = OrderedDict()

    def get(self, key: Hashable) -> int:
        entry = self._entries.get(key)
        if entry is None:
            return 0
        count, last = entry
        if self._clock.seconds() - last > self.window:
            del self._entries[key]
            return 0
        return count

    def add(self, key: Hashable, n: int = 1) -> None:
        count = self.get(key) + n
        self._entries.pop(key, None)
        if count > 0:
            self._entries[key] = (count, self._clock.seconds())  # most recent at the end
        while len(self._entries) > self._cap:
            self._entries.popitem(last=False)

    def put(self, key: Hashable, count: int) -> None:
        """Set a count as another instance made it (the shared answer), last failure now."""
        self._entries.pop(key, None)
        self.add(key, count)

    def forget(self, key: Hashable) -> int:
        count = self.get(key)
        self._entries.pop(key, None)
        return count

    def take_off(self, key: Hashable, n: int) -> None:
        """Remove n failures without making the rest look recent."""
        entry = self._entries.get(key)
        if entry is None or n <= 0:
            return
        count, last = entry
        if count <= n:
            del self._entries[key]
        else:
            self._entries[key] = (count - n, last)

    def __len__(self) -> int:
        return len(self._entries)


class LoginThrottle:
    def __init__(self, delay: float = 1.0, max_delay: float = 15.0, window: float = 900.0,
                 clock: Any = None, user_threshold: int = 10, user_max_delay: float = 3.0,
                 source_threshold: int = 20, max_tracked: int = MAX_TRACKED,
                 shared: FailureCounts | None = None):
        if clock is None:
            from twisted.internet import reactor as clock  # noqa: N813
        self.delay = max(0.0, float(delay))
        self.max_delay = max_delay
        self.window = window
        self.user_threshold = user_threshold
        self.user_max_delay = user_max_delay
        self.source_threshold = source_threshold
        self._clock = clock
        self._pairs = _Counts(window, clock, max_tracked)  # (source, user)
        self._sources = _Counts(window, clock, max_tracked)  # source, across users
        self._users = _Counts(window, clock, max_tracked)  # user, across sources
        self._turns = _FairTurns(HASH_SLOTS)
        self.shared = shared
        self._last_purge: float | None = None

    def check_fairly(self, ip: str | None, user: str, run: Callable[..., defer.Deferred],
                     fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        """`run(fn, *args)` (a pool's run) when it is this (source, user)'s turn."""
        source = login_source(ip) if ip else "-"
        return self._turns.run((source, _user_key(user)), run, fn, *args)

    def failures(self, ip: str, user: str = "") -> int:
        source = login_source(ip)
        if not user:
            return self._sources.get(source)
        return self._pairs.get((source, _user_key(user)))

    def delay_for(self, ip: str, user: str = "") -> float:
        source, user = login_source(ip), _user_key(user)
        return self._delay(self._pairs.get((source, user)), self._sources.get(source),
                           self._users.get(user) if user else 0, bool(user))

    def count_failure(self, ip: str, user: str = "") -> defer.Deferred:
        """Deferred[float]: count one failure in the shared counts (or here only, without
        them or when they cannot be reached); the delay to hold its reply back."""
        if self.shared is None:
            return defer.succeed(self.failed(ip, user))
        source, key = login_source(ip), _user_key(user)
        now = self._clock.seconds()
        self._maybe_purge(now)
        d = defer.maybeDeferred(self.shared.login_failed, source, key, now, self.window)

        def counted(before: tuple[int, int, int]) -> float:
            pair, by_source, by_user = before
            self._pairs.put((source, key), pair + 1)
            self._sources.put(source, by_source + 1)
            if key:
                self._users.put(key, by_user + 1)
            return self._delay(pair, by_source, by_user, bool(key))

        def here_only(failure: Failure) -> float:
            _report(failure, "count of a failed login")
            return self.failed(ip, user)
        return d.addCallbacks(counted, here_only)

    def failed(self, ip: str, user: str = "") -> float:
        """Count one failure in this process's counts only; the delay for its reply."""
        delay = self.delay_for(ip, user)
        source, user = login_source(ip), _user_key(user)
        self._pairs.add((source, user))
        self._sources.add(source)
        if user:
            self._users.add(user)
        return delay

    def succeeded(self, ip: str, user: str = "") -> None:
        source, user = login_source(ip), _user_key(user)
        n = self._pairs.forget((source, user))
        self._sources.take_off(source, n)
        if user:
            self._users.take_off(user, n)
        if self.shared is not None:
            # Not waited for: a correct password is answered at once.
            d = defer.maybeDeferred(self.shared.login_succeeded, source, user,
                                    self._clock.seconds())
            d.addErrback(_report, "reset of the failed logins after a success")

    def _delay(self, pair: int, by_source: int, by_user: int, has_user: bool) -> float:
        """The delay of the next failure given the counts before it (see "Delays")."""
        delay = min(max(self.delay * (pair + 1),
                        self.delay * (by_source + 1 - self.source_threshold)), self.max_delay)
        if has_user:
            by_user_delay = self.delay * (by_user + 1 - self.user_threshold)
            delay = max(delay, min(by_user_delay, self.user_max_delay))
        return max(0.0, delay)

    def _maybe_purge(self, now: float) -> None:
        if self._last_purge is not None and 0 <= now - self._last_purge < PURGE_INTERVAL:
            return
        self._last_purge = now
        d = defer.maybeDeferred(self.shared.purge_login_failures, now)  # type: ignore[union-attr]
        d.addErrback(_report, "purge of expired failed-login counts")

    def tracked(self) -> tuple[int, int, int]:
        """Entries held: (source, user) pairs, sources, users (for tests and the operator)."""
        return len(self._pairs), len(self._sources), len(self._users)


def _user_key(user: str) -> str:
    return user[:MAX_USER_KEY].lower()


def _report(failure: Failure, what: str) -> None:
    """The shared counts failed: an outage is already logged (rate-limited) by the directory;
    anything else is a bug and keeps its traceback. Either way the login goes on."""
    if not failure.check(DirectoryError):
        log.failure("login throttle: {what} failed", failure, what=what)


class _FairTurns:
    """At most `slots` jobs at once; waiting ones taken round-robin by source, then by user."""

    def __init__(self, slots: int):
        self.slots = slots
        self.running = 0
        # source -> user -> waiting jobs; dict order is the rotation order
        self._waiting: OrderedDict[str, OrderedDict[str, deque]] = OrderedDict()

    def run(self, key: tuple[str, str], run: Callable[..., defer.Deferred],
            fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        source, user = key
        result: defer.Deferred = defer.Deferred()
        users = self._waiting.setdefault(source, OrderedDict())
        users.setdefault(user, deque()).append((result, run, fn, args))
        self._start_next()
        return result

    def waiting(self) -> int:
        return sum(len(q) for users in self._waiting.values() for q in users.values())

    def _start_next(self) -> None:
        while self.running < self.slots and self._waiting:
            source, users = next(iter(self._waiting.items()))
            user, queue = next(iter(users.items()))
            result, run, fn, args = queue.popleft()
            del users[user]
            if queue:
                users[user] = queue  # to the back of this source's rotation
            del self._waiting[source]
            if users:
                self._waiting[source] = users  # to the back of the rotation of sources
            self.running += 1
            d = defer.maybeDeferred(run, fn, *args)
            d.addBoth(self._finished)
            d.chainDeferred(result)

    def _finished(self, outcome: Any) -> Any:
        self.running -= 1
        self._start_next()
        return outcome

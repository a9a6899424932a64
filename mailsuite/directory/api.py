"""The asynchronous directory the protocols use: `suite.directory`.

Every method returns a Deferred. SQL runs in `pools.db`, password hashing in `pools.hash`
(docs/design/directory.md, "Thread pools"), each call is its own unit of work on `DirectoryStore`, and results are plain
data. Nothing is cached, so `mailsuite user add` in another process takes effect at once; the
one exception, successful password checks, is keyed on the stored hash read at each login
(logincache.py), so a `passwd` or `disable` anywhere takes effect at once too.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from mailsuite.config import ConfigError
from mailsuite.directory import passwords
from mailsuite.directory.addresses import mailbox_address_problem
from mailsuite.directory.logincache import LoginCache
from mailsuite.directory.records import (AliasInfo, DirectoryError,  # noqa: F401 (re-exported)
                                         DirectoryUnavailable, DomainInfo, Route, UserInfo)
from mailsuite.directory.failures import LoginFailureStore
from mailsuite.directory.lookupcache import LookupCache
from mailsuite.directory.store import DirectoryStore
from mailsuite.directory.throttle import LoginThrottle
from mailsuite.pools import PoolStopped

log = Logger()

__all__ = ["Directory", "DirectoryChecker", "DirectoryService", "DirectoryError", "DirectoryUnavailable", "Route",
           "LoginThrottle"]


@runtime_checkable
class DirectoryService(Protocol):
    """What protocol code may ask the directory; every answer is a Deferred (see `Directory`)."""

    throttle: LoginThrottle

    def route(self, address: str) -> defer.Deferred:
        ...

    def sender_addresses(self, user: str, fresh: bool = False) -> defer.Deferred:
        ...

    def is_hosted(self, domain: str) -> defer.Deferred:
        ...

    def user_exists(self, address: str) -> defer.Deferred:
        ...

    def authenticate(self, address: str | bytes, password: str | bytes,
                     client_ip: str | None = None) -> defer.Deferred:
        ...

    # Inbound trust state shared by every instance (docs/design/trust-limits.md).
    def greylist_check(self, network: str, sender: str, recipient: str, now: float, delay: int,
                       retry_window: int, pass_ttl: int) -> defer.Deferred:
        ...

    def rate_hit(self, key: str, window_seconds: int, limit: int, now: float,
                 cost: int = 1) -> defer.Deferred:
        ...

    def rate_counters(self, now: float) -> defer.Deferred:
        ...

    def purge_trust(self, now: float) -> defer.Deferred:
        ...


class Directory:
    """Who exists and who may do what, for protocol code on the reactor thread.

    `authenticate(address, password, client_ip=None)` fires with the canonical address or fails
    with `UnauthorizedLogin` (unknown user, wrong password, disabled account: indistinguishable to
    the client, and equally slow). A database outage fails with `DirectoryUnavailable` instead:
    answer it as a temporary error (SMTP 454 4.7.0, IMAP NO [UNAVAILABLE]).
    With `client_ip`, failures feed `self.throttle` and their answer is held back by its delay.
    """

    def __init__(self, config: Any, pools: Any, reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.config = config
        self.pools = pools
        self.reactor = reactor
        self._outage = _OutageLog(reactor)
        try:
            self.store = DirectoryStore.from_config(config)
        except DirectoryError as e:
            raise ConfigError(f"[database] url: {e}")
        self.failures = LoginFailureStore(self.store)  # the throttle's counts, every instance
        limits = config.limits
        self.throttle = LoginThrottle(delay=limits.auth_failure_delay, clock=reactor,
                                      user_threshold=limits.auth_user_failures,
                                      user_max_delay=limits.auth_user_max_delay,
                                      source_threshold=limits.auth_source_failures,
                                      shared=self)
        self.login_cache = LoginCache(_login_cache_ttl(config), reactor)
        ttl = _cache_ttl(config, "lookup_cache_ttl")
        self.route_cache: LookupCache[Route] = LookupCache(
            ttl, reactor, keep=lambda route: route.hosted and route.exists)
        self.sender_cache: LookupCache[frozenset[str]] = LookupCache(ttl, reactor, keep=bool)

    def prepare(self) -> None:
        """Create or upgrade the schema (synchronous: called once before listening).

        A database that cannot be opened stops start-up with one line (ConfigError), like any
        other configuration problem, rather than a traceback."""
        try:
            self.store.prepare()
        except DirectoryError as e:
            raise ConfigError(f"cannot use the database: {e}")

    def close(self) -> None:
        self.store.close()

    # -- look-ups -----------------------------------------------------------------------------
    def route(self, address: str) -> defer.Deferred:
        """Deferred[Route] for one recipient address; an existing one may come from
        `route_cache` (lookupcache.py)."""
        return self._cached(self.route_cache, self.store.route, address)

    def sender_addresses(self, user: str, fresh: bool = False) -> defer.Deferred:
        """Deferred[frozenset[str]]: the addresses `user` may use in MAIL FROM / From, perhaps
        from `sender_cache`; `fresh`: from the database (a refusal asks again that way, so an
        address just given to the user is never refused from memory)."""
        return self._cached(self.sender_cache, self.store.sender_addresses, user, fresh)

    def _cached(self, cache: LookupCache, lookup: Callable[[str], Any], key: str,
                fresh: bool = False) -> defer.Deferred:
        value = None if fresh else cache.get(key)
        if value is not None:
            return defer.succeed(value)
        era = cache.era

        def found(value: Any) -> Any:
            cache.put(key, value, era)
            return value

        return self._db(lookup, key).addCallback(found)

    def is_hosted(self, domain: str) -> defer.Deferred:
        """Deferred[bool]"""
        return self._db(self.store.is_hosted, domain)

    def user_exists(self, address: str) -> defer.Deferred:
        """Deferred[bool]: a user account (not an alias) with this address exists."""
        return self._db(self.store.user_exists, address)

    # -- inbound trust state (docs/design/trust-limits.md) --------------------------------------
    def greylist_check(self, network: str, sender: str, recipient: str, now: float, delay: int,
                       retry_window: int, pass_ttl: int) -> defer.Deferred:
        """Deferred[GreylistOutcome] for one (client network, sender, recipient) triplet."""
        return self._db(self.store.greylist_check, network, sender, recipient, now, delay,
                        retry_window, pass_ttl)

    def rate_hit(self, key: str, window_seconds: int, limit: int, now: float,
                 cost: int = 1) -> defer.Deferred:
        """Deferred[RateOutcome]: count `cost` hits of `key` in its current fixed window."""
        return self._db(self.store.rate_hit, key, window_seconds, limit, now, cost)

    def rate_counters(self, now: float) -> defer.Deferred:
        """Deferred[list[RateCounter]]: the rate windows that have not ended."""
        return self._db(self.store.rate_counters, now)

    def purge_trust(self, now: float) -> defer.Deferred:
        """Deferred[(triplets, networks, windows) removed]: expired greylist and rate rows."""
        return self._db(self.store.purge_trust, now)

    # -- the login throttle's shared counts (throttle.FailureCounts) ---------------------------
    def login_failed(self, source: str, login: str, now: float, window: float) -> defer.Deferred:
        """Deferred[(pair, source, login) counts before this failure]."""
        return self._db(self.failures.login_failed, source, login, now, window)

    def login_succeeded(self, source: str, login: str, now: float) -> defer.Deferred:
        return self._db(self.failures.login_succeeded, source, login, now)

    def purge_login_failures(self, now: float) -> defer.Deferred:
        return self._db(self.failures.purge_login_failures, now)

    def _db(self, fn: Any, *args: Any) -> defer.Deferred:
        """Run one store unit of work in `pools.db`; whatever keeps the database from answering
        (down, locked, corrupt, the pool shutting down) fails with DirectoryUnavailable, logged
        in one line (docs/design/directory.md, "Faults")."""
        return self.pools.db.run(fn, *args).addErrback(self._unavailable)

    def _pool_stopped(self, failure: Any) -> Any:
        failure.trap(PoolStopped)
        return self._unavailable(failure)

    def _unavailable(self, failure: Any) -> Any:
        if failure.check(UnauthorizedLogin) or (failure.check(DirectoryError)
                                                and not failure.check(DirectoryUnavailable)):
            return failure  # an answer, not a fault
        if failure.check(DirectoryUnavailable):
            error = failure.value
        elif failure.check(PoolStopped, MemoryError):
            error = DirectoryUnavailable(f"directory: {type(failure.value).__name__}: "
                                         f"{failure.getErrorMessage()}")
        else:
            return failure  # a bug: keep its traceback
        self._outage.report(str(error))
        raise error

    # -- authentication -----------------------------------------------------------------------
    def authenticate(self, address: str | bytes, password: str | bytes,
                     client_ip: str | None = None) -> defer.Deferred:
        """Deferred[str canonical address]; errback UnauthorizedLogin (see the class docstring)."""
        d = defer.ensureDeferred(self._authenticate(address, password, client_ip))
        return d.addErrback(self._pool_stopped)  # the hash pool, at shutdown

    def checker(self, client_ip: str | None = None) -> "DirectoryChecker":
        """A twisted.cred checker for IUsernamePassword; avatarId = canonical address (str).
        Protocols that know the peer pass `client_ip` so that failures are throttled."""
        return DirectoryChecker(self, client_ip)

    async def _authenticate(self, address: str | bytes, password: str | bytes,
                            client_ip: str | None) -> str:
        if isinstance(address, bytes):
            try:
                address = address.decode("utf-8")
            except UnicodeDecodeError:
                address = address.decode("latin-1")  # cannot match a user; logged below
        record = await self._db(self.store.password_record, address)
        if record is None:
            # Same work as a real check, so response time does not reveal which users exist.
            await self.throttle.check_fairly(client_ip, address, self.pools.hash.run,
                                             passwords.dummy_verify)
            return await self._refuse(address, client_ip, "unknown user")
        canonical, stored, enabled = record
        tag = self.login_cache.tag(canonical, password)
        if enabled and self.login_cache.hit(canonical, tag, stored):
            return self._succeeded(canonical, client_ip)
        ok, new_hash = await self.login_cache.verify_once(
            (canonical, tag, stored),
            lambda: self.throttle.check_fairly(client_ip, canonical, self.pools.hash.run,
                                               passwords.verify_password, password, stored))
        if not ok:
            return await self._refuse(canonical, client_ip, "wrong password")
        if not enabled:
            return await self._refuse(canonical, client_ip, "account disabled")
        unsafe = mailbox_address_problem(canonical)
        if unsafe:
            # An imported account whose name cannot be a Maildir (docs/design/directory.md,
            # "Addresses that name directories"): no session could open its mailbox.
            return await self._refuse(canonical, client_ip,
                                      f"address unusable as a mailbox name ({unsafe}); rename it")
        verified = stored
        if new_hash is not None:
            try:
                replaced = await self._db(self.store.replace_password_hash, canonical,
                                          stored, new_hash)
            except DirectoryError as e:
                replaced = False
                log.warn("could not store the new password hash of {address}: {error}",
                         address=canonical, error=str(e))
            if replaced:
                log.info("rehashed the password of {address} with {scheme}", address=canonical,
                         scheme=new_hash.split("$")[1] if new_hash.startswith("$") else "?")
            verified = new_hash if replaced else None
        if verified is not None:
            self.login_cache.remember(canonical, tag, verified)
        return self._succeeded(canonical, client_ip)

    def _succeeded(self, canonical: str, client_ip: str | None) -> str:
        if client_ip is not None:
            self.throttle.succeeded(client_ip, canonical)
        return canonical

    async def _refuse(self, address: str, client_ip: str | None, reason: str) -> str:
        delay = 0.0
        if client_ip is not None:
            delay = await self.throttle.count_failure(client_ip, address.lower())
        log.info("authentication failed for {address} from {client_ip}: {reason} "
                 "(reply held {delay:.1f} s)", address=address, client_ip=client_ip or "-",
                 reason=reason, delay=delay)
        if delay > 0:
            await task.deferLater(self.reactor, delay, lambda: None)
        raise UnauthorizedLogin("authentication failed")


def _login_cache_ttl(config: Any) -> float:
    return _cache_ttl(config, "login_cache_ttl")


def _cache_ttl(config: Any, name: str) -> float:
    ttl = getattr(config.directory, name)
    if ttl < 0:
        raise ConfigError(f"[directory] {name} must be 0 (off) or more seconds")
    return float(ttl)


class _OutageLog:
    """One warning line per outage message, then at most one every `interval` seconds with the
    number of failures in between: a database outage under load must not flood the log."""

    def __init__(self, clock: Any, interval: float = 10.0):
        self.clock = clock
        self.interval = interval
        self._last: tuple[str, float] | None = None
        self._suppressed = 0

    def report(self, message: str) -> None:
        now = self.clock.seconds()
        if self._last is not None and self._last[0] == message and \
                now - self._last[1] < self.interval:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more failures)" if self._suppressed else ""
        log.warn("directory unavailable: {error}{more}", error=message, more=more)
        self._last = (message, now)
        self._suppressed = 0


@implementer(ICredentialsChecker)
class DirectoryChecker:
    """ICredentialsChecker for IUsernamePassword against the directory."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, directory: Directory, client_ip: str | None = None):
        self.directory = directory
        self.client_ip = client_ip

    def requestAvatarId(self, credentials: Any) -> defer.Deferred:
        return self.directory.authenticate(credentials.username, credentials.password,
                                           self.client_ip)

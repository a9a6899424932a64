"""Rate limits on MX clients and submission users (docs/design/trust-limits.md, "Rates").

The counters live in the SQL directory (`ms_rate`), so every instance on one database shares
them; each check is one unit of work in the db pool (`Directory.rate_hit`), never SQL on the
reactor thread. Fixed windows: a minute for MX, an hour for submission.

A limit of 0 is off: no SQL at all. Client addresses in `[ratelimit] exempt_networks` are never
counted on MX. **Fail open**: when the database cannot answer, the hit is not counted and the
client is let through, with a log line (at most one every `FailOpenLog.interval` seconds, with
the count of the ones left out): a rate limit exists to protect the service, and refusing all
mail because the counters are unreachable would be the outage it is meant to prevent.
"""
from __future__ import annotations

import ipaddress
import weakref
from dataclasses import replace
from typing import Any, Iterable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsuite.config import ConfigError, RateLimitSection
from mailsuite.directory.records import DirectoryError, RateOutcome
from mailsuite.smtp.replies import Reply

log = Logger()

# Counter kinds: the prefix of the key in ms_rate, the [ratelimit] setting, the window (s).
MX_CONNECTIONS, MX_RECIPIENTS = "mx-conn", "mx-rcpt"
SUBMISSION_MESSAGES, SUBMISSION_RECIPIENTS = "sub-msg", "sub-rcpt"
KINDS: dict[str, tuple[str, int]] = {
    MX_CONNECTIONS: ("mx_connections_per_minute", 60),
    MX_RECIPIENTS: ("mx_recipients_per_minute", 60),
    SUBMISSION_MESSAGES: ("submission_messages_per_hour", 3600),
    SUBMISSION_RECIPIENTS: ("submission_recipients_per_hour", 3600),
}
PURGE_INTERVAL = 60.0  # seconds between two purges of expired trust rows by one process

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def kind_of(key: str) -> str:
    return key.partition(":")[0]


def limit_for(config: RateLimitSection, key: str) -> tuple[int, int] | None:
    """(limit, window seconds) that applies to a counter key, None for an unknown kind."""
    kind = KINDS.get(kind_of(key))
    return (int(getattr(config, kind[0])), kind[1]) if kind else None


# -- addresses ------------------------------------------------------------------------------------
def parse_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client address, an IPv4-mapped IPv6 address as IPv4; None if it is not an address."""
    try:
        addr = ipaddress.ip_address(str(ip).split("%", 1)[0].strip())
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def parse_networks(values: Iterable[str], where: str) -> tuple[Network, ...]:
    """Networks of a configuration list ("192.0.2.0/24", "::1/128", a bare address); a bad
    one stops start-up with one line naming the setting."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(str(value).strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not a network (e.g. 192.0.2.0/24)")
    return tuple(networks)


def in_networks(ip: str, networks: tuple[Network, ...]) -> bool:
    addr = parse_address(ip)
    return addr is not None and any(addr.version == n.version and addr in n for n in networks)


def client_key(ip: str) -> str:
    """What MX counts per client: the IPv4 address, or the /64 of an IPv6 one (one host
    usually holds a whole /64: per address, it could start afresh at will)."""
    addr = parse_address(ip)
    if addr is None:
        return str(ip)
    if addr.version == 6:
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


# -- shared by the trust classes that use the directory -------------------------------------------
class FailOpenLog:
    """One warning line when a check fails open, then at most one every `interval` seconds with
    the number left out: a database outage under load must not flood the log."""

    def __init__(self, clock: Any, what: str, interval: float = 60.0):
        self.clock = clock
        self.what = what
        self.interval = interval
        self._last: float | None = None
        self._suppressed = 0

    def report(self, failure: Failure, subject: str) -> None:
        if not failure.check(DirectoryError):
            # A bug, not the environment: keep its traceback, and still let the mail through.
            log.failure("{what}: check of {subject} failed; let through", failure,
                        what=self.what, subject=subject)
            return
        now = self.clock.seconds()
        if self._last is not None and now - self._last < self.interval:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more since)" if self._suppressed else ""
        log.warn("{what}: directory unavailable, {subject} let through unchecked: "
                 "{error}{more}", what=self.what, subject=subject,
                 error=failure.getErrorMessage(), more=more)
        self._last = now
        self._suppressed = 0


_last_purge: "weakref.WeakKeyDictionary[Any, float]" = weakref.WeakKeyDictionary()


def maybe_purge(directory: Any, clock: Any) -> None:
    """Delete expired greylist and rate rows, at most once every PURGE_INTERVAL seconds per
    directory (whichever trust class asks first); never waited for, failures only logged."""
    now = clock.seconds()
    try:
        last = _last_purge.get(directory)
        if last is not None and now - last < PURGE_INTERVAL:
            return
        _last_purge[directory] = now
    except TypeError:  # an object that cannot be weakly referenced: purge every time
        pass

    def failed(failure: Failure) -> None:
        if failure.check(DirectoryError):
            log.info("trust purge skipped: {error}", error=failure.getErrorMessage())
        else:
            log.failure("trust purge failed", failure)

    d = defer.maybeDeferred(directory.purge_trust, now)
    d.addErrback(failed)


# -- the limits -----------------------------------------------------------------------------------
class RateLimits:
    """The four [ratelimit] limits; every method fires with a Reply to refuse with, or None.

    The SMTP server calls `connection(ip)` when an MX client connects, `recipient(ip)` at each
    MX RCPT, `submission_message(user)` once per message and `submission_recipient(user)` at
    each RCPT of an authenticated user. Each refusal logs one line."""

    def __init__(self, directory: Any, config: RateLimitSection, clock: Any):
        self.directory = directory
        self.config = config
        self.clock = clock
        for kind, (setting, _window) in KINDS.items():
            value = getattr(config, setting)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"[ratelimit] {setting} must be 0 (off) or a positive number")
        self.exempt = parse_networks(config.exempt_networks, "[ratelimit] exempt_networks")
        self._fail_open = FailOpenLog(clock, "rate limit")

    def connection(self, ip: str) -> defer.Deferred:
        """Deferred[Reply | None] for a new MX connection from `ip` (421 4.7.0 when over)."""
        if in_networks(ip, self.exempt):
            return defer.succeed(None)
        return self._hit(MX_CONNECTIONS, client_key(ip), Reply(
            421, "4.7.0", f"too many connections from {ip}, try again later"))

    def recipient(self, ip: str) -> defer.Deferred:
        """Deferred[Reply | None] for one MX RCPT from `ip` (450 4.7.1 when over)."""
        if in_networks(ip, self.exempt):
            return defer.succeed(None)
        return self._hit(MX_RECIPIENTS, client_key(ip), Reply(
            450, "4.7.1", f"too many recipients from {ip}, try again later"))

    def submission_message(self, user: str) -> defer.Deferred:
        """Deferred[Reply | None] for one message of an authenticated user (450 4.7.1)."""
        user = str(user).lower()
        return self._hit(SUBMISSION_MESSAGES, user, Reply(
            450, "4.7.1", f"{user} sent too many messages this hour, try again later"))

    def submission_recipient(self, user: str) -> defer.Deferred:
        """Deferred[Reply | None] for one recipient of an authenticated user (450 4.7.1)."""
        user = str(user).lower()
        return self._hit(SUBMISSION_RECIPIENTS, user, Reply(
            450, "4.7.1", f"{user} sent to too many recipients this hour, try again later"))

    def _hit(self, kind: str, subject: str, reply: Reply) -> defer.Deferred:
        setting, window = KINDS[kind]
        limit = getattr(self.config, setting)
        if limit <= 0:
            return defer.succeed(None)
        key = f"{kind}:{subject}"
        now = self.clock.seconds()
        d = defer.maybeDeferred(self.directory.rate_hit, key, window, limit, now)
        maybe_purge(self.directory, self.clock)

        def decide(outcome: RateOutcome) -> Reply | None:
            if outcome.allowed:
                return None
            log.info("rate limit: refused {key}: {count}/{limit} in {window} s, window ends in "
                     "{left} s ({code} {enhanced})", key=key, count=outcome.count, limit=limit,
                     window=window, left=outcome.retry_after, code=reply.code,
                     enhanced=reply.enhanced)
            return replace(reply, reason="rate_limit")  # the metrics' label

        def fail_open(failure: Failure) -> None:
            self._fail_open.report(failure, key)
            return None

        return d.addCallbacks(decide, fail_open)

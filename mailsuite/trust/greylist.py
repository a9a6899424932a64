"""Greylisting on MX (docs/design/trust-limits.md, "Greylisting").

A (client network, sender, recipient) triplet seen for the first time is refused for now
(451 4.7.1); a real MTA retries, and a retry at least `[greylist] delay` seconds later, and
within `retry_window`, is accepted and whitelists the client's network (/24 or /64) for
`pass_ttl`. The state lives in the SQL directory (`ms_greylist`, `ms_greylist_pass`), shared by
every instance, through `Directory.greylist_check` in the db pool.

Never greylisted: the networks given as `exempt_networks` (the server passes `[ratelimit]
exempt_networks`, the operator's one list of trusted client networks, loopback by default).
**Fail open**: when the database cannot answer, the recipient is accepted, with a log line (at
most one a minute): greylisting only delays spam, and refusing every message during a database
outage would hurt more than letting some through.
"""
from __future__ import annotations

from typing import Any, Iterable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsuite.config import ConfigError, GreylistSection
from mailsuite.directory.records import GREYLIST_RETRIED, GreylistOutcome
from mailsuite.listeners import network_prefix
from mailsuite.smtp.replies import Reply
from mailsuite.trust.ratelimit import (FailOpenLog, in_networks, maybe_purge, parse_address,
                                       parse_networks)

log = Logger()


class Greylist:
    """`check(ip, sender, recipient)` at each MX RCPT: Deferred[Reply | None] (None: go on)."""

    def __init__(self, directory: Any, config: GreylistSection, clock: Any,
                 exempt_networks: Iterable[str] = ()):
        self.directory = directory
        self.config = config
        self.clock = clock
        self.exempt = parse_networks(exempt_networks, "[ratelimit] exempt_networks")
        if config.enabled:
            if config.delay < 0:
                raise ConfigError("[greylist] delay must not be negative")
            if config.retry_window <= config.delay:
                raise ConfigError("[greylist] retry_window must be longer than delay")
            if config.pass_ttl <= 0:
                raise ConfigError("[greylist] pass_ttl must be positive")
        self._fail_open = FailOpenLog(clock, "greylist")

    def exempt_client(self, ip: str) -> bool:
        addr = parse_address(ip)
        return addr is None or in_networks(ip, self.exempt)

    def check(self, ip: str, sender: str, recipient: str) -> defer.Deferred:
        """Deferred[Reply | None]. sender: the MAIL FROM address, "" or "<>" for the null
        reverse-path; recipient: the RCPT address."""
        if not self.config.enabled or self.exempt_client(ip):
            return defer.succeed(None)
        network = network_prefix(str(ip))
        sender = (sender or "").strip()
        if sender in ("", "<>"):
            sender = "<>"
        recipient = (recipient or "").strip()
        now = self.clock.seconds()
        d = defer.maybeDeferred(self.directory.greylist_check, network, sender, recipient, now,
                                self.config.delay, self.config.retry_window,
                                self.config.pass_ttl)
        maybe_purge(self.directory, self.clock)

        def decide(outcome: GreylistOutcome) -> Reply | None:
            if outcome.passed:
                if outcome.reason == GREYLIST_RETRIED:
                    log.info("greylist: {ip} retried <{sender}> -> <{recipient}>: passed; "
                             "{network} passes for {ttl} s", ip=ip, sender=sender,
                             recipient=recipient, network=network, ttl=self.config.pass_ttl)
                return None
            log.info("greylist: deferred {ip} <{sender}> -> <{recipient}> ({reason}, retry in "
                     "{seconds} s)", ip=ip, sender=sender, recipient=recipient,
                     reason=outcome.reason, seconds=outcome.retry_in)
            return Reply(451, "4.7.1", f"greylisted, try again in {outcome.retry_in} seconds",
                         reason="greylisted")

        def fail_open(failure: Failure) -> None:
            self._fail_open.report(failure, f"{ip} <{sender}> -> <{recipient}>")
            return None

        return d.addCallbacks(decide, fail_open)

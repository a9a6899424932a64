"""Logging in to the dashboard: admin passwords, the session table, CSRF tokens.

Sessions are random tokens in a table in memory (docs/design/admin-web.md, "Sessions"), not
signed cookies: logout and expiry really end them, there is no signing key to keep, and a
`mailsuite admin passwd|delete` ends them too, because every request re-reads the admin's
stored hash (one indexed SELECT in the db pool) and compares it with the one seen at login.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailsuite.directory import passwords
from mailsuite.directory.admins import AdminStore
from mailsuite.directory.throttle import LoginThrottle

log = Logger()

SESSION_IDLE = 30 * 60  # seconds without a request before a session ends
SESSION_LIFETIME = 12 * 3600  # seconds after login, whatever the activity
MAX_SESSIONS = 64  # beyond this, the least recently used session ends
THROTTLE_PREFIX = "admin:"  # throttle key of an admin name, apart from mail users' addresses


@dataclass
class Session:
    token: str
    admin: str
    fingerprint: str  # of the admin's stored hash at login
    created: float
    last_seen: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    notice: str = ""  # one message for the next page (the outcome of an action)


class Sessions:
    """Open sessions by token, on `clock`; bounded by MAX_SESSIONS (least recently used out)."""

    def __init__(self, clock: IReactorTime, idle: float = SESSION_IDLE,
                 lifetime: float = SESSION_LIFETIME, max_sessions: int = MAX_SESSIONS):
        self.clock = clock
        self.idle = idle
        self.lifetime = lifetime
        self.max_sessions = max_sessions
        self._open: OrderedDict[str, Session] = OrderedDict()

    def create(self, admin: str, fingerprint: str) -> Session:
        now = self.clock.seconds()
        session = Session(secrets.token_urlsafe(32), admin, fingerprint, now, now)
        self._open[session.token] = session
        while len(self._open) > self.max_sessions:
            _, oldest = self._open.popitem(last=False)
            log.info("admin: session of {admin} ended: too many sessions", admin=oldest.admin)
        return session

    def get(self, token: str | None) -> Session | None:
        """The live session of `token` (its idle time restarts), or None."""
        session = self._open.get(token) if token else None
        if session is None:
            return None
        now = self.clock.seconds()
        if now - session.last_seen > self.idle or now - session.created > self.lifetime:
            del self._open[session.token]
            return None
        session.last_seen = now
        self._open.move_to_end(session.token)
        return session

    def end(self, token: str) -> None:
        self._open.pop(token, None)

    def __len__(self) -> int:
        return len(self._open)


def tokens_equal(expected: str, given: str | None) -> bool:
    """A CSRF token check in constant time."""
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def fingerprint(stored_hash: str) -> str:
    return hashlib.sha256(stored_hash.encode("utf-8")).hexdigest()


class AdminLogin:
    """Checks admin passwords in the hash pool, through the login throttle every protocol shares:
    a password guesser is slowed down here as on IMAP, and the other way round."""

    def __init__(self, admins: AdminStore, db: Any, hashing: Any, throttle: LoginThrottle,
                 clock: IReactorTime):
        self.admins = admins
        self.db = db
        self.hashing = hashing
        self.throttle = throttle
        self.clock = clock

    def login(self, name: str, password: str, client_ip: str) -> defer.Deferred:
        """Deferred[(canonical name, fingerprint)]; errback UnauthorizedLogin, held back by the
        throttle's delay (a wrong name and a wrong password are told apart only in the log)."""
        return defer.ensureDeferred(self._login(name, password, client_ip))

    async def _login(self, name: str, password: str, client_ip: str) -> tuple[str, str]:
        key = THROTTLE_PREFIX + name.strip().lower()
        stored = await self.db.run(self.admins.password_hash, name)
        if stored is None:
            # The same work as a real check: the answer's time does not tell names apart.
            await self.throttle.check_fairly(client_ip, key, self.hashing.run,
                                             passwords.dummy_verify)
            return await self._refuse(key, client_ip, "unknown admin")
        ok, _ = await self.throttle.check_fairly(client_ip, key, self.hashing.run,
                                                 passwords.verify_password, password, stored)
        if not ok:
            return await self._refuse(key, client_ip, "wrong password")
        self.throttle.succeeded(client_ip, key)
        canonical = name.strip().lower()
        log.info("admin: {admin} logged in from {client_ip}", admin=canonical,
                 client_ip=client_ip)
        return canonical, fingerprint(stored)

    async def _refuse(self, key: str, client_ip: str, reason: str) -> Any:
        log.info("admin: login failed for {name} from {client_ip}: {reason}",
                 name=key[len(THROTTLE_PREFIX):][:80], client_ip=client_ip, reason=reason)
        delay = await self.throttle.count_failure(client_ip, key)
        if delay > 0:
            await task.deferLater(self.clock, delay, lambda: None)
        raise UnauthorizedLogin("authentication failed")

    def still_valid(self, session: Session) -> defer.Deferred:
        """Deferred[bool]: the admin still exists with the password it logged in with."""
        d = self.db.run(self.admins.password_hash, session.admin)
        return d.addCallback(lambda stored: stored is not None
                             and hmac.compare_digest(fingerprint(stored), session.fingerprint))

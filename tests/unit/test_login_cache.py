"""The login cache (docs/design/directory.md, "Login cache") through Directory.authenticate, on
a SQLite file, inline pools and a fake clock. The hash pool counts the password checks it runs,
so a hit is seen as a login that ran none."""
from __future__ import annotations

import sqlite3
from types import SimpleNamespace
from typing import Any, Callable

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.python.failure import Failure

from mailsuite.config import Config, ConfigError
from mailsuite.directory import Directory, DirectoryStore, passwords
from mailsuite.directory.logincache import LoginCache
from mailsuite.pools import InlinePool
from tests.unit.conftest import FAST_HASHING

ALICE, BOB = "alice@example.org", "bob@example.org"
PASSWORD = "correct horse"
# The unit layer's current argon2id parameters (conftest.py), so a successful login does not
# rehash (and rewrite) the row, and a check costs milliseconds, not a real argon2 run.
HASH = FAST_HASHING.hash(PASSWORD)


class CountingPool:
    """The hash pool: runs at once and counts the password checks (verify_password calls)."""

    def __init__(self) -> None:
        self.checks = 0
        self._inline = InlinePool()

    def run(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        if fn is passwords.verify_password:
            self.checks += 1
        return self._inline.run(fn, *args)


class HeldPool:
    """A hash pool whose checks finish when the test says so (for concurrent logins)."""

    def __init__(self) -> None:
        self.pending: list[tuple[defer.Deferred, Callable[..., Any], tuple]] = []

    def run(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.pending.append((d, fn, args))
        return d

    def finish_all(self) -> None:
        while self.pending:
            d, fn, args = self.pending.pop(0)
            d.callback(fn(*args))


@pytest.fixture
def env(tmp_path, prepared_directory):
    clock = task.Clock()
    config = Config()
    config.server.data_dir = str(tmp_path)
    config.limits.auth_failure_delay = 1.0
    config.directory.login_cache_ttl = 300
    store = DirectoryStore(prepared_directory(str(tmp_path / "mailsuite.db")))
    assert store.url == config.database_url
    made: list[Directory] = []

    def directory(hash_pool: Any = None, ttl: float | None = None) -> Directory:
        if ttl is not None:
            config.directory.login_cache_ttl = ttl
        d = Directory(config, SimpleNamespace(db=InlinePool(), hash=hash_pool or CountingPool()),
                      reactor=clock)
        d.prepare()
        made.append(d)
        return d

    first = directory()
    store.add_domain("example.org")
    store.add_user(ALICE, password_hash=HASH)
    store.add_user(BOB, password_hash=HASH)
    yield SimpleNamespace(clock=clock, config=config, store=store, directory=directory,
                          first=first, db=config.database_url.removeprefix("sqlite:///"))
    for d in made:
        d.close()
    store.close()


def login(directory: Directory, user: str, password: str, ip: str | None = "192.0.2.1") -> Any:
    """The outcome at once: the address, a Failure, or None while held back by the throttle."""
    results: list = []
    directory.authenticate(user, password, client_ip=ip).addBoth(results.append)
    return results[0] if results else None


def refused(outcome: Any) -> bool:
    return isinstance(outcome, Failure) and outcome.check(UnauthorizedLogin) is not None


def set_row(db_path: str, address: str, **values: Any) -> None:
    """Change the user's row directly, as a CLI of another instance sharing the database would."""
    with sqlite3.connect(db_path) as conn:
        for column, value in values.items():
            conn.execute(f"UPDATE ms_user SET {column} = ? WHERE address = ?", (value, address))


def test_a_repeated_login_skips_the_password_check(env):
    pool = CountingPool()
    directory = env.directory(pool)
    assert login(directory, ALICE, PASSWORD) == ALICE
    assert login(directory, "Alice@Example.org", PASSWORD) == ALICE
    assert login(directory, ALICE, PASSWORD) == ALICE
    assert pool.checks == 1
    assert login(directory, BOB, PASSWORD) == BOB  # another account: its own check
    assert pool.checks == 2


def test_entries_expire_after_the_ttl(env):
    pool = CountingPool()
    directory = env.directory(pool, ttl=60)
    assert login(directory, ALICE, PASSWORD) == ALICE
    env.clock.advance(59)
    assert login(directory, ALICE, PASSWORD) == ALICE
    assert pool.checks == 1
    env.clock.advance(1)  # 60 s after the check, not after the last use
    assert login(directory, ALICE, PASSWORD) == ALICE
    assert pool.checks == 2


def test_ttl_zero_turns_the_cache_off(env):
    pool = CountingPool()
    directory = env.directory(pool, ttl=0)
    for _ in range(3):
        assert login(directory, ALICE, PASSWORD) == ALICE
    assert pool.checks == 3
    assert len(directory.login_cache) == 0


def test_a_negative_ttl_is_a_configuration_error(env):
    with pytest.raises(ConfigError, match="login_cache_ttl"):
        env.directory(ttl=-1)


def test_a_new_password_set_elsewhere_is_seen_at_the_next_login(env):
    pool = CountingPool()
    directory = env.directory(pool)
    assert login(directory, ALICE, PASSWORD) == ALICE
    set_row(env.db, ALICE, password_hash=passwords.hash_password("new secret"))
    assert refused(login(directory, ALICE, PASSWORD, ip=None))
    assert login(directory, ALICE, "new secret") == ALICE
    assert pool.checks == 3


def test_the_same_password_set_again_is_checked_again(env):
    """A new hash of the same password (new salt) is a different stored string: a miss."""
    pool = CountingPool()
    directory = env.directory(pool)
    assert login(directory, ALICE, PASSWORD) == ALICE
    set_row(env.db, ALICE, password_hash=passwords.hash_password(PASSWORD))
    assert login(directory, ALICE, PASSWORD) == ALICE
    assert pool.checks == 2


def test_a_disabled_account_is_refused_at_once(env):
    pool = CountingPool()
    directory = env.directory(pool)
    assert login(directory, ALICE, PASSWORD) == ALICE
    set_row(env.db, ALICE, enabled=False)
    assert refused(login(directory, ALICE, PASSWORD, ip=None))
    set_row(env.db, ALICE, enabled=True)
    assert login(directory, ALICE, PASSWORD) == ALICE


def test_failures_are_never_cached_and_still_throttled(env):
    pool = CountingPool()
    directory = env.directory(pool)
    assert login(directory, ALICE, PASSWORD) == ALICE
    for n in range(1, 4):
        outcome = login(directory, ALICE, "guess", ip="198.51.100.7")
        assert outcome is None  # held back by the throttle
        env.clock.advance(n * 1.0)
        assert directory.throttle.failures("198.51.100.7", ALICE) == n
    assert pool.checks == 4  # every wrong password ran its own check
    assert len(directory.login_cache) == 1
    # The right password is still answered at once, from the cache.
    assert login(directory, ALICE, PASSWORD, ip="198.51.100.7") == ALICE
    assert pool.checks == 4
    assert directory.throttle.failures("198.51.100.7", ALICE) == 0  # a success resets


def test_a_failed_first_login_leaves_nothing_to_hit(env):
    pool = CountingPool()
    directory = env.directory(pool)
    assert refused(login(directory, ALICE, "wrong", ip=None))
    assert refused(login(directory, ALICE, "wrong", ip=None))
    assert pool.checks == 2
    assert len(directory.login_cache) == 0


def test_two_directories_do_not_share_hits(env):
    """Each Directory (each process) has its own random key: one's entries mean nothing to the
    other, and equal passwords give different tags."""
    one, other = CountingPool(), CountingPool()
    first, second = env.directory(one), env.directory(other)
    assert login(first, ALICE, PASSWORD) == ALICE
    assert login(second, ALICE, PASSWORD) == ALICE
    assert (one.checks, other.checks) == (1, 1)
    assert first.login_cache.tag(ALICE, PASSWORD) != second.login_cache.tag(ALICE, PASSWORD)


def test_the_password_is_not_kept(env):
    directory = env.directory()
    secret = "a rather unique password 8d1f"
    env.store.set_password(BOB, secret)
    assert login(directory, BOB, secret) == BOB
    kept = repr(vars(directory.login_cache)) + repr(list(directory.login_cache._entries.values()))
    assert secret not in kept and secret.encode() not in kept.encode()


def test_concurrent_logins_with_the_same_password_share_one_check(env):
    pool = HeldPool()
    directory = env.directory(pool)
    results: list = []
    for _ in range(5):
        directory.authenticate(ALICE, PASSWORD, client_ip="192.0.2.1").addBoth(results.append)
    assert len(pool.pending) == 1
    pool.finish_all()
    assert results == [ALICE] * 5


def test_a_wrong_password_waiting_on_a_right_one_gets_its_own_check(env):
    pool = HeldPool()
    directory = env.directory(pool)
    results: list = []
    directory.authenticate(ALICE, PASSWORD).addBoth(results.append)
    directory.authenticate(ALICE, "wrong").addBoth(results.append)
    directory.authenticate(ALICE, "wrong").addBoth(results.append)
    pool.finish_all()
    assert results[0] == ALICE
    assert len(results) == 3 and all(refused(r) for r in results[1:])


def test_waiters_on_a_failed_check_run_their_own(env):
    """Identical wrong passwords: none is answered from another's outcome, so the throttle
    counts each."""
    pool = HeldPool()
    directory = env.directory(pool)
    results: list = []
    for _ in range(3):
        directory.authenticate(ALICE, "wrong", client_ip="203.0.113.9").addBoth(results.append)
    pool.finish_all()
    env.clock.advance(100)
    assert len(results) == 3 and all(refused(r) for r in results)
    assert directory.throttle.failures("203.0.113.9", ALICE) == 3


def test_the_cache_is_bounded():
    cache = LoginCache(ttl=60, clock=task.Clock(), max_entries=3)
    for n in range(10):
        address = f"u{n}@example.org"
        cache.remember(address, cache.tag(address, "pw"), "$hash")
    assert len(cache) == 3
    assert cache.hit("u9@example.org", cache.tag("u9@example.org", "pw"), "$hash")
    assert not cache.hit("u0@example.org", cache.tag("u0@example.org", "pw"), "$hash")

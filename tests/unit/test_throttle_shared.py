"""The login throttle's counts shared through the SQL directory (docs/design/limits.md, "Login
throttle"): two Directory objects on one database stand for two instances; a guesser
alternating between them waits as long as on one, a success on one forgets everywhere, a
correct password never waits for the bookkeeping, and an unreachable database falls back to
this process's counts."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

import pytest

from mailsuite.directory import DirectoryStore, passwords
from mailsuite.directory.failures import LoginFailureStore
from mailsuite.directory.records import DirectoryUnavailable
from mailsuite.pools import InlinePool
from tests.unit.test_login_cache import ALICE, BOB, PASSWORD, env, login, refused  # noqa: F401

GUESSER = "192.0.2.66"


class QuickChecks(InlinePool):
    """The hash pool without argon2's cost: the password is right or it is not."""

    def run(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        if fn is passwords.verify_password:
            return super().run(lambda: (args[0] == PASSWORD, None))
        if fn is passwords.dummy_verify:
            return super().run(lambda: None)
        return super().run(fn, *args, **kw)


@pytest.fixture
def two(env):
    """Two instances on one database (and one clock)."""
    env.first.pools = SimpleNamespace(db=env.first.pools.db, hash=QuickChecks())
    return env.first, env.directory(hash_pool=QuickChecks())


def held_for(env: Any, directory: Any, user: str, password: str, ip: str = GUESSER) -> float:
    """Seconds (on the fake clock) the reply to a wrong password was held back."""
    results: list = []
    directory.authenticate(user, password, client_ip=ip).addBoth(results.append)
    waited = 0.0
    while not results:
        assert waited < 60, "the reply never came"
        env.clock.advance(0.25)
        waited += 0.25
    assert refused(results[0]), results
    return waited


def test_failures_alternating_between_instances_are_slowed_as_on_one(env, two):
    a, b = two
    delays = [held_for(env, (a, b)[n % 2], ALICE, "guess") for n in range(6)]
    # auth_failure_delay = 1 s times the failures so far of this (source, user), everywhere.
    assert delays == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert a.throttle.failures(GUESSER, ALICE) == 5 and b.throttle.failures(GUESSER, ALICE) == 6
    assert LoginFailureStore(env.store).login_failure_counts(GUESSER, ALICE, env.clock.seconds()) == (6, 6, 6)


def test_a_success_on_one_instance_forgets_the_failures_on_the_other(env, two):
    a, b = two
    for _ in range(3):
        held_for(env, a, ALICE, "guess")
    held_for(env, a, BOB, "guess")  # another account from the same place stays counted
    assert login(b, ALICE, PASSWORD, ip=GUESSER) == ALICE
    assert held_for(env, a, ALICE, "typo") == 1.0
    assert LoginFailureStore(env.store).login_failure_counts(GUESSER, BOB, env.clock.seconds()) == (1, 2, 1)


def test_a_correct_password_does_not_wait_for_the_shared_bookkeeping(env, two):
    held: list[tuple[Callable[..., Any], tuple]] = []

    class SlowResets(InlinePool):
        def run(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
            if getattr(fn, "__name__", "") == "login_succeeded":
                held.append((fn, args))
                from twisted.internet import defer
                return defer.Deferred()  # the database is slow today
            return super().run(fn, *args, **kw)

    directory = two[0]
    held_for(env, directory, ALICE, "guess")
    directory.pools = SimpleNamespace(db=SlowResets(), hash=QuickChecks())
    assert login(directory, ALICE, PASSWORD, ip=GUESSER) == ALICE  # answered at once
    assert [fn.__name__ for fn, _ in held] == ["login_succeeded"]
    assert directory.throttle.failures(GUESSER, ALICE) == 0  # forgotten here already


def test_an_unreachable_database_counts_in_this_process(env, two, monkeypatch):
    directory = two[0]

    def down(*args: Any) -> None:
        raise DirectoryUnavailable("database postgresql://db/mail: connection refused")

    monkeypatch.setattr(directory.failures, "login_failed", down)
    # password_record still answers: only the counts are unreachable.
    assert [held_for(env, directory, ALICE, "guess") for _ in range(3)] == [1.0, 2.0, 3.0]
    assert directory.throttle.failures(GUESSER, ALICE) == 3


def test_expired_counts_are_purged(env, two):
    directory = two[0]
    held_for(env, directory, ALICE, "guess", ip="198.51.100.1")
    env.clock.advance(directory.throttle.window + 61)
    assert held_for(env, directory, BOB, "guess", ip="198.51.100.2") == 1.0
    rows = _rows(env.store)
    assert ("p", "198.51.100.1", ALICE) not in rows and ("p", "198.51.100.2", BOB) in rows


def test_store_counts_start_again_after_the_window(env):
    store = LoginFailureStore(env.store)
    assert store.login_failed("192.0.2.1", ALICE, 100.0, 900.0) == (0, 0, 0)
    assert store.login_failed("192.0.2.1", ALICE, 200.0, 900.0) == (1, 1, 1)
    assert store.login_failed("192.0.2.2", "", 300.0, 900.0) == (0, 0, 0)  # no user count
    assert store.login_failure_counts("192.0.2.1", ALICE, 1100.0) == (2, 2, 2)
    assert store.login_failure_counts("192.0.2.1", ALICE, 1100.5) == (0, 0, 0)
    assert store.login_failed("192.0.2.1", ALICE, 1101.0, 900.0) == (0, 0, 0)
    long_name = "x" * 1000
    store.login_failed("192.0.2.1", long_name, 1102.0, 900.0)  # cut to the column
    assert store.login_failure_counts("192.0.2.1", long_name, 1102.0) == (1, 2, 1)


def _rows(store: DirectoryStore) -> set[tuple[str, str, str]]:
    from sqlalchemy import select

    from mailsuite.directory.models import LoginFailure

    with store._unit() as s:
        return {tuple(r) for r in s.execute(select(LoginFailure.kind, LoginFailure.source,
                                                   LoginFailure.login))}

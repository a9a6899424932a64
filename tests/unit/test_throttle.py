"""The login throttle (mailsuite/directory/throttle.py, docs/design/limits.md): failures count
per (source, user), per source and per user; a success forgets only its own; other users are
never slowed; memory is bounded."""
from __future__ import annotations

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.python.failure import Failure

from mailsuite.config import Config
from mailsuite.directory import Directory, DirectoryStore, passwords
from mailsuite.directory.throttle import LoginThrottle, login_source
from tests.unit.test_directory_async import inline_pools

ALICE, BOB = "alice@example.org", "bob@example.org"


def throttle(clock: task.Clock, **kw) -> LoginThrottle:
    kw.setdefault("delay", 1.0)
    return LoginThrottle(max_delay=15.0, window=900.0, clock=clock, **kw)


def test_sources():
    assert login_source("192.0.2.7") == "192.0.2.7"
    assert login_source("::ffff:192.0.2.7") == "192.0.2.7"
    assert login_source("2001:db8::1") == login_source("2001:db8::ffff:1") == "2001:db8::/64"


def test_a_success_of_another_account_does_not_reset_the_guesser():
    t = throttle(task.Clock())
    for _ in range(5):
        t.failed("192.0.2.1", ALICE)
    t.succeeded("192.0.2.1", BOB)  # the attacker's own account, say
    assert t.failures("192.0.2.1", ALICE) == 5
    assert t.delay_for("192.0.2.1", ALICE) == 6.0
    # Alice's own success from there forgets her failures, and only hers.
    t.failed("192.0.2.1", "carol@example.org")
    t.succeeded("192.0.2.1", ALICE)
    assert t.failures("192.0.2.1", ALICE) == 0
    assert t.failures("192.0.2.1") == 1  # carol's failure is still counted for the address


def test_other_users_are_not_slowed():
    t = throttle(task.Clock())
    for _ in range(8):
        t.failed("192.0.2.1", ALICE)
    # Bob at the same address: his first mistake costs what a first mistake costs.
    assert t.delay_for("192.0.2.1", BOB) == 1.0
    # Alice from elsewhere: below the per-user threshold, no extra delay.
    assert t.delay_for("198.51.100.1", ALICE) == 1.0


def test_distributed_guessing_of_one_account_is_slowed_but_the_owner_is_not_locked_out():
    t = throttle(task.Clock(), user_threshold=10, user_max_delay=3.0)
    for n in range(50):
        t.failed(f"10.0.{n}.1", ALICE)  # one failure each from 50 places
    assert t.delay_for("10.0.99.1", ALICE) == 3.0  # capped small: the owner waits 3 s at most
    assert t.delay_for("10.0.99.1", BOB) == 1.0


def test_password_spraying_from_one_address():
    t = throttle(task.Clock(), source_threshold=20)
    for n in range(30):
        t.failed("192.0.2.1", f"user{n}@example.org")
    # Each pair has one failure, but the address has 30: its next failure waits 11 s.
    assert t.delay_for("192.0.2.1", "user99@example.org") == 11.0
    assert t.delay_for("192.0.2.2", "user99@example.org") == 1.0


def test_window_forgets():
    clock = task.Clock()
    t = throttle(clock)
    t.failed("192.0.2.1", ALICE)
    clock.advance(901)
    assert t.failures("192.0.2.1", ALICE) == 0 and t.failures("192.0.2.1") == 0


def test_memory_is_bounded():
    t = LoginThrottle(delay=1.0, clock=task.Clock(), max_tracked=100)
    for n in range(1000):
        t.failed(f"10.{n // 256}.{n % 256}.1", f"user{n}@example.org" + "x" * 1000)
    assert t.tracked() == (100, 100, 100)


def test_directory_does_not_slow_bob_while_alice_is_guessed_from_the_same_address(tmp_path):
    """The issue's case through Directory.authenticate: while one address guesses alice's
    password, bob logs in from that address without delay, and alice from another address with
    at most the first-failure delay."""
    clock = task.Clock()
    config = Config()
    config.server.data_dir = str(tmp_path)
    config.limits.auth_failure_delay = 1.0
    directory = Directory(config, inline_pools(), reactor=clock)
    directory.prepare()
    store = DirectoryStore(config.database_url)
    store.add_domain("example.org")
    for user in (ALICE, BOB):
        store.add_user(user, password_hash=passwords.hash_password("secret-pw-1"))
    try:
        def attempt(user: str, password: str, ip: str) -> list:
            results: list = []
            directory.authenticate(user, password, client_ip=ip).addBoth(results.append)
            return results

        guesses = []
        for _ in range(20):
            guesses.append(attempt(ALICE, "guess", "192.0.2.66"))
            clock.advance(0.5)  # the guesser runs in parallel connections: replies still held
            assert attempt(BOB, "secret-pw-1", "192.0.2.66") == [BOB]  # at once, every time
        assert attempt(ALICE, "secret-pw-1", "198.51.100.5") == [ALICE]  # at once
        wrong = attempt(ALICE, "typo", "198.51.100.5")
        clock.advance(3.0)  # user-wide delay capped at auth_user_max_delay
        assert len(wrong) == 1 and isinstance(wrong[0], Failure)
        assert wrong[0].check(UnauthorizedLogin)
        assert directory.throttle.failures("192.0.2.66", ALICE) == 20
        clock.advance(100)
        assert all(len(g) == 1 for g in guesses)  # the guesser's replies were held back
    finally:
        directory.close()
        store.close()


def test_password_checks_take_turns_by_source_then_user():
    """A guesser's backlog of checks does not delay another user's login, not even at the same
    address: the hash pool serves the waiting checks in turn."""
    t = throttle(task.Clock())
    pending: list = []

    def run(fn, *args):  # a pool with jobs we finish by hand
        d = defer.Deferred()
        pending.append((d, args))
        return d

    def check(ip: str, user: str) -> list:
        results: list = []
        t.check_fairly(ip, user, run, lambda *a: None, ip, user).addBoth(results.append)
        return results

    guesses = [check("192.0.2.66", ALICE) for _ in range(50)]
    others = [check("203.0.113.1", ALICE) for _ in range(50)]
    bob = check("192.0.2.66", BOB)
    started = [args for _, args in pending]
    assert len(started) == 2  # HASH_SLOTS at once
    for _ in range(3):
        d, _args = pending.pop(0)
        d.callback(True)
    # Two sources and two users at the first one: bob's check is among the first few started.
    assert bob == [] and ("192.0.2.66", BOB) in [args for _, args in pending]
    while pending:
        d, _args = pending.pop(0)
        d.callback(True)
    assert bob == [True] and all(g == [True] for g in guesses + others)
    assert t._turns.waiting() == 0 and t._turns.running == 0


def test_a_failing_check_frees_its_turn():
    t = throttle(task.Clock())

    def run(fn, *args):
        return defer.maybeDeferred(fn, *args)

    def boom() -> None:
        raise RuntimeError("hash pool stopped")

    results: list = []
    for _ in range(5):
        t.check_fairly("192.0.2.1", ALICE, run, boom).addErrback(results.append)
    assert len(results) == 5 and t._turns.running == 0

"""The asynchronous Directory (what protocol code uses): authentication, rehashing, look-ups,
and the login throttle, on a SQLite file with inline pools and a fake clock.

`DirectoryCases` is shared: tests/scenario/test_directory_postgresql.py runs it on PostgreSQL with
real thread pools. Passwords are argon2id: with the unit layer's cheap parameters here
(conftest.py), the real ones there.
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import argon2.low_level
import pytest
from passlib.hash import sha512_crypt
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest as trial

from mailsuite.config import Config
from mailsuite.directory import Directory, DirectoryStore, LoginThrottle, Route
from mailsuite.pools import InlinePool
from tests.unit.test_directory_store import _HASH, PASSWORD, populate


def inline_pools() -> SimpleNamespace:
    return SimpleNamespace(db=InlinePool(), hash=InlinePool(), io=InlinePool())


class DirectoryCases:
    """The Directory's behaviour on any database and pools; subclasses choose both (here SQLite
    and inline pools; tests/scenario/test_directory_postgresql.py: PostgreSQL, real threads)."""

    auth_delay = 0.0

    def make_url(self) -> str:
        raise NotImplementedError

    def make_pools(self) -> Any:
        raise NotImplementedError

    def stop_pools(self) -> None:
        pass

    def setUp(self):
        self.url = self.make_url()
        config = Config()
        config.server.data_dir = self.mktemp()
        config.server.admin_address = "boss@admin.example"
        config.database.url = self.url
        config.limits.auth_failure_delay = self.auth_delay
        self.pools = self.make_pools()
        self.directory = Directory(config, self.pools)
        self.directory.prepare()
        self.store = DirectoryStore(self.url)  # plays the admin CLI, a separate client
        populate(self.store)
        self.store.set_password("alice@example.org", PASSWORD)

    def tearDown(self):
        self.stop_pools()
        self.directory.close()
        self.store.close()

    @defer.inlineCallbacks
    def test_authenticate(self):
        self.assertEqual((yield self.directory.authenticate("Alice@EXAMPLE.org", PASSWORD)),
                         "alice@example.org")
        self.assertEqual((yield self.directory.authenticate(b"alice@example.org",
                                                            PASSWORD.encode())),
                         "alice@example.org")
        for user, password in [("alice@example.org", "wrong"), ("alice@example.org", ""),
                               ("nobody@example.org", PASSWORD), ("alice", PASSWORD),
                               (b"\xff@example.org", PASSWORD)]:
            yield self.assertFailure(self.directory.authenticate(user, password),
                                     UnauthorizedLogin)

    @defer.inlineCallbacks
    def test_disabled_user_cannot_log_in(self):
        self.store.set_enabled("alice@example.org", False)
        yield self.assertFailure(self.directory.authenticate("alice@example.org", PASSWORD),
                                 UnauthorizedLogin)
        self.store.set_enabled("alice@example.org", True)
        self.assertEqual((yield self.directory.authenticate("alice@example.org", PASSWORD)),
                         "alice@example.org")

    @defer.inlineCallbacks
    def test_unknown_user_costs_the_same_verification_as_a_wrong_password(self):
        # Not timed (a loaded machine makes timings lie): the work is counted instead. Both
        # must run one argon2id verification with the parameters of a real hash; without
        # dummy_verify an unknown user would run none and answer at once.
        verified = []
        real_verify = argon2.low_level.verify_secret

        def recording(hash, secret, type):
            verified.append(hash.split(b"$")[1:4])  # b"argon2id", b"v=19", b"m=...,t=...,p=..."
            return real_verify(hash, secret, type)

        self.patch(argon2.low_level, "verify_secret", recording)
        yield self.assertFailure(self.directory.authenticate("alice@example.org", "wrong"),
                                 UnauthorizedLogin)
        known, verified[:] = list(verified), []
        yield self.assertFailure(self.directory.authenticate("nobody@example.org", "wrong"),
                                 UnauthorizedLogin)
        self.assertEqual(len(known), 1)
        self.assertEqual(known[0][0], b"argon2id")
        self.assertEqual(verified, known)

    @defer.inlineCallbacks
    def test_legacy_sha512_crypt_is_rehashed_to_argon2id(self):
        legacy = sha512_crypt.using(rounds=5000).hash(PASSWORD)
        self.store.set_password_hash("bob@example.org", legacy)
        yield self.assertFailure(self.directory.authenticate("bob@example.org", "wrong"),
                                 UnauthorizedLogin)
        self.assertEqual(self.store.password_record("bob@example.org")[1], legacy)
        self.assertEqual((yield self.directory.authenticate("bob@example.org", PASSWORD)),
                         "bob@example.org")
        stored = self.store.password_record("bob@example.org")[1]
        self.assertTrue(stored.startswith("$argon2id$"), stored)
        self.assertEqual((yield self.directory.authenticate("bob@example.org", PASSWORD)),
                         "bob@example.org")

    @defer.inlineCallbacks
    def test_dovecot_sha512_crypt_hash(self):
        dovecot = "{SHA512-CRYPT}" + sha512_crypt.using(rounds=5000).hash(PASSWORD)
        self.store.add_user("imported@example.net", password_hash=dovecot)
        self.assertEqual((yield self.directory.authenticate("imported@example.net", PASSWORD)),
                         "imported@example.net")
        self.assertTrue(self.store.password_record("imported@example.net")[1]
                        .startswith("$argon2id$"))

    @defer.inlineCallbacks
    def test_checker(self):
        checker = self.directory.checker()
        avatar = yield checker.requestAvatarId(UsernamePassword(b"ALICE@example.org",
                                                                PASSWORD.encode()))
        self.assertEqual(avatar, "alice@example.org")
        self.assertIsInstance(avatar, str)
        yield self.assertFailure(checker.requestAvatarId(UsernamePassword(b"alice@example.org",
                                                                          b"nope")),
                                 UnauthorizedLogin)

    @defer.inlineCallbacks
    def test_lookups(self):
        self.store.add_alias("sales@example.org", ["alice@example.org", "far@remote.example"])
        route = yield self.directory.route("Sales+x@Example.org")
        self.assertEqual(route, Route("sales+x@example.org", True, ("alice@example.org",),
                                      ("far@remote.example",)))
        self.assertEqual((yield self.directory.route("x@remote.example")),
                         Route("x@remote.example", False))
        self.assertEqual((yield self.directory.sender_addresses("alice@example.org")),
                         frozenset({"alice@example.org", "sales@example.org"}))
        self.assertTrue((yield self.directory.is_hosted("EXAMPLE.net")))
        self.assertFalse((yield self.directory.is_hosted("remote.example")))
        self.assertTrue((yield self.directory.user_exists("Bob@example.org")))
        self.assertFalse((yield self.directory.user_exists("sales@example.org")))
        self.assertFalse((yield self.directory.user_exists("not an address")))

    @defer.inlineCallbacks
    def test_changes_take_effect_without_restart(self):
        self.assertFalse((yield self.directory.route("erin@example.org")).exists)
        self.store.add_user("erin@example.org", PASSWORD)
        self.assertEqual((yield self.directory.route("erin@example.org")).mailboxes,
                         ("erin@example.org",))
        self.assertEqual((yield self.directory.authenticate("erin@example.org", PASSWORD)),
                         "erin@example.org")
        self.store.set_password("erin@example.org", "changed")
        yield self.assertFailure(self.directory.authenticate("erin@example.org", PASSWORD),
                                 UnauthorizedLogin)




class SQLiteDirectoryTests(DirectoryCases, trial.TestCase):
    @pytest.fixture(autouse=True)
    def _prepared_directory(self, prepared_directory):
        self.prepared_directory = prepared_directory

    def make_url(self) -> str:
        return self.prepared_directory(os.path.abspath(self.mktemp()) + ".db")

    def make_pools(self) -> Any:
        return inline_pools()


# -- the login throttle, on a fake clock ---------------------------------------------------------
def throttled_directory(tmp_path, clock: Clock, delay: float) -> tuple[Directory, DirectoryStore]:
    url = "sqlite:///" + str(tmp_path / "directory.db")
    config = Config()
    config.database.url = url
    config.limits.auth_failure_delay = delay
    directory = Directory(config, inline_pools(), reactor=clock)
    directory.prepare()
    store = DirectoryStore(url)
    store.add_domain("example.org")
    store.add_user("alice@example.org", password_hash=_HASH)
    return directory, store


def test_failures_are_delayed_per_client(tmp_path):
    """Failed logins with a client address are answered later and later; success resets."""
    clock = Clock()
    directory, store = throttled_directory(tmp_path, clock, delay=0.3)

    def attempt(password: str, ip: str | None) -> list:
        results: list = []
        directory.authenticate("alice@example.org", password, client_ip=ip).addBoth(
            results.append)
        return results

    def refused(results: list) -> bool:
        return len(results) == 1 and isinstance(results[0], Failure) and \
            isinstance(results[0].value, UnauthorizedLogin)

    try:
        assert attempt(PASSWORD, "192.0.2.1") == ["alice@example.org"]  # no delay on success
        first = attempt("wrong", "192.0.2.1")
        clock.advance(0.29)
        assert first == []  # held back for the whole delay
        clock.advance(0.01)
        assert refused(first)
        second = attempt("wrong", "192.0.2.1")
        clock.advance(0.59)
        assert second == []
        clock.advance(0.01)
        assert refused(second)
        assert directory.throttle.failures("192.0.2.1") == 2
        # Another client is not slowed down by 192.0.2.1's failures.
        assert directory.throttle.failures("192.0.2.2") == 0
        assert attempt(PASSWORD, "192.0.2.1") == ["alice@example.org"]
        assert directory.throttle.failures("192.0.2.1") == 0
        # Without a client address there is no throttling: answered without the clock moving.
        for _ in range(3):
            assert refused(attempt("wrong", None))
        assert not clock.getDelayedCalls()
    finally:
        directory.close()
        store.close()


class ThrottleTests(trial.SynchronousTestCase):
    def test_window_and_cap(self):
        clock = Clock()
        throttle = LoginThrottle(delay=2.0, max_delay=5.0, window=60.0, clock=clock)
        self.assertEqual([throttle.failed("ip") for _ in range(4)], [2.0, 4.0, 5.0, 5.0])
        self.assertEqual(throttle.delay_for("ip"), 5.0)
        clock.advance(61)
        self.assertEqual(throttle.failures("ip"), 0)
        self.assertEqual(throttle.failed("ip"), 2.0)

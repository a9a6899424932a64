"""The lookup cache (docs/design/directory.md, "Lookup cache") through Directory.route and
Directory.sender_addresses, on a SQLite file, an inline db pool that counts the look-ups it
runs, and a fake clock."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

import pytest
from twisted.internet import defer, task

from mailsuite.config import Config, ConfigError
from mailsuite.directory import Directory, DirectoryStore
from mailsuite.directory.records import Route
from mailsuite.directory.lookupcache import LookupCache
from mailsuite.notify import ChangeHub, LocalChangeBus
from mailsuite.pools import InlinePool
from tests.unit.conftest import FAST_HASHING

ALICE, BOB = "alice@example.org", "bob@example.org"
HASH = FAST_HASHING.hash("a password")


class CountingPool:
    """The db pool: runs at once and counts the route and sender look-ups."""

    def __init__(self) -> None:
        self.lookups = 0
        self.sender_lookups = 0
        self._inline = InlinePool()

    def run(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        name = getattr(fn, "__name__", "")
        self.lookups += name == "route"
        self.sender_lookups += name == "sender_addresses"
        return self._inline.run(fn, *args)


@pytest.fixture
def env(tmp_path, prepared_directory):
    clock = task.Clock()
    config = Config()
    config.server.data_dir = str(tmp_path)
    store = DirectoryStore(prepared_directory(str(tmp_path / "mailsuite.db")))
    pool = CountingPool()
    directory = Directory(config, SimpleNamespace(db=pool, hash=InlinePool()), reactor=clock)
    directory.prepare()
    store.add_domain("example.org")
    store.add_user(ALICE, password_hash=HASH)
    yield SimpleNamespace(clock=clock, store=store, pool=pool, directory=directory,
                          config=config)
    directory.close()
    store.close()


def route(env: Any, address: str) -> Route:
    return env.directory.route(address).result


def test_an_existing_route_is_asked_once_per_ttl(env):
    assert env.config.directory.lookup_cache_ttl == 2.0  # the default
    first = route(env, ALICE)
    assert first.mailboxes == (ALICE,) and env.pool.lookups == 1
    env.clock.advance(1.9)
    assert route(env, ALICE) == first and env.pool.lookups == 1
    env.clock.advance(0.2)  # expired: asked again
    assert route(env, ALICE) == first and env.pool.lookups == 2


def test_an_unknown_address_or_domain_is_asked_every_time(env):
    assert not route(env, BOB).exists
    assert not route(env, "someone@remote.example").hosted
    assert env.pool.lookups == 2
    env.store.add_user(BOB, password_hash=HASH)  # a user just added receives mail at once
    assert route(env, BOB).mailboxes == (BOB,)
    assert not route(env, "someone@remote.example").hosted
    assert env.pool.lookups == 4


def test_a_removal_is_seen_once_the_ttl_has_passed(env):
    assert route(env, ALICE).exists
    env.store.remove_user(ALICE)
    assert route(env, ALICE).exists  # the moment the cache may miss
    env.clock.advance(2.0)
    assert not route(env, ALICE).exists


def test_a_users_sender_addresses_are_asked_once_per_ttl_and_a_removal_is_seen_after_it(env):
    env.store.add_alias("team@example.org", [ALICE])
    assert env.directory.sender_addresses(ALICE).result == {ALICE, "team@example.org"}
    env.store.remove_alias("team@example.org")
    env.clock.advance(1.9)
    assert env.directory.sender_addresses(ALICE).result == {ALICE, "team@example.org"}
    assert env.pool.sender_lookups == 1
    env.clock.advance(0.1)
    assert env.directory.sender_addresses(ALICE).result == {ALICE}
    assert env.pool.sender_lookups == 2
    env.store.add_alias("desk@example.org", [ALICE])
    assert "desk@example.org" not in env.directory.sender_addresses(ALICE).result  # remembered
    assert "desk@example.org" in env.directory.sender_addresses(ALICE, fresh=True).result
    assert "desk@example.org" in env.directory.sender_addresses(ALICE).result  # and kept
    assert env.pool.sender_lookups == 3
    for _ in range(2):  # no address at all (not a mailbox address): never kept
        assert env.directory.sender_addresses("not an address").result == frozenset()
    assert env.pool.sender_lookups == 5


def test_a_directory_change_from_any_instance_clears_the_caches(env):
    bus = LocalChangeBus()
    d = env.directory
    ChangeHub(bus, env.clock).follow_directory(d.login_cache, (d.route_cache, d.sender_cache))
    env.store.add_alias("team@example.org", [ALICE])
    assert route(env, "team@example.org").exists and route(env, ALICE).exists
    assert d.sender_addresses(ALICE).result == {ALICE, "team@example.org"}
    env.store.remove_alias("team@example.org")
    bus.publish("directory", f"passwd {ALICE}")  # any change of any account empties them
    assert d.sender_addresses(ALICE).result == {ALICE} and env.pool.sender_lookups == 2
    env.store.add_alias("team@example.org", [ALICE])
    route(env, "team@example.org")
    env.store.remove_user(ALICE)
    bus.publish("directory", f"remove {ALICE}")
    assert not route(env, ALICE).exists
    assert not route(env, "team@example.org").exists  # an alias to it went too
    assert env.pool.lookups == 5 and env.pool.sender_lookups == 2  # none from memory


def test_an_answer_asked_for_before_a_clear_is_not_kept():
    clock = task.Clock()
    cache: LookupCache[Route] = LookupCache(2.0, clock)
    era = cache.era
    cache.clear()  # the directory changed while the look-up ran
    cache.put(ALICE, Route(ALICE, True, (ALICE,)), era)
    assert cache.get(ALICE) is None and len(cache) == 0
    cache.put(ALICE, Route(ALICE, True, (ALICE,)), cache.era)
    assert cache.get(ALICE) is not None


def test_the_cache_is_bounded_and_can_be_turned_off(env):
    clock = task.Clock()
    cache: LookupCache[Route] = LookupCache(2.0, clock, max_entries=3)
    for i in range(5):
        address = f"u{i}@example.org"
        cache.put(address, Route(address, True, (address,)), cache.era)
    assert len(cache) == 3 and cache.get("u0@example.org") is None
    assert cache.get("u4@example.org") is not None
    off: LookupCache[Route] = LookupCache(0, clock)
    off.put(ALICE, Route(ALICE, True, (ALICE,)), off.era)
    assert off.get(ALICE) is None
    env.config.directory.lookup_cache_ttl = -1
    with pytest.raises(ConfigError, match="lookup_cache_ttl"):
        Directory(env.config, SimpleNamespace(db=InlinePool(), hash=InlinePool()),
                  reactor=clock)

"""The inbound-trust state on a real PostgreSQL server: the unit layer's store tests again (each
on a fresh schema), then races between two DirectoryStores on one database, each in its own
threads, as two mailsuite instances would race: counters never pass their limit and two
instances meeting one new greylist triplet both answer (no unique-constraint error).

PostgreSQL comes from $MAILSUITE_TEST_PG, else 127.0.0.1:5432 as postgres or root; without one
these tests skip with the reason (and fail under CI: tests/environment.py).
"""
from __future__ import annotations

import threading

import pytest

from mailsuite.directory import DirectoryStore
from tests.environment import PgSchema, require_postgresql
from tests.unit.test_trust_store import (  # noqa: F401 (collected here on PostgreSQL)
    DELAY, TTL, WINDOW, store, test_greylist_forgets_a_triplet_not_retried_within_the_window,
    test_greylist_new_early_retry_then_pass_and_the_network_is_whitelisted,
    test_greylist_triplet_is_case_insensitive,
    test_greylist_whitelist_expires_after_pass_ttl_and_purge,
    test_greylist_whitelist_is_extended_while_the_network_keeps_sending,
    test_overlong_values_are_cut_to_the_columns,
    test_rate_cost_counts_several_at_once_and_never_passes_the_limit,
    test_rate_counters_reset_and_purge,
    test_rate_limit_exactly_reached_then_refused_until_the_window_rolls_over,
    test_schema_2_is_migrated, test_two_stores_on_one_database_share_the_state)


@pytest.fixture(autouse=True)
def postgresql():
    return require_postgresql()


@pytest.fixture
def db_url():
    pg = PgSchema()
    try:
        yield pg.url
    finally:
        pg.drop()


@pytest.fixture
def two_stores(db_url):
    stores = [DirectoryStore(db_url), DirectoryStore(db_url)]
    stores[0].prepare()
    stores[1].prepare()
    yield stores
    for s in stores:
        s.close()


def race(stores, fn, per_store: int = 4) -> list:
    """Run fn(store) in `per_store` threads for each store, started together; their results."""
    results: list = []
    errors: list = []
    barrier = threading.Barrier(len(stores) * per_store)

    def worker(s):
        try:
            barrier.wait(timeout=30)
            results.append(fn(s))
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in stores
               for _ in range(per_store)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_racing_instances_never_pass_a_rate_limit(two_stores):
    limit = 5

    def hit(s):
        return [s.rate_hit("mx-rcpt:198.51.100.1", 60, limit, 6000 + 1) for _ in range(3)]

    outcomes = [o for batch in race(two_stores, hit) for o in batch]  # 24 hits
    assert sum(o.allowed for o in outcomes) == limit
    assert sorted(o.count for o in outcomes if o.allowed) == list(range(1, limit + 1))
    assert two_stores[0].rate_counters(6001)[0].count == limit


def test_racing_instances_on_one_new_triplet_both_answer(two_stores):
    for attempt in range(5):  # several rounds: the first insert must collide at least once
        recipient = f"r{attempt}@example.org"
        outcomes = race(two_stores, lambda s: s.greylist_check(
            "203.0.113.0/24", "a@remote.example", recipient, 1000, DELAY, WINDOW, TTL))
        assert all(not o.passed for o in outcomes)
        assert sum(o.reason == "new" for o in outcomes) >= 1
        assert {o.reason for o in outcomes} <= {"new", "early"}
    assert two_stores[0].greylist_counts(1000).pending == 5


def test_racing_retries_whitelist_the_network_once(two_stores):
    two_stores[0].greylist_check("203.0.113.0/24", "a@b.example", "c@example.org", 0, DELAY,
                                 WINDOW, TTL)
    outcomes = race(two_stores, lambda s: s.greylist_check(
        "203.0.113.0/24", "a@b.example", "c@example.org", DELAY, DELAY, WINDOW, TTL))
    assert all(o.passed for o in outcomes)
    assert two_stores[1].greylist_counts(DELAY).whitelisted == 1

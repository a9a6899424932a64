"""The shared inbound-trust state in DirectoryStore (schema 3): greylist triplets, whitelisted
networks, fixed-window rate counters, their purge, and the migration of a schema-2 database.

tests/scenario/test_trust_postgresql.py runs these again on PostgreSQL (overriding `db_url`)
and adds races between two stores on one database."""
from __future__ import annotations

import pytest
from sqlalchemy import create_engine, insert, select, text

from mailsuite.directory import DirectoryStore
from mailsuite.directory.models import SCHEMA_VERSION, Base, SchemaInfo
from mailsuite.directory.records import GreylistCounts, GreylistOutcome, RateCounter, RateOutcome
from tests.unit.conftest import prepared_if_sqlite

DELAY, WINDOW, TTL = 300, 3600, 86400


@pytest.fixture
def db_url(tmp_path):
    return "sqlite:///" + str(tmp_path / "directory.db")


@pytest.fixture
def store(db_url, request):
    s = DirectoryStore(prepared_if_sqlite(request, db_url))
    s.prepare()
    yield s
    s.close()


def grey(store, now, network="203.0.113.0/24", sender="a@remote.example",
         recipient="alice@example.org"):
    return store.greylist_check(network, sender, recipient, now, DELAY, WINDOW, TTL)


# -- rate windows ---------------------------------------------------------------------------------
def test_rate_limit_exactly_reached_then_refused_until_the_window_rolls_over(store):
    start = 1_700_000_000 - 1_700_000_000 % 60
    for n in range(1, 4):
        assert store.rate_hit("mx-conn:198.51.100.7", 60, 3, start + 10) == RateOutcome(True, n, 3)
    refused = store.rate_hit("mx-conn:198.51.100.7", 60, 3, start + 45)
    assert refused == RateOutcome(False, 3, 3, retry_after=15)
    assert store.rate_hit("mx-conn:198.51.100.7", 60, 3, start + 59).allowed is False
    # The next window starts afresh; another key was never affected.
    assert store.rate_hit("mx-conn:198.51.100.7", 60, 3, start + 60) == RateOutcome(True, 1, 3)
    assert store.rate_hit("mx-conn:198.51.100.8", 60, 3, start + 45) == RateOutcome(True, 1, 3)


def test_rate_cost_counts_several_at_once_and_never_passes_the_limit(store):
    now = 3600 * 1000
    assert store.rate_hit("sub-rcpt:alice@example.org", 3600, 10, now, cost=7).count == 7
    assert store.rate_hit("sub-rcpt:alice@example.org", 3600, 10, now, cost=4) == \
        RateOutcome(False, 7, 10, retry_after=3600)
    assert store.rate_hit("sub-rcpt:alice@example.org", 3600, 10, now, cost=3) == \
        RateOutcome(True, 10, 10)
    assert store.rate_hit("sub-rcpt:bob@example.org", 3600, 10, now, cost=11).allowed is False
    assert [c.key for c in store.rate_counters(now)] == ["sub-rcpt:alice@example.org"]


def test_rate_counters_reset_and_purge(store):
    now = 60 * 1000 + 5
    store.rate_hit("mx-conn:198.51.100.7", 60, 5, now)
    store.rate_hit("mx-rcpt:198.51.100.7", 60, 5, now, cost=2)
    store.rate_hit("sub-msg:alice@example.org", 3600, 5, now)
    counters = store.rate_counters(now)
    assert counters[0] == RateCounter("mx-conn:198.51.100.7", now - 5, now + 55, 1)
    assert [(c.key, c.count) for c in counters] == [
        ("mx-conn:198.51.100.7", 1), ("mx-rcpt:198.51.100.7", 2),
        ("sub-msg:alice@example.org", 1)]
    assert store.rate_reset("mx-rcpt:198.51.100.7") == 1
    assert store.rate_reset("mx-rcpt:198.51.100.7") == 0
    # A minute later the MX windows have ended: not shown, and purged; the hour window stays.
    later = now + 60
    assert [c.key for c in store.rate_counters(later)] == ["sub-msg:alice@example.org"]
    assert store.purge_trust(later) == (0, 0, 1)
    assert len(store.rate_counters(now)) == 1


# -- greylist -------------------------------------------------------------------------------------
def test_greylist_new_early_retry_then_pass_and_the_network_is_whitelisted(store):
    t = 1_000_000
    assert grey(store, t) == GreylistOutcome(False, "new", DELAY)
    assert grey(store, t + 100) == GreylistOutcome(False, "early", DELAY - 100)
    assert grey(store, t + DELAY - 1) == GreylistOutcome(False, "early", 1)
    assert grey(store, t + DELAY) == GreylistOutcome(True, "retried")
    # The whole network now passes, for any sender and recipient, until pass_ttl.
    assert grey(store, t + DELAY + 1, sender="<>", recipient="bob@example.org") == \
        GreylistOutcome(True, "whitelisted")
    assert store.greylist_counts(t + DELAY) == GreylistCounts(pending=0, passed=1, whitelisted=1)
    # Another network still waits.
    assert grey(store, t + DELAY, network="192.0.2.0/24").reason == "new"


def test_greylist_triplet_is_case_insensitive(store):
    grey(store, 5000, sender="A@Remote.Example", recipient="Alice@Example.org")
    assert grey(store, 5001).reason == "early"


def test_greylist_forgets_a_triplet_not_retried_within_the_window(store):
    t = 2_000_000
    grey(store, t)
    assert grey(store, t + WINDOW) == GreylistOutcome(False, "new", DELAY)  # starts over
    assert grey(store, t + WINDOW + 10).reason == "early"
    assert grey(store, t + WINDOW + DELAY).passed


def test_greylist_whitelist_expires_after_pass_ttl_and_purge(store):
    t = 3_000_000
    grey(store, t)
    grey(store, t + DELAY)  # passes, network whitelisted until t + DELAY + TTL
    grey(store, t + 10, network="192.0.2.0/24")  # pending, forgotten at t + 10 + WINDOW
    assert store.greylist_counts(t + DELAY) == GreylistCounts(1, 1, 1)
    assert store.purge_trust(t + 10 + WINDOW) == (1, 0, 0)
    assert store.greylist_counts(t + 10 + WINDOW) == GreylistCounts(0, 1, 1)
    end = t + DELAY + TTL
    assert store.purge_trust(end) == (1, 1, 0)
    assert store.greylist_counts(end) == GreylistCounts(0, 0, 0)
    assert grey(store, end).reason == "new"


def test_greylist_whitelist_is_extended_while_the_network_keeps_sending(store):
    t = 4_000_000
    grey(store, t)
    grey(store, t + DELAY)
    # More than half of pass_ttl later the network is still whitelisted, and extended.
    assert grey(store, t + DELAY + TTL - 10, sender="x@y.example").reason == "whitelisted"
    assert grey(store, t + DELAY + TTL + 100, sender="z@y.example").reason == "whitelisted"


def test_overlong_values_are_cut_to_the_columns(store):
    outcome = store.greylist_check("x" * 500, "s" * 1000 + "@example.org", "r" * 1000, 10,
                                   DELAY, WINDOW, TTL)
    assert outcome.reason == "new"
    assert store.rate_hit("k" * 1000, 60, 1, 10).allowed


def test_two_stores_on_one_database_share_the_state(db_url, store):
    """What every instance of a cluster sees: one counter, one greylist."""
    other = DirectoryStore(db_url)
    try:
        other.prepare()
        assert store.rate_hit("mx-conn:198.51.100.9", 60, 2, 600).allowed
        assert other.rate_hit("mx-conn:198.51.100.9", 60, 2, 601) == RateOutcome(True, 2, 2)
        assert not store.rate_hit("mx-conn:198.51.100.9", 60, 2, 602).allowed
        assert grey(store, 10_000).reason == "new"
        assert grey(other, 10_000 + DELAY).reason == "retried"
        assert grey(store, 10_001 + DELAY, recipient="bob@example.org").reason == "whitelisted"
    finally:
        other.close()


# -- migration ------------------------------------------------------------------------------------
def test_schema_2_is_migrated(db_url):
    """A database of the previous version (no trust tables, version 2) is upgraded by
    prepare(), its data kept, and the new tables work."""
    engine = create_engine(db_url)
    tables = [t for name, t in Base.metadata.tables.items()
              if name in ("ms_schema", "ms_domain", "ms_user", "ms_alias", "ms_sender")]
    Base.metadata.create_all(engine, tables=tables)
    with engine.begin() as conn:
        conn.execute(insert(SchemaInfo).values(id=1, version=2))
        conn.execute(text("INSERT INTO ms_domain (name, created) VALUES "
                          "('example.org', CURRENT_TIMESTAMP)"))
    engine.dispose()
    old = DirectoryStore(db_url)
    try:
        old.prepare()
        with old._unit() as s:
            assert s.scalar(select(SchemaInfo.version)) == SCHEMA_VERSION == 5
        assert [d.name for d in old.list_domains()] == ["example.org"]
        assert old.rate_hit("mx-conn:198.51.100.7", 60, 1, 60).allowed
        assert grey(old, 100).reason == "new"
        old.prepare()  # idempotent at the new version
    finally:
        old.close()

"""The directory on a real PostgreSQL server: the unit layer's store and Directory tests again,
each on a fresh schema, with real thread pools; a database that does not answer is in
test_directory_startup.py.

PostgreSQL comes from $MAILSUITE_TEST_PG, else 127.0.0.1:5432 as postgres or root; without one
these tests skip with the reason (and fail under CI: tests/environment.py).
"""
from __future__ import annotations

from typing import Any

import pytest
from twisted.trial import unittest as trial

from mailsuite.pools import Pools
from tests.environment import PgSchema, require_postgresql
from tests.unit.test_directory_async import DirectoryCases
from tests.unit.test_directory_senders import (  # noqa: F401 (extra senders, migration)
    test_extra_senders_add_list_remove, test_schema_1_is_migrated)
from tests.unit.test_directory_store import (  # noqa: F401 (collected here on PostgreSQL)
    store, test_alias_add_list_remove, test_catch_all_only_when_nothing_else_matches,
    test_changes_are_seen_by_another_store_at_once, test_disabled_users_still_receive_mail,
    test_domain_add_list_remove, test_invalid_addresses, test_invalid_domain_names,
    test_lookup_failure_is_unavailable_and_the_next_one_works,
    test_lookups_run_on_the_driver_connection,
    test_postmaster_always_exists, test_postmaster_without_admin_address,
    test_prepare_is_idempotent_and_data_survives, test_remove_domain_with_users_needs_force,
    test_route_cycles_terminate, test_route_depth_is_bounded,
    test_route_nested_multi_target_and_remote, test_route_not_hosted,
    test_route_tagged_address_that_is_itself_an_alias, test_route_users_case_and_tags,
    test_route_wide_diamond_is_fast, test_sender_addresses, test_set_password_replaces_hash,
    test_user_remove_enable_disable_list, test_users_are_case_insensitive_and_unique)


@pytest.fixture(autouse=True)
def postgresql():
    """Every test here needs the server: skip (or fail under CI) before any setUp runs."""
    return require_postgresql()


@pytest.fixture
def db_url():
    """Overrides the unit module's SQLite file: a fresh PostgreSQL schema per test."""
    pg = PgSchema()
    try:
        yield pg.url
    finally:
        pg.drop()


class PostgreSQLDirectoryTests(DirectoryCases, trial.TestCase):
    def make_url(self) -> str:
        self.pg = PgSchema()
        self.addCleanup(self.pg.drop)
        return self.pg.url

    def make_pools(self) -> Any:
        pools = Pools(db_threads=4)
        pools.startService()
        return pools

    def stop_pools(self) -> None:
        self.pools.stopService()

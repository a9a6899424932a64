"""Message events and statistics on a real PostgreSQL server: the unit layer's EventStore,
recorder and trace tests again, each on a fresh schema (the upsert is the dialect's own
INSERT ... ON CONFLICT, so both backends are tried)."""
from __future__ import annotations

from tests.scenario.test_directory_postgresql import (  # noqa: F401 (a fresh schema per test)
    db_url, postgresql)
from tests.unit.test_events import (  # noqa: F401 (collected here on PostgreSQL)
    clock, directory, recorders, store, test_a_full_batch_is_written_at_once,
    test_events_wait_for_the_interval_then_go_in_one_batch,
    test_purge_removes_what_is_past_its_retention,
    test_remote_attempts_keep_the_relay_the_answer_and_the_remote_queue_id,
    test_series_has_every_bucket_and_sums_labels,
    test_statistics_count_received_delivered_and_refused,
    test_two_instances_add_to_the_same_buckets)
from tests.unit.test_trace_cmd import (  # noqa: F401
    env, test_since_limits_the_messages_and_groups_are_separate,
    test_trace_by_address_shows_the_whole_life_in_time_order,
    test_trace_by_message_id_and_by_queue_id_find_the_same)


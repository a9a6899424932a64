"""EventRecorder and EventStore: the mail log's events become ms_event rows and ms_stat counts,
written in batches (task.Clock, inline pool, a real SQLite file), bounded while the database
is down, purged after their retention; the statistics API for plots."""
from __future__ import annotations

import pytest
from sqlalchemy import func, select
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from mailsuite import maillog
from mailsuite.config import ConfigError, EventsSection
from mailsuite.directory import DirectoryStore
from mailsuite.directory.models import EventRow, StatBucket
from mailsuite.directory.records import DirectoryUnavailable
from mailsuite.events import EventRecorder, EventStore
from mailsuite.events.store import bucket_of
from mailsuite.pools import InlinePool
from mailsuite.queue.spool import DeliveryResult, QueueEntry, Recipient
from tests.unit.conftest import prepared_if_sqlite
from tests.unit.limitskit import LogLines

START = 1_764_496_800  # the start of an hour (and of a minute)


@pytest.fixture
def clock():
    c = task.Clock()
    c.advance(START)
    return c


@pytest.fixture
def db_url(tmp_path):
    """A SQLite file; tests/scenario/test_events_postgresql.py runs these on PostgreSQL."""
    return "sqlite:///" + str(tmp_path / "directory.db")


@pytest.fixture
def directory(db_url, request):
    store = DirectoryStore(prepared_if_sqlite(request, db_url))
    store.prepare()
    yield store
    store.close()


class CountingStore(EventStore):
    """An EventStore that counts its writes and can be made to fail like a database that is
    down (`down = True`)."""

    def __init__(self, directory: DirectoryStore):
        super().__init__(directory)
        self.writes: list[int] = []  # events in each write that went through
        self.down = False

    def write(self, events, stats):
        if self.down:
            raise DirectoryUnavailable("database sqlite:///x: unable to open database file")
        super().write(events, stats)
        self.writes.append(len(events))


@pytest.fixture
def store(directory):
    return CountingStore(directory)


@pytest.fixture
def recorders():
    started: list[EventRecorder] = []
    yield started
    for recorder in started:
        if recorder.running:
            recorder.stopService()


def recorder_for(store, clock, recorders, **settings) -> EventRecorder:
    recorder = EventRecorder(store, InlinePool(), clock, EventsSection(**settings),
                             globalLogPublisher)
    recorder.startService()
    recorders.append(recorder)
    return recorder


def entry(queue_id: str = "0123456789abcdef", created: float = START, **meta) -> QueueEntry:
    rcpts = [Recipient("bob@example.org", "Bob+news@example.org", True),
             Recipient("carol@far.example", "carol@far.example", False)]
    return QueueEntry(queue_id, "alice@example.org", rcpts, created,
                      meta={"client_ip": "192.0.2.7", "listener": "mx", "tls": "TLSv1.3 X",
                            "message_id": "<m1@example.org>", **meta})


def rows(directory, **where) -> list[tuple]:
    with directory.unit() as s:
        query = select(EventRow.kind, EventRow.address).order_by(EventRow.id)
        for key, value in where.items():
            query = query.where(getattr(EventRow, key) == value)
        return [tuple(r) for r in s.execute(query).all()]


def count(directory, model) -> int:
    with directory.unit() as s:
        return s.scalar(select(func.count()).select_from(model))


# -- recording ----------------------------------------------------------------------------------
def test_events_wait_for_the_interval_then_go_in_one_batch(store, directory, clock, recorders):
    recorder_for(store, clock, recorders, flush_interval=1.0)
    e = entry()
    maillog.received(e, 1234)
    e.recipients[0].attempts = 1
    maillog.attempt(e, e.recipients[0], "sent", DeliveryResult(
        "bob@example.org", "sent", "250 2.0.0 delivered to maildir as 1.M2Q.x",
        path="/m/bob/new/1.M2Q.x"), START + 0.2, "local")
    clock.advance(0.99)
    assert store.writes == [] and rows(directory) == []  # nothing yet: no SQL per event
    clock.advance(0.01)
    assert store.writes == [4]  # received, 2 x queued, sent: one INSERT batch
    assert rows(directory) == [("received", "alice@example.org"),
                               ("queued", "bob+news@example.org"),
                               ("queued", "carol@far.example"), ("sent", "bob@example.org")]
    [received] = store.events(["0123456789abcdef"])[:1]
    assert received.message_id == "<m1@example.org>"
    assert received.fields["client_ip"] == "192.0.2.7" and received.fields["tls"] == "TLSv1.3 X"
    sent = store.events(["0123456789abcdef"])[-1]
    assert sent.fields["maildir"] == "/m/bob/new/1.M2Q.x" and sent.fields["delay"] == 0.2


def test_a_full_batch_is_written_at_once(store, directory, clock, recorders):
    recorder_for(store, clock, recorders, flush_interval=30.0, batch_size=3)
    maillog.received(entry(), 10)  # 3 rows: a full batch
    clock.advance(0)
    assert store.writes == [3]
    maillog.removed("0123456789abcdef")
    clock.advance(0)
    assert store.writes == [3]  # one event waits for the interval
    clock.advance(30)
    assert store.writes == [3, 1]


def test_remote_attempts_keep_the_relay_the_answer_and_the_remote_queue_id(
        store, clock, recorders):
    recorder = recorder_for(store, clock, recorders)
    e = entry()
    carol = e.recipients[1]
    carol.attempts = 1
    maillog.transaction(e.id, "far.example", "mx.far.example[192.0.2.9]:25", True,
                        "TLSv1.3 TLS_AES_128_GCM_SHA256", False, 1, 1)
    maillog.attempt(e, carol, "deferred", DeliveryResult(
        carol.address, "deferred", "451 4.2.0 greylisted", remote_mta="mx.far.example",
        enhanced="4.2.0"), START + 1, "mx.far.example")
    carol.attempts = 2
    maillog.attempt(e, carol, "sent", DeliveryResult(
        carol.address, "sent", "250 2.0.0 Ok: queued as 4F2a9b", remote_mta="mx.far.example"),
        START + 300, "mx.far.example")
    recorder.flush()
    transaction, deferred, sent = store.events([e.id])
    assert transaction.kind == "transaction" and transaction.fields["tls"] is True
    assert transaction.fields["relay"] == "mx.far.example[192.0.2.9]:25"
    assert (deferred.kind, deferred.fields["detail"], deferred.fields["attempts"]) == (
        "deferred", "451 4.2.0 greylisted", 1)
    assert sent.fields["remote_id"] == "4F2a9b" and "maildir" not in sent.fields


def test_the_database_down_keeps_the_newest_events_in_bounded_memory(store, directory, clock,
                                                                      recorders):
    recorder = recorder_for(store, clock, recorders, max_pending=5, batch_size=100)
    store.down = True
    with LogLines() as logs:
        for n in range(4):  # 3 rows each
            maillog.received(entry(queue_id=f"00000000000{n}"), 10)
        clock.advance(1)
        clock.advance(2)
    assert store.writes == []
    warned = logs.matching("events: cannot write to the database")
    assert len(warned) == 1, logs.lines  # one line, not one per try
    assert "7 oldest dropped" in warned[0]
    store.down = False
    with LogLines() as logs:
        clock.advance(60)
    assert store.writes == [5]
    assert logs.matching("7 events dropped")
    # The oldest went: what is left is the last message and the end of the one before.
    assert {q for q, in _queue_ids(directory)} == {"000000000002", "000000000003"}
    assert not recorder._pending


def _queue_ids(directory):
    with directory.unit() as s:
        return s.execute(select(EventRow.queue_id)).all()


def test_stop_writes_what_is_left(store, directory, clock, recorders):
    recorder = recorder_for(store, clock, recorders, flush_interval=60.0, batch_size=2)
    maillog.received(entry(), 10)  # 3 rows: one full batch now, one row left
    clock.advance(0)
    maillog.removed("0123456789abcdef")
    result = []
    defer.maybeDeferred(recorder.stopService).addBoth(result.append)
    assert store.writes == [2, 2]
    assert count(directory, EventRow) == 4
    maillog.removed("0123456789abcdef")  # no longer listening
    assert count(directory, EventRow) == 4 and not clock.getDelayedCalls()


def test_other_log_events_are_ignored(store, directory, clock, recorders):
    from twisted.logger import Logger

    recorder_for(store, clock, recorders)
    Logger(namespace="mailsuite.smtp").info("{text}", text="x", maillog_event="received")
    maillog.leftover(".0123456789abcdef.tmp")  # a mail log line without facts
    clock.advance(5)
    assert store.writes == [] and count(directory, EventRow) == 0


# -- statistics ---------------------------------------------------------------------------------
def test_statistics_count_received_delivered_and_refused(store, clock, recorders):
    recorder = recorder_for(store, clock, recorders)
    e = entry()
    maillog.received(e, 1000)
    maillog.received(entry(queue_id="00000000000a", listener="submission"), 500)
    maillog.attempt(e, e.recipients[0], "sent", DeliveryResult("bob@example.org", "sent", "250"),
                    START, "local")
    maillog.attempt(e, e.recipients[1], "deferred",
                    DeliveryResult("carol@far.example", "deferred", "451"), START, "mx")
    recorder.refused("mx", "unknown_user")
    recorder.refused("mx", "unknown_user")
    recorder.refused("submission", "auth_failed")
    recorder.flush()
    until = START + 60
    assert store.totals("received", "minute", START, until) == {"mx": 1, "submission": 1}
    assert store.totals("received_bytes", "hour", START, until) == {"mx": 1000,
                                                                    "submission": 500}
    assert store.totals("delivered", "hour", START, until) == {"deferred/remote": 1,
                                                               "sent/local": 1}
    assert store.totals("rejected", "minute", START, until) == {"unknown_user": 2,
                                                                "auth_failed": 1}


def test_two_instances_add_to_the_same_buckets(directory, clock):
    """Two processes on one database (two stores, two engines): an upsert, not a race."""
    other = DirectoryStore(directory.url)
    try:
        key = ("minute", START, "received", "mx")
        EventStore(directory).write([], {key: 2})
        EventStore(other).write([], {key: 3, ("hour", START, "received", "mx"): 3})
        EventStore(directory).write([], {key: 1})
    finally:
        other.close()
    store = EventStore(directory)
    assert store.series("received", "minute", START, START + 60) == [(START, 6)]
    assert store.series("received", "hour", START, START + 3600) == [(START, 3)]
    assert count(directory, StatBucket) == 2


def test_series_has_every_bucket_and_sums_labels(directory):
    store = EventStore(directory)
    store.write([], {("minute", START + 60, "delivered", "sent/local"): 2,
                     ("minute", START + 60, "delivered", "sent/remote"): 5,
                     ("minute", START + 180, "delivered", "sent/local"): 1,
                     ("minute", START + 240, "delivered", "sent/local"): 9})  # past `until`
    assert store.series("delivered", "minute", START + 30, START + 240) == [
        (START, 0), (START + 60, 7), (START + 120, 0), (START + 180, 1)]
    assert store.series("delivered", "minute", START, START + 181, label="sent/remote") == [
        (START, 0), (START + 60, 5), (START + 120, 0), (START + 180, 0)]
    assert store.series("received", "hour", START, START + 3600) == [(START, 0)]
    with pytest.raises(ValueError):
        store.series("delivered", "day", START, START + 60)


def test_minute_buckets_off_keeps_only_hours(store, directory, clock, recorders):
    recorder = recorder_for(store, clock, recorders, stats_minutes_days=0)
    recorder.refused("mx", "relay_denied")
    recorder.flush()
    with directory.unit() as s:
        assert s.execute(select(StatBucket.resolution, StatBucket.bucket)).all() == [
            ("hour", bucket_of(START, "hour"))]


# -- retention ----------------------------------------------------------------------------------
def test_purge_removes_what_is_past_its_retention(store, directory, clock, recorders):
    day = 86400
    old = {"queue_id": "00000000000f", "kind": "removed", "message_id": None, "address": None,
           "fields": {}}
    store.write([dict(old, time=START - 31 * day), dict(old, time=START - 29 * day)],
                {("minute", START - 3 * day, "received", "mx"): 1,
                 ("minute", START - day, "received", "mx"): 1,
                 ("hour", START - 401 * day, "received", "mx"): 1,
                 ("hour", START - 399 * day, "received", "mx"): 1})
    recorder = recorder_for(store, clock, recorders)  # purges at start, then every hour
    assert count(directory, EventRow) == 1 and count(directory, StatBucket) == 2
    store.write([dict(old, time=START - 29.5 * day)], {})
    clock.advance(3599)
    assert count(directory, EventRow) == 2  # not yet
    clock.advance(day / 2 - 3599 + 3600)  # the hourly purges go on; that row has aged out
    assert count(directory, EventRow) == 1
    assert recorder.running


def test_retention_zero_records_no_events_but_the_statistics(store, directory, clock,
                                                             recorders):
    recorder = recorder_for(store, clock, recorders, retention_days=0)
    maillog.received(entry(), 10)
    recorder.flush()
    assert count(directory, EventRow) == 0
    assert store.totals("received", "hour", START, START + 60) == {"mx": 1}


def test_bad_settings_stop_start_up_in_one_line(store, clock):
    for settings, text in [({"retention_days": -1}, "retention_days"),
                           ({"flush_interval": 0}, "flush_interval"),
                           ({"max_pending": 0}, "max_pending")]:
        with pytest.raises(ConfigError, match=text):
            EventRecorder(store, InlinePool(), clock, EventsSection(**settings),
                          globalLogPublisher)

"""RateLimits: the [ratelimit] limits on a real Directory (SQLite, inline pools, task.Clock)."""
from __future__ import annotations

import pytest
from twisted.internet import task

from mailsuite.config import ConfigError, RateLimitSection
from mailsuite.smtp.replies import Reply
from mailsuite.trust.ratelimit import PURGE_INTERVAL, RateLimits, client_key, limit_for
from tests.unit.limitskit import DownDirectory, LogLines, Spy, make_directory, result_of


@pytest.fixture
def clock():
    c = task.Clock()
    c.advance(1_700_000_000 - 1_700_000_000 % 3600)  # the start of an hour (and a minute)
    return c


@pytest.fixture
def directory(tmp_path, clock, prepared_directory):
    d = make_directory(tmp_path, clock, prepared_directory(str(tmp_path / "directory.db")))
    yield d
    d.close()


def limits(directory, clock, **settings) -> RateLimits:
    config = RateLimitSection(**settings)
    return RateLimits(directory, config, clock)


def test_mx_connections_limit_exactly_reached_then_421_until_the_next_minute(directory, clock):
    r = limits(directory, clock, mx_connections_per_minute=3)
    with LogLines() as logs:
        assert [result_of(r.connection("198.51.100.7")) for _ in range(3)] == [None] * 3
        clock.advance(30)
        refused = result_of(r.connection("198.51.100.7"))
    assert refused == Reply(421, "4.7.0", "too many connections from 198.51.100.7, try again "
                                          "later")
    assert len(logs.matching("rate limit: refused mx-conn:198.51.100.7: 3/3")) == 1
    assert result_of(r.connection("198.51.100.8")) is None  # per client address
    clock.advance(30)  # the next window
    assert result_of(r.connection("198.51.100.7")) is None


def test_mx_recipients_450(directory, clock):
    r = limits(directory, clock, mx_recipients_per_minute=2)
    assert result_of(r.recipient("198.51.100.7")) is None
    assert result_of(r.recipient("198.51.100.7")) is None
    assert result_of(r.recipient("198.51.100.7")) == Reply(
        450, "4.7.1", "too many recipients from 198.51.100.7, try again later")


def test_submission_limits_per_user_per_hour(directory, clock):
    r = limits(directory, clock, submission_messages_per_hour=1,
               submission_recipients_per_hour=2)
    assert result_of(r.submission_message("Alice@Example.org")) is None
    reply = result_of(r.submission_message("alice@example.org"))
    assert (reply.code, reply.enhanced) == (450, "4.7.1") and "alice@example.org" in reply.text
    assert result_of(r.submission_message("bob@example.org")) is None
    assert result_of(r.submission_recipient("alice@example.org")) is None
    assert result_of(r.submission_recipient("alice@example.org")) is None
    assert result_of(r.submission_recipient("alice@example.org")).code == 450
    clock.advance(3599)
    assert result_of(r.submission_message("alice@example.org")).code == 450
    clock.advance(1)
    assert result_of(r.submission_message("alice@example.org")) is None


def test_exempt_networks_are_never_counted(directory, clock):
    r = limits(directory, clock, mx_connections_per_minute=1, mx_recipients_per_minute=1,
               exempt_networks=["127.0.0.0/8", "::1/128", "192.0.2.0/24"])
    for ip in ("127.0.0.1", "::1", "192.0.2.55", "::ffff:192.0.2.55"):
        for _ in range(3):
            assert result_of(r.connection(ip)) is None
            assert result_of(r.recipient(ip)) is None
    assert result_of(directory.rate_counters(clock.seconds())) == []


def test_zero_is_off_and_runs_no_sql(directory, clock):
    spy = Spy(directory)
    r = RateLimits(spy, RateLimitSection(0, 0, 0, 0), clock)
    for _ in range(5):
        assert result_of(r.connection("198.51.100.7")) is None
        assert result_of(r.recipient("198.51.100.7")) is None
        assert result_of(r.submission_message("alice@example.org")) is None
        assert result_of(r.submission_recipient("alice@example.org")) is None
    assert spy.calls == []


def test_ipv6_clients_count_per_64_and_mapped_ipv4_as_ipv4(directory, clock):
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9") == \
        "2001:db8:1:2::/64"
    assert client_key("::ffff:198.51.100.7") == "198.51.100.7"
    r = limits(directory, clock, mx_connections_per_minute=1)
    assert result_of(r.connection("2001:db8:1:2::1")) is None
    assert result_of(r.connection("2001:db8:1:2::2")).code == 421
    assert result_of(r.connection("2001:db8:1:3::1")) is None


def test_database_down_fails_open_with_one_log_line_a_minute(clock):
    down = DownDirectory()
    r = RateLimits(down, RateLimitSection(), clock)
    with LogLines() as logs:
        for _ in range(5):
            assert result_of(r.connection("198.51.100.7")) is None
            assert result_of(r.submission_recipient("alice@example.org")) is None
        clock.advance(61)
        assert result_of(r.recipient("198.51.100.7")) is None
    lines = logs.matching("rate limit: directory unavailable")
    assert len(lines) == 2 and "let through unchecked" in lines[0]
    assert "(9 more since)" in lines[1]


def test_purge_runs_at_most_once_a_minute(directory, clock):
    spy = Spy(directory)
    r = RateLimits(spy, RateLimitSection(), clock)
    for _ in range(10):
        result_of(r.connection("198.51.100.7"))
    assert spy.calls.count("purge_trust") == 1
    clock.advance(PURGE_INTERVAL)
    result_of(r.recipient("198.51.100.7"))
    assert spy.calls.count("purge_trust") == 2


def test_bad_settings_stop_start_up(directory, clock):
    with pytest.raises(ConfigError, match=r"\[ratelimit\] exempt_networks: 'not-a-net'"):
        limits(directory, clock, exempt_networks=["not-a-net"])
    with pytest.raises(ConfigError, match="mx_connections_per_minute"):
        limits(directory, clock, mx_connections_per_minute=-1)


def test_limit_for_a_key():
    config = RateLimitSection(mx_connections_per_minute=7)
    assert limit_for(config, "mx-conn:198.51.100.7") == (7, 60)
    assert limit_for(config, "sub-msg:alice@example.org") == (200, 3600)
    assert limit_for(config, "other:x") is None

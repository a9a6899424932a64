"""Greylist: [greylist] on a real Directory (SQLite, inline pools, task.Clock)."""
from __future__ import annotations

import pytest
from twisted.internet import task

from mailsuite.config import ConfigError, GreylistSection
from mailsuite.smtp.replies import Reply
from mailsuite.trust.greylist import Greylist
from tests.unit.limitskit import DownDirectory, LogLines, Spy, make_directory, result_of

IP = "81.2.69.142"


@pytest.fixture
def clock():
    c = task.Clock()
    c.advance(1_700_000_000)
    return c


@pytest.fixture
def directory(tmp_path, clock, prepared_directory):
    d = make_directory(tmp_path, clock, prepared_directory(str(tmp_path / "directory.db")))
    yield d
    d.close()


def greylist(directory, clock, exempt=("127.0.0.0/8", "::1/128"), **settings) -> Greylist:
    config = GreylistSection(enabled=True, delay=300, retry_window=3600, pass_ttl=86400)
    for name, value in settings.items():
        setattr(config, name, value)
    return Greylist(directory, config, clock, exempt_networks=exempt)


def test_new_triplet_451_early_retry_451_then_pass_and_network_whitelisted(directory, clock):
    g = greylist(directory, clock)
    with LogLines() as logs:
        assert result_of(g.check(IP, "a@remote.example", "alice@example.org")) == Reply(
            451, "4.7.1", "greylisted, try again in 300 seconds")
        clock.advance(120)
        assert result_of(g.check(IP, "a@remote.example", "alice@example.org")) == Reply(
            451, "4.7.1", "greylisted, try again in 180 seconds")
        clock.advance(180)
        assert result_of(g.check(IP, "a@remote.example", "alice@example.org")) is None
    assert len(logs.matching("greylist: deferred 81.2.69.142 <a@remote.example> -> "
                             "<alice@example.org> (new, retry in 300 s)")) == 1
    assert len(logs.matching("(early, retry in 180 s)")) == 1
    assert len(logs.matching("81.2.69.0/24 passes for 86400 s")) == 1
    # Another address of the same /24, another sender, the null sender: all pass now.
    assert result_of(g.check("81.2.69.7", "", "bob@example.org")) is None
    # Another network is greylisted.
    assert result_of(g.check("81.2.70.1", "a@remote.example", "alice@example.org")).code == 451


def test_triplet_expires_after_the_retry_window(directory, clock):
    g = greylist(directory, clock)
    assert result_of(g.check(IP, "a@remote.example", "alice@example.org")).code == 451
    clock.advance(3600)  # not retried in time: forgotten, starts over
    assert result_of(g.check(IP, "a@remote.example", "alice@example.org")).text == \
        "greylisted, try again in 300 seconds"


def test_whitelisted_network_expires_after_pass_ttl(directory, clock):
    g = greylist(directory, clock)
    g.check(IP, "a@remote.example", "alice@example.org")
    clock.advance(300)
    assert result_of(g.check(IP, "a@remote.example", "alice@example.org")) is None
    clock.advance(86400)
    assert result_of(g.check(IP, "new@remote.example", "alice@example.org")).code == 451


def test_ipv6_clients_are_greylisted_per_64(directory, clock):
    g = greylist(directory, clock)
    assert result_of(g.check("2a00:1450:4001:81b::1", "a@b.example", "alice@example.org")) \
        .code == 451
    clock.advance(300)
    assert result_of(g.check("2a00:1450:4001:81b::2", "a@b.example", "alice@example.org")) \
        is None


def test_disabled_and_exempt_networks_run_no_sql(directory, clock):
    spy = Spy(directory)
    off = Greylist(spy, GreylistSection(enabled=False), clock)
    assert result_of(off.check(IP, "a@remote.example", "alice@example.org")) is None
    g = greylist(spy, clock, exempt=["192.0.2.0/24", "127.0.0.0/8", "::1/128"])
    for ip in ("127.0.0.1", "::1", "192.0.2.9", "::ffff:192.0.2.9"):
        assert result_of(g.check(ip, "a@remote.example", "alice@example.org")) is None
    assert spy.calls == []


def test_database_down_fails_open_with_a_log_line(clock):
    down = DownDirectory()
    g = greylist(down, clock)
    with LogLines() as logs:
        assert result_of(g.check(IP, "a@remote.example", "alice@example.org")) is None
        assert result_of(g.check(IP, "b@remote.example", "alice@example.org")) is None
    lines = logs.matching("greylist: directory unavailable")
    assert len(lines) == 1 and "81.2.69.142 <a@remote.example> -> <alice@example.org> let " \
                               "through unchecked" in lines[0]


def test_bad_settings_stop_start_up(directory, clock):
    with pytest.raises(ConfigError, match="retry_window must be longer than delay"):
        greylist(directory, clock, retry_window=100)
    with pytest.raises(ConfigError, match="delay must not be negative"):
        greylist(directory, clock, delay=-1)
    with pytest.raises(ConfigError, match="pass_ttl"):
        greylist(directory, clock, pass_ttl=0)
    with pytest.raises(ConfigError, match="exempt_networks"):
        greylist(directory, clock, exempt=["10.0.0.0/33"])


def test_loopback_is_greylisted_when_not_exempt(directory, clock):
    g = greylist(directory, clock, exempt=[])
    reply = result_of(g.check("127.0.0.1", "a@remote.example", "alice@example.org"))
    assert reply is not None and reply.code == 451

"""The courier's parts that need no network: the remote agent's TLS options (built once, at
start-up), its settings check, and the notifier that builds DSNs for the queue."""
from __future__ import annotations

import builtins
import email

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock

from mailsuite.config import Config, ConfigError
from mailsuite.courier import check_settings
from mailsuite.courier.agent import RemoteAgent
from mailsuite.courier.notifier import Notifier
from mailsuite.directory.api import Route
from mailsuite.pools import InlinePool
from mailsuite.queue.agents import BounceNotifier, DeliveryAgent, Notification
from mailsuite.queue.spool import QueueEntry, Recipient


def make_agent(config: Config) -> RemoteAgent:
    return RemoteAgent(config.courier, "mx.test.example", reactor=MemoryReactorClock(),
                       clock=task.Clock(), io=InlinePool())


def test_remote_agent_is_a_delivery_agent():
    assert isinstance(make_agent(Config()), DeliveryAgent)


def test_relay_cafile_is_read_once_at_construction(tmp_path, monkeypatch):
    import trustme

    ca = trustme.CA()
    ca_path = str(tmp_path / "ca.pem")
    ca.cert_pem.write_to_path(ca_path)
    config = Config()
    config.courier.relay = "smarthost.example:587"
    config.courier.relay_cafile = ca_path
    config.courier.require_tls_domains = ["strict.example"]
    agent = make_agent(config)
    opened: list[str] = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: (opened.append(str(path)),
                                                                  real_open(path, *a, **k))[1])
    (tmp_path / "ca.pem").unlink()  # whatever happens next cannot read it
    for _ in range(3):
        policy = agent._tls_policy("far.example", "smarthost.example", "192.0.2.1", 587)
        assert policy.mode == "required" and policy.context is not None
    assert agent._verified_context("mx.strict.example") is agent._verified_context(
        "mx.strict.example")
    assert opened == []


def test_unreadable_relay_cafile_is_a_configuration_error(tmp_path):
    config = Config()
    config.courier.relay_cafile = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match="relay_cafile"):
        make_agent(config)


def test_settings_check():
    config = Config()
    config.courier.relay_tls = "maybe"
    with pytest.raises(ConfigError, match="relay_tls"):
        check_settings(config.courier)
    config = Config()
    config.courier.relay = "no port here:x"
    with pytest.raises(ConfigError, match="host:port"):
        check_settings(config.courier)


class FakeDirectory:
    """Routes every address as one of our users, and remembers the lookups."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def route(self, address: str) -> defer.Deferred:
        self.asked.append(address)
        return defer.succeed(Route(address=address, hosted=True, mailboxes=(address,)))


def build(notifier: Notifier, kind: str, entry: QueueEntry, rcpts, path) -> Notification | None:
    out: list = []
    getattr(notifier, kind)(entry, rcpts, str(path)).addBoth(out.append)
    [value] = out
    return value


def test_notifier_builds_a_dsn_for_the_queue_to_send(tmp_path):
    path = tmp_path / "m.eml"
    path.write_bytes(b"Subject: hi\r\nMessage-ID: <1@x>\r\n\r\nbody\r\n")
    directory = FakeDirectory()
    notifier = Notifier(directory, InlinePool(), "mx.test.example", max_age=3600)
    assert isinstance(notifier, BounceNotifier)
    rcpt = Recipient("x@far.example", "x@far.example", False, state="bounced",
                     last_error="550 5.1.1 no such user", remote_mta="mx.far.example")
    entry = QueueEntry("0123456789abcdef", "alice@example.org", [rcpt], 1_800_000_000.0)
    n = build(notifier, "bounce", entry, [rcpt], path)
    assert isinstance(n, Notification)
    assert [a for a, _ in n.recipients] == ["alice@example.org"]
    assert directory.asked == ["alice@example.org"]
    assert n.meta["protocol"] == "DSN"
    dsn = email.message_from_bytes(n.data)
    assert dsn.get_content_type() == "multipart/report"
    assert b"Subject: hi" in n.data  # the original headers are quoted
    assert b"5.1.1" in n.data
    delayed = build(notifier, "delay", entry, [rcpt], path)
    assert b"Action: delayed" in delayed.data


def test_notifier_sends_nothing_for_the_null_sender(tmp_path):
    notifier = Notifier(FakeDirectory(), InlinePool(), "mx.test.example", max_age=3600)
    rcpt = Recipient("x@far.example", "x@far.example", False, state="bounced")
    entry = QueueEntry("0123456789abcdef", "", [rcpt], 0.0)
    assert build(notifier, "bounce", entry, [rcpt], tmp_path / "m.eml") is None

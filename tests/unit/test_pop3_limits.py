"""POP3 connection limits (listeners.LimitedFactory, -ERR [SYS/TEMP]) and the idle timeout,
on a task.Clock."""
from __future__ import annotations

from tests.unit.pop3kit import Pop3World


def test_idle_client_is_disconnected_after_pop3_timeout(tmp_path):
    """[limits] pop3_timeout: an idle session gets -ERR and is closed (RFC 1939 §3
    autologout timer; no UPDATE state, so nothing is removed)."""
    world = Pop3World(str(tmp_path), pop3_timeout=2)
    c = world.connect("pop3")
    assert c.line().startswith(b"+OK")
    c.command("CAPA")
    c.multiline()
    world.clock.advance(1.9)
    assert c.unread() == b"" and not c.closed()
    world.clock.advance(0.1)
    assert c.line().startswith(b"-ERR")  # the timeout notice
    assert c.closed()  # then the connection is closed


def test_connections_per_ip_are_limited(tmp_path):
    world = Pop3World(str(tmp_path), max_connections_per_ip=2)
    first, second = world.connect("pop3"), world.connect("pop3")
    assert first.line().startswith(b"+OK") and second.line().startswith(b"+OK")
    extra = world.connect("pop3")
    assert extra.line().startswith(b"-ERR [SYS/TEMP]")
    assert extra.closed()
    # Limits are per listener: the implicit-TLS port counts its own connections.
    assert world.connect("pop3s").line().startswith(b"+OK")
    first.command("QUIT")
    first.disconnect()  # QUIT gave the slot back once the connection closed
    assert world.connect("pop3").line().startswith(b"+OK")
    assert world.connect("pop3", ip="192.0.2.9").line().startswith(b"+OK")


def test_listener_total_is_limited(tmp_path):
    world = Pop3World(str(tmp_path), max_connections=1)
    assert world.connect("pop3").line().startswith(b"+OK")
    assert world.connect("pop3", ip="192.0.2.9").line().startswith(b"-ERR [SYS/TEMP]")


def test_an_evicted_session_gets_sys_temp_and_is_closed(tmp_path):
    """The listener's fairness rules drop a session through its evict() (docs/design/limits.md)."""
    world = Pop3World(str(tmp_path))
    c = world.connect("pop3")
    assert c.line().startswith(b"+OK")
    c.proto.evict("idle while others wait")
    assert c.line() == b"-ERR [SYS/TEMP] idle while others wait"
    assert c.closed()

"""POP3 input before and after login: bounded pending input, line length, SASL continuations,
commands per second and time to log in ([pop3]), and the listener hooks. docs/design/pop3.md,
"Limits"."""
from __future__ import annotations

import pytest

from mailsuite.pop3.server import MAX_COMMAND_LINE, MAX_PENDING, MAX_SASL_LINE
from tests.unit.pop3kit import PASSWORD, USERS, Pop3World, plain

ALICE = USERS[0]


@pytest.fixture
def world(tmp_path):
    return Pop3World(str(tmp_path / "mail"), latency=0.5)


def greeted(world, port="pop3s"):
    c = world.connect(port)
    assert c.line().startswith(b"+OK")
    return c


def test_reading_stops_while_pass_is_pending_and_a_flood_behind_it_is_cut_off(world):
    """200 MB pipelined behind a PASS the directory takes its time over: the transport stops
    reading (TCP holds the rest back), and a client that pushes on regardless is dropped once
    MAX_PENDING octets wait, never buffered without bound."""
    c = greeted(world)
    assert c.command(f"USER {ALICE}").startswith(b"+OK")
    c.send(f"PASS {PASSWORD}\r\n".encode())
    assert c.transport.producerState == "paused"  # stopped reading while PASS runs
    chunk = b"NOOP\r\n" * (64 * 1024 // 6)
    c.send(chunk)  # what one read of a socket could still deliver: kept
    assert not c.closed()
    sent = len(chunk)
    while not c.closed():
        c.send(chunk)
        sent += len(chunk)
        assert sent < 4 * MAX_PENDING
    assert len(c.proto._buffer) == 0
    assert c.unread().endswith(b"-ERR [SYS/TEMP] Too much input ahead of the replies, closing "
                               b"connection\r\n")


def test_pipelined_commands_behind_a_slow_pass_are_answered_in_order(world):
    c = greeted(world)
    c.send(f"USER {ALICE}\r\nPASS {PASSWORD}\r\nSTAT\r\nNOOP\r\n".encode())
    assert c.line().startswith(b"+OK")  # USER
    assert c.line().startswith(b"+OK Logged in")
    assert c.line() == b"+OK 0 0"
    assert c.line() == b"+OK"
    assert c.transport.producerState == "producing"  # reading again once idle


def test_an_over_long_command_is_refused_and_the_session_goes_on(world):
    c = greeted(world)
    c.send(b"USER " + b"a" * MAX_COMMAND_LINE + b"\r\nCAPA\r\n")
    assert c.line() == b"-ERR Line too long"
    assert c.line().startswith(b"+OK Capability")
    c.multiline()


def test_a_line_without_end_is_not_read_forever(world):
    """10 MB without a newline: skipped up to MAX_DISCARD, then -ERR and the connection closes."""
    c = greeted(world)
    for _ in range(200):
        c.send(b"x" * 4096)
        if c.closed():
            break
    assert c.closed()
    assert c.unread().endswith(b"-ERR Line too long, closing connection\r\n")


def test_an_over_long_sasl_response_ends_the_exchange_in_step(world):
    """AUTH PLAIN's continuation may be longer than a command, but bounded; over the bound the
    exchange is cancelled and the next line is a command again (replies stay in step)."""
    c = greeted(world)
    assert c.command("AUTH PLAIN") == b"+ "
    c.send(b"A" * (MAX_SASL_LINE + 10) + b"\r\nCAPA\r\n")
    assert c.line() == b"-ERR Line too long"
    assert c.line().startswith(b"+OK Capability")
    c.multiline()
    # A long but bounded response is still a response.
    assert c.command("AUTH PLAIN") == b"+ "
    assert c.command(plain(ALICE)).startswith(b"+OK Logged in")


def test_commands_per_second_before_login(tmp_path):
    world = Pop3World(str(tmp_path), pop3={"max_commands_per_second": 5})
    c = greeted(world)
    for _ in range(3):  # a normal pace is never refused
        for _ in range(4):
            c.command("CAPA")
            c.multiline()
        world.clock.advance(1)
    c.send(b"CAPA\r\n" * 8)  # a burst over the bucket
    replies = c.unread()
    assert replies.count(b"+OK Capability") == 5
    assert replies.endswith(b"-ERR [SYS/TEMP] Too many commands before login, closing "
                            b"connection\r\n")
    assert c.closed()


def test_no_command_rate_after_login(tmp_path):
    world = Pop3World(str(tmp_path), pop3={"max_commands_per_second": 5})
    c = world.login(ALICE)
    c.send(b"NOOP\r\n" * 100)
    assert c.unread() == b"+OK\r\n" * 100 and not c.closed()


def test_login_timeout(tmp_path):
    world = Pop3World(str(tmp_path), pop3={"login_timeout": 10}, pop3_timeout=600)
    c = greeted(world)
    for _ in range(9):  # busy, but not logging in
        world.clock.advance(1)
        c.command("CAPA")
        c.multiline()
    world.clock.advance(0.99)
    assert not c.closed()
    world.clock.advance(0.02)
    assert c.line() == b"-ERR [SYS/TEMP] Login took too long, closing connection"
    assert c.closed()
    # Once logged in, the login timer is gone; only the idle timeout remains.
    c = world.login(ALICE)
    world.clock.advance(9)
    assert c.command("NOOP") == b"+OK"
    world.clock.advance(30)
    assert c.command("NOOP") == b"+OK" and not c.closed()
    assert not [d for d in world.clock.getDelayedCalls() if "_login_expired" in repr(d.func)]


def test_hooks_progress_per_command_and_authenticated_once(world):
    c = greeted(world)
    calls = []
    c.proto.on_progress = lambda: calls.append("progress")
    c.proto.on_authenticated = lambda: calls.append("authenticated")
    c.command("CAPA")
    c.multiline()
    c.command(f"USER {ALICE}")
    c.command(f"PASS {PASSWORD}")
    c.command("NOOP")
    assert calls == ["progress", "progress", "authenticated", "progress", "progress"]


def test_failed_login_is_not_authenticated(world):
    c = greeted(world)
    calls = []
    c.proto.on_authenticated = lambda: calls.append("authenticated")
    c.command(f"USER {ALICE}")
    assert c.command("PASS wrong").startswith(b"-ERR [AUTH]")
    assert calls == []

"""Connection limits (listeners.LimitedFactory, 421 refusals), the idle timeout (on the clock),
and a peer that sends garbage."""
from __future__ import annotations

import random

from tests.unit.smtpkit import World


def test_idle_timeout_uses_configured_value():
    # Stock SMTPFactory ignored factory.timeout (always 600 s). Here 2 s.
    world = World(limits={"smtp_timeout": 2})
    c = world.connect("mx")
    assert c.code() == 220
    c.nothing_within(1.9)
    assert c.reply()[0].startswith(b"421 4.4.2")
    assert c.closed()


def test_waiting_for_the_directory_is_not_idleness():
    world = World(limits={"smtp_timeout": 2}, latency=3)
    c = world.connect("mx")
    c.ehlo()
    c.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.org>\r\n")
    assert c.code() == 250
    assert c.reply()[0].startswith(b"250 2.1.5")  # after 3 s of our own slowness


def test_after_a_slow_look_up_the_idle_timeout_counts_from_our_reply():
    # The idle timer runs on while we wait (SMTPServer.timeoutConnection lets it pass then).
    world = World(limits={"smtp_timeout": 2}, latency=5)
    c = world.connect("mx")
    c.ehlo()
    c.send(b"MAIL FROM:<>\r\n")
    assert c.code() == 250
    c.send(b"RCPT TO:<alice@example.org>\r\n")
    assert c.reply()[0].startswith(b"250 2.1.5")  # 5 s: the timer fired twice meanwhile
    c.nothing_within(1.9)
    assert c.reply()[0].startswith(b"421 4.4.2")
    assert c.closed()


def test_connection_limit_per_ip():
    world = World(limits={"max_connections_per_ip": 8})
    clients = [world.connect("mx") for _ in range(8)]
    for c in clients:
        assert c.code() == 220
    extra = world.connect("mx")
    assert extra.reply()[0].startswith(b"421 4.7.0 Too many connections from your address")
    assert extra.closed()
    assert world.connect("mx", ip="192.0.2.77").code() == 220  # another client may come in
    clients[0].disconnect()
    again = world.connect("mx")
    assert again.code() == 220


def test_connection_limit_per_listener():
    world = World(limits={"max_connections": 2})
    first, second = world.connect("mx", ip="192.0.2.1"), world.connect("mx", ip="192.0.2.2")
    extra = world.connect("mx", ip="192.0.2.3")
    assert extra.reply()[0].startswith(b"421 4.7.0 Too many connections, try again later")
    # Limits are per listener: submission counts its own.
    assert world.connect("submission", ip="192.0.2.3").code() == 220
    first.disconnect()
    first.disconnect()  # a second connectionLost gives back nothing more
    assert world.connect("mx", ip="192.0.2.3").code() == 220
    assert world.connect("mx", ip="192.0.2.4").reply()[0].startswith(b"421")
    second.disconnect()


def test_random_garbage_gets_proper_replies_and_no_drop():
    # Stock ESMTP dropped the connection on non-ASCII command bytes (UnicodeDecodeError).
    rng = random.Random(2011)
    world = World()
    for _ in range(5):
        c = world.connect("mx")
        assert c.code() == 220
        for _ in range(15):
            line = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60)))
            line = line.replace(b"\r\n", b"\n")
            if line.endswith(b"\r"):
                line += b"x"
            if line[:4].upper() in (b"QUIT", b"EHLO", b"HELO", b"NOOP", b"RSET", b"HELP",
                                    b"VRFY", b"STAR", b"MAIL", b"RCPT", b"DATA", b"AUTH"):
                continue
            c.send(line + b"\r\n")
            lines = c.reply()
            assert 500 <= int(lines[0][:3]) <= 504, lines
            assert all(l[:3].isdigit() and l.isascii() for l in lines)
        c.send(b"NOOP\r\n")
        assert c.code() == 250
        c.disconnect()


def test_an_unexpected_exception_is_451_and_the_session_goes_on():
    world = World()
    world.factories["mx"].policy.check_sender = lambda session, sender: 1 / 0
    c = world.connect("mx")
    c.ehlo()
    c.send(b"MAIL FROM:<x@remote.example>\r\nNOOP\r\n")
    assert c.reply()[0].startswith(b"451 4.3.0")
    assert c.code() == 250


def test_an_evicted_session_gets_421_with_our_name_and_is_closed():
    """The listener's fairness rules drop a session through its evict() (docs/design/limits.md)."""
    world = World()
    c = world.connect("mx")
    assert c.code() == 220
    c.proto.evict("idle while others wait")
    line = c.reply()[0]
    assert line.startswith(b"421 4.7.0 ") and b"idle while others wait" in line
    assert c.closed()

"""Pipelining (RFC 2920): replies in command order while the directory or the queue answers
later, bounded buffering of what is pipelined behind a pending reply.

In memory: every directory and queue answer of the fakes comes 50 ms of clock time later, like
SQL in a thread pool; stock Twisted answered pipelined RCPTs out of order when validation was
asynchronous (docs/design/smtp.md)."""
from __future__ import annotations

from tests.unit.smtpkit import World

LATENCY = 0.05


def test_pipelined_commands_with_slow_validation_are_answered_in_order():
    world = World(latency=LATENCY)
    c = world.connect("mx")
    c.ehlo()
    c.send(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\n"
           b"RCPT TO:<nobody@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
           b"RCPT TO:<someone@elsewhere.example>\r\nDATA\r\n")
    codes = c.replies(6)
    assert [int(r[0][:3]) for r in codes] == [250, 250, 550, 250, 554, 354]
    assert codes[2][0].startswith(b"550 5.1.1")
    assert codes[4][0].startswith(b"554 5.7.1")
    c.send(b"Subject: t\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    lines = c.reply()
    assert lines[0].startswith(b"250") and b"queued as Q1" in lines[0]
    assert c.code() == 221
    (entry,) = world.queue.messages
    assert [address for address, _ in entry.recipients] == ["alice@example.org",
                                                            "bob@example.org"]


def test_no_reply_before_the_pending_lookup_answers():
    world = World(latency=LATENCY)
    c = world.connect("mx")
    c.ehlo()
    c.send(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\nNOOP\r\n")
    assert c.code() == 250  # the MX takes any sender without asking the directory
    c.nothing_within(LATENCY * 0.9)  # RCPT is still being looked up: NOOP must wait behind it
    assert [c.code() for _ in range(2)] == [250, 250]


def test_large_pipelined_burst_while_a_lookup_is_pending():
    # 240 KB of pipelined commands behind a slow RCPT: reading is paused past 64 KiB and resumed
    # after the reply; every command is answered, in order, and memory stays bounded.
    # (40,000 commands at once is a flood by [smtp] max_commands_per_second: switched off here,
    # test_smtp_flood.py tests that limit.)
    world = World(latency=LATENCY, smtp={"max_commands_per_second": 0})
    c = world.connect("mx")
    c.ehlo()
    n = 40000
    burst = (b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\n" +
             b"NOOP\r\n" * n + b"RSET\r\n")
    for i in range(0, len(burst), 16384):  # as TCP delivers it
        c.send(burst[i:i + 16384])
    assert c.transport.producerState == "paused"  # the RCPT lookup is pending
    codes = [c.reply()[0][:9] for _ in range(n + 3)]
    assert codes[0] == b"250 2.1.0" and codes[1] == b"250 2.1.5"
    assert set(codes[2:]) == {b"250 2.0.0"}
    assert c.transport.producerState == "producing"


def test_pipelined_input_over_the_hard_cap_closes_the_connection():
    world = World(latency=LATENCY)
    c = world.connect("mx")
    c.ehlo()
    c.send(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\n")
    assert c.code() == 250
    noops = b"NOOP\r\n" * 10000
    for _ in range(20):  # 1.2 MB behind the pending RCPT
        c.send(noops)
    assert c.reply()[0].startswith(b"421 4.7.0")
    assert c.closed()


def test_pipelined_quit_after_data_still_gets_the_250():
    # Stock ESMTP went back to command mode before eomReceived finished: a pipelined QUIT could
    # close the connection before the 250 was written.
    world = World(latency=LATENCY)
    c = world.connect("mx")
    c.ehlo()
    c.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert [c.code() for _ in range(3)] == [250, 250, 354]
    c.send(b"x\r\n.\r\nQUIT\r\n")
    assert c.code() == 250
    assert c.code() == 221
    assert c.closed()

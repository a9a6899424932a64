"""Limits before authentication (commands per second, time to authenticate, AUTH lines, MAIL/RCPT
parameters), the listener hooks, and environment faults answered in one log line."""
from __future__ import annotations

import base64
from contextlib import contextmanager

import pytest
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from mailsuite.directory.api import DirectoryUnavailable
from tests.unit.smtpkit import World

ALICE_PLAIN = base64.b64encode(b"\0alice@example.org\0secret-pw-1")


@contextmanager
def captured_log():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def tracebacks(events) -> list[dict]:
    return [e for e in events if "log_failure" in e]


def smtp_lines(events) -> list[str]:
    return [e["log_format"] for e in events
            if e.get("log_namespace", "").startswith("mailsuite.smtp")]


# -- commands per second ---------------------------------------------------------------------
def test_command_flood_before_auth_gets_421_and_close():
    world = World(smtp={"max_commands_per_second": 10})
    c = world.connect("mx")
    c.ehlo()
    c.send(b"NOOP\r\n" * 500)
    codes = []
    while not codes or codes[-1] != b"421":
        codes.append(c.reply()[0][:3])
    assert set(codes[:-1]) == {b"250"} and len(codes) <= 100 + 1  # the burst, then 421
    assert c.last[0].startswith(b"421 4.7.0")
    assert c.closed()


def test_a_slow_steady_client_is_never_flooding():
    world = World(smtp={"max_commands_per_second": 10})
    c = world.connect("mx")
    c.ehlo()
    for _ in range(300):
        c.send(b"NOOP\r\n")
        assert c.code() == 250
        c.wait(0.1)  # 10 per second, forever
    assert not c.transport.disconnecting


def test_a_pipelined_transaction_with_every_recipient_does_not_trip_it():
    world = World(limits={"max_recipients": 100})
    c = world.connect("mx")
    c.ehlo()
    burst = (b"MAIL FROM:<x@remote.example>\r\n" + b"RCPT TO:<alice@example.org>\r\n" * 100
             + b"DATA\r\n")
    c.send(burst)
    assert [c.code() for _ in range(102)] == [250] * 101 + [354]
    c.send(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert c.code() == 250 and c.code() == 221


def test_a_bulk_sender_gets_its_commands_back_for_each_accepted_message():
    world = World(smtp={"max_commands_per_second": 5})  # a burst of 50 commands
    c = world.connect("mx")
    c.ehlo()
    one = (b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\n"
           b"RCPT TO:<bob@example.org>\r\nDATA\r\n")
    for i in range(100):  # 400 commands in no time at all
        c.send(one)
        assert [c.code() for _ in range(4)] == [250, 250, 250, 354]
        c.send(b"Subject: %d\r\n\r\nx\r\n.\r\n" % i)
        assert c.code() == 250
    assert len(world.queue.messages) == 100


def test_after_auth_commands_are_not_counted():
    world = World(smtp={"max_commands_per_second": 2})
    c = world.connect("submissions")
    c.ehlo()
    c.send(b"AUTH PLAIN " + ALICE_PLAIN + b"\r\n")
    assert c.code() == 235
    c.send(b"NOOP\r\n" * 200)
    assert c.replies(200)[-1][0].startswith(b"250")


# -- time to authenticate ---------------------------------------------------------------------
def test_submission_must_authenticate_in_time():
    world = World(smtp={"auth_timeout": 30}, limits={"smtp_timeout": 300})
    c = world.connect("submissions")
    c.ehlo()
    for _ in range(5):  # busy, but never logging in
        c.wait(5)
        c.send(b"NOOP\r\n")
        assert c.code() == 250
    c.wait(6)
    assert c.reply()[0].startswith(b"421 4.7.0")
    assert c.closed()


def test_authenticated_submission_and_mx_have_no_auth_deadline():
    world = World(smtp={"auth_timeout": 30}, limits={"smtp_timeout": 300})
    sub = world.connect("submissions")
    sub.ehlo()
    sub.send(b"AUTH PLAIN " + ALICE_PLAIN + b"\r\n")
    assert sub.code() == 235
    mx = world.connect("mx")
    mx.ehlo()
    for c in (sub, mx):
        c.wait(40)
        c.send(b"NOOP\r\n")
        assert c.code() == 250


def test_auth_deadline_waits_for_a_password_check_in_flight():
    world = World(smtp={"auth_timeout": 10}, latency=2.0, limits={"smtp_timeout": 300})
    c = world.connect("submissions")
    c.ehlo()
    c.wait(9)
    c.send(b"AUTH PLAIN " + ALICE_PLAIN + b"\r\n")
    assert c.code() == 235
    c.wait(20)
    c.send(b"NOOP\r\n")
    assert c.code() == 250


# -- AUTH exchanges and parameters ------------------------------------------------------------
def test_auth_continuation_lines_are_bounded():
    world = World()
    c = world.connect("submissions")
    c.ehlo()
    c.send(b"AUTH PLAIN\r\n")
    assert c.code() == 334
    c.send(b"A" * 5000 + b"\r\n")
    assert c.reply()[0].startswith(b"500 5.5.2")
    c.send(b"NOOP\r\n")  # the exchange was abandoned: this is a command again
    assert c.code() == 250
    c.send(b"AUTH LOGIN\r\n")
    assert c.code() == 334
    c.send(b"A" * 70000)  # no CRLF at all
    assert c.reply()[0].startswith(b"421")
    assert c.closed()
    assert len(c.proto._buffer) == 0


@pytest.mark.parametrize("params, code", [
    (b" " + b" ".join(b"X%d=1" % i for i in range(11)), b"501 5.5.4"),
    (b" SIZE=1 SIZE=2", b"501 5.5.4"),
    (b" BODY=" + b"A" * 600, b"501 5.5.4"),
    (b" FOO=bar", b"555 5.5.4"),
])
def test_mail_parameter_limits(params, code):
    world = World()
    c = world.connect("mx")
    c.ehlo()
    c.send(b"MAIL FROM:<x@remote.example>" + params + b"\r\n")
    assert c.reply()[0].startswith(code)
    c.send(b"MAIL FROM:<x@remote.example> SIZE=10 BODY=8BITMIME\r\n")
    assert c.code() == 250
    c.send(b"RCPT TO:<alice@example.org>" + params + b"\r\n")
    assert c.reply()[0][:3] in (b"501", b"555")


# -- hooks for the listener ------------------------------------------------------------------
def test_progress_and_authenticated_hooks_are_called():
    world = World()
    c = world.connect("submissions")
    calls = []
    c.proto.on_progress = lambda: calls.append("progress")
    c.proto.on_authenticated = lambda: calls.append("auth")
    c.ehlo()
    assert calls == ["progress"]
    c.send(b"AUTH PLAIN " + ALICE_PLAIN + b"\r\nNOOP\r\n")
    assert c.code() == 235 and c.code() == 250
    assert calls == ["progress", "auth", "progress", "progress"]


# -- environment faults ----------------------------------------------------------------------
def test_directory_down_during_auth_is_454_in_one_line():
    world = World()
    world.directory.unavailable = True
    c = world.connect("submissions")
    c.ehlo()
    with captured_log() as events:
        c.send(b"AUTH PLAIN " + ALICE_PLAIN + b"\r\n")
        assert c.reply()[0].startswith(b"454 4.7.0")
    assert tracebacks(events) == []
    assert len(smtp_lines(events)) == 1, smtp_lines(events)


def test_directory_down_during_rcpt_is_451_in_one_line():
    world = World()
    world.directory.unavailable = True
    c = world.connect("mx")
    c.ehlo()
    with captured_log() as events:
        c.send(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\n")
        assert c.code() == 250
        assert c.reply()[0].startswith(b"451 4.3.0")
    assert tracebacks(events) == []
    assert len(smtp_lines(events)) == 1, smtp_lines(events)


def test_directory_down_during_mail_from_on_submission_is_451_in_one_line():
    world = World()
    c = world.connect("submissions")
    c.ehlo()
    c.send(b"AUTH PLAIN " + ALICE_PLAIN + b"\r\n")
    assert c.code() == 235
    world.directory.sender_addresses = lambda user, **kw: defer.fail(DirectoryUnavailable("down"))
    with captured_log() as events:
        c.send(b"MAIL FROM:<alice@example.org>\r\n")
        assert c.reply()[0].startswith(b"451 4.3.0")
    assert tracebacks(events) == []
    assert len(smtp_lines(events)) == 1, smtp_lines(events)


@pytest.mark.parametrize("errno_, code", [(28, b"452 4.3.1"), (5, b"451 4.3.0"),
                                          (122, b"452 4.3.1")])
def test_queue_write_failure_is_temporary_in_one_line(errno_, code):
    world = World()
    world.queue.fail_with = OSError(errno_, "disk trouble")
    c = world.connect("mx")
    c.ehlo()
    c.send(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert [c.code() for _ in range(3)] == [250, 250, 354]
    with captured_log() as events:
        c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        assert c.reply()[0].startswith(code)
    assert tracebacks(events) == []
    assert len(smtp_lines(events)) == 1, smtp_lines(events)
    assert world.queue.staged() == []


# -- slowloris -------------------------------------------------------------------------------
@pytest.mark.parametrize("in_data", [False, True])
def test_a_byte_at_a_time_is_idle_and_gets_the_timeout(in_data):
    world = World(limits={"smtp_timeout": 30})
    c = world.connect("mx")
    c.ehlo()
    if in_data:
        c.send(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
        assert [c.code() for _ in range(3)] == [250, 250, 354]
    for _ in range(6):  # one byte every 5 s, never a complete line
        c.send(b"N")
        c.wait(5)
    assert c.reply()[0].startswith(b"421 4.4.2")
    assert c.closed()
    assert world.queue.staged() == []


def test_slow_but_complete_lines_keep_the_session():
    world = World(limits={"smtp_timeout": 30})
    c = world.connect("mx")
    c.ehlo()
    c.send(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert [c.code() for _ in range(3)] == [250, 250, 354]
    for i in range(10):
        c.send(b"line %d\r\n" % i)
        c.wait(20)
    c.send(b".\r\n")
    assert c.code() == 250

"""Reading while a command runs (docs/design/imap.md, "Serialized dispatch"): commands wait
in the line buffer, the transport is paused only when that buffer holds more than a line's
worth, and nothing is read into memory after hanging up."""
from __future__ import annotations

from tests.unit.imapkit import tagged, world  # noqa: F401


def test_commands_one_after_another_leave_the_transport_reading(world):
    c = world.connect()
    pauses: list[str] = []
    pause = c.transport.pauseProducing
    c.transport.pauseProducing = lambda: (pauses.append("pause"), pause())
    c.send(b"".join(b"n%d NOOP\r\n" % i for i in range(20)) + b"s SELECT INBOX\r\n")
    assert c.pending().count(b" OK NOOP") == 20
    assert tagged(c.cmd(b"f FETCH 1:* FLAGS")).startswith(b"f OK")
    assert pauses == []
    assert c.transport.producerState == "producing"


def test_the_transport_pauses_once_a_line_s_worth_is_waiting(world):
    c = world.connect()
    c.cmd(b"s SELECT INBOX")
    c.proto.gate.pauseProducing()  # the client does not read: no further command runs
    c.send(b"a NOOP\r\n")
    assert b"a OK" in c.pending()
    c.send(b"b NOOP\r\n")
    assert c.proto.paused and c.transport.producerState == "producing"
    filler = b"x" * 1000
    sent = 0
    while c.transport.producerState == "producing":
        c.send(b"c%d NOOP %s\r\n" % (sent, filler))
        sent += 1
        assert sent < 1000, "never paused"
    assert len(c.proto._buffer) <= c.proto.MAX_LENGTH + 1100
    assert b"b OK" not in c.pending()
    c.proto.gate.resumeProducing()
    c.clock.advance(0)
    out = c.pending()
    assert b"b OK" in out and out.count(b" OK NOOP") == sent + 2  # a, b, then every c
    assert c.transport.producerState == "producing"


def test_before_login_the_smaller_line_limit_bounds_the_buffer(world):
    world.config.imap.max_commands_per_second = 2
    c = world.connect(login_as=None)
    while c.transport.producerState == "producing":
        c.send(b"n NOOP\r\n" * 64)
    assert len(c.proto._buffer) <= world.config.imap.preauth_max_line + 64 * 8
    done = c.pending().count(b" OK NOOP")
    c.clock.advance(1.0)
    assert c.pending().count(b" OK NOOP") == done + 2  # the buffered commands still run, paced


def test_nothing_is_read_into_memory_after_logout(world):
    c = world.connect()
    resp = c.cmd(b"z LOGOUT")
    assert tagged(resp).startswith(b"z OK")
    c.proto.dataReceived(b"y NOOP\r\n" * 10_000)
    assert len(c.proto._buffer) == 0

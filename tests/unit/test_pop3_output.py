"""POP3 output flow control: the session is the transport's producer, so a client that does not
read gets no more message chunks and no more command replies queued, and its connection holds
bounded memory that is released on close (docs/design/pop3.md, "Limits")."""
from __future__ import annotations

import gc
import weakref

import pytest

from mailsuite.pop3.retrieval import CHUNK
from mailsuite.pop3.server import MAX_PENDING
from tests.unit.pop3kit import USERS, Pop3World, message

ALICE = USERS[0]
BUFFER = 64 * 1024  # Twisted's FileDescriptor.bufferSize
# At most one stuffed chunk (a CHUNK of bare LFs doubles) and one reply beyond the buffer.
PEAK = BUFFER + 2 * CHUNK + 4096


@pytest.fixture
def world(tmp_path):
    return Pop3World(str(tmp_path / "mail"))


def big_message(size: int) -> bytes:
    line = b".dotted line of text " + b"z" * 57 + b"\r\n"
    return message("big", line * (size // len(line)))


def test_retr_many_times_without_reading_stays_bounded_then_everything_arrives(world):
    msg = big_message(300 * 1024)
    world.put(ALICE, msg)
    c = world.login(ALICE, buffer_size=BUFFER)
    c.unread()
    c.send(b"RETR 1\r\n" * 20 + b"NOOP\r\n" * 50)
    # The client reads nothing: one chunk went out, the transport paused the session.
    t = c.transport
    assert c.proto.output_paused
    assert len(t.value()) <= PEAK
    assert t.producerState == "paused"  # and the session stopped reading the client
    world.clock.advance(5)
    assert len(t.value()) <= PEAK  # nothing more was read, stuffed or queued meanwhile
    # Now it reads: every reply arrives, in order, complete.
    for _ in range(20):
        assert c.retr_bytes_after_command() == msg
    for _ in range(50):
        assert c.line() == b"+OK"
    assert t.peak <= PEAK
    assert t.producerState == "producing"


def test_noop_flood_without_reading_queues_no_replies(world):
    world.put(ALICE, big_message(200 * 1024))
    c = world.login(ALICE, buffer_size=BUFFER)
    c.unread()
    c.send(b"RETR 1\r\n")
    assert c.proto.output_paused
    size = len(c.transport.value())
    # TCP would hold these back (reading stopped); a peer that pushes them anyway is dropped.
    sent = 0
    while not c.closed():
        c.send(b"NOOP\r\n" * 2000)
        sent += 12000
        assert sent <= 2 * MAX_PENDING
    assert len(c.transport.value()) - size < 200  # no NOOP reply was queued; the notice only
    assert c.transport.value().endswith(b"closing connection\r\n")
    assert not c.proto._buffer


def test_output_paused_between_commands_holds_replies_back(world):
    """Replies to plain commands are held back too: with the output paused no command runs."""
    c = world.login(ALICE, buffer_size=BUFFER)
    c.unread()
    c.proto.pauseProducing()
    c.send(b"NOOP\r\nSTAT\r\n")
    assert c.transport.value() == b""
    assert c.transport.producerState == "paused"
    c.proto.resumeProducing()
    assert c.line() == b"+OK" and c.line() == b"+OK 0 0"


def test_close_during_a_paused_transfer_releases_everything(world):
    world.put(ALICE, big_message(300 * 1024))
    c = world.login(ALICE, buffer_size=BUFFER)
    c.unread()
    c.send(b"RETR 1\r\nNOOP\r\n")
    proto = c.proto
    sender = proto._sender
    f = sender.f
    assert f is not None and not f.closed
    c.disconnect()
    assert f.closed  # the message file
    assert proto._sender is None and not proto._buffer
    world.clock.advance(1)
    # The maildrop lock is given back: a new session logs in.
    again = world.login(ALICE)
    again.command("QUIT")
    # Nothing keeps the session alive (no timer, deferred or factory reference).
    ref = weakref.ref(proto)
    del proto, sender, c
    gc.collect()
    assert ref() is None


def test_top_streams_through_the_same_flow_control(world):
    msg = big_message(300 * 1024)
    world.put(ALICE, msg)
    c = world.login(ALICE, buffer_size=BUFFER)
    c.unread()
    c.send(b"TOP 1 100000\r\n")
    assert c.proto.output_paused and len(c.transport.value()) <= PEAK
    assert c.line() == b"+OK"
    lines = c.multiline()
    assert len(lines) > 3000

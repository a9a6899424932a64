"""IMAP in memory: IDLE (RFC 2177) on a task.Clock: new mail is announced within one poll,
nothing is sent while nothing changes, only DONE ends IDLE, and a command pipelined after
DONE waits for IDLE to finish (docs/design/imap.md, "IDLE")."""
from __future__ import annotations

from mailsuite.imap.idle import IDLE_POLL
from tests.unit.imapkit import World, simple, tagged, world  # noqa: F401


def test_idle_sees_delivery_within_two_seconds(world):
    r = world.connect(login_as="bob@example.org")
    resp = r.cmd(b"s SELECT INBOX")
    exists = int([line for line in resp if line.endswith(b"EXISTS")][0].split()[1])
    r.send(b"i IDLE\r\n")
    assert r.line().startswith(b"+")
    world.deliver("bob@example.org", simple("idle"))
    assert IDLE_POLL < 2.0
    world.clock.advance(IDLE_POLL)
    line = r.line()
    assert line == b"* %d EXISTS" % (exists + 1), line
    r.send(b"DONE\r\n")
    assert tagged(r.response(b"i")).startswith(b"i OK")
    # Only DONE ends IDLE (Twisted accepted any line).
    r.send(b"j IDLE\r\n")
    assert r.line().startswith(b"+")
    r.send(b"k NOOP\r\n")
    assert tagged(r.response(b"j")).startswith(b"j BAD")
    assert tagged(r.cmd(b"l NOOP")).startswith(b"l OK")


def test_idle_sends_nothing_while_nothing_changes(tmp_path):
    world = World(str(tmp_path), imap_timeout=3)
    r = world.connect()
    r.cmd(b"s SELECT INBOX")
    r.send(b"i IDLE\r\n")
    assert r.line().startswith(b"+")
    for _ in range(20):
        world.clock.advance(IDLE_POLL)
    assert r.pending() == b""
    # 10 s idling with imap_timeout = 3: IDLE raises the timeout to at least 30 minutes.
    assert not r.disconnected
    r.send(b"DONE\r\n")
    assert r.response(b"i") == [b"i OK IDLE terminated"]


def test_idle_without_a_selected_mailbox(world):
    r = world.connect()
    r.send(b"i IDLE\r\n")
    assert r.line().startswith(b"+")
    world.clock.advance(IDLE_POLL * 3)
    r.send(b"DONE\r\n")
    assert tagged(r.response(b"i")).startswith(b"i OK")


def test_command_pipelined_after_done_waits_for_idle_to_end(world):
    r = world.connect()
    r.cmd(b"s SELECT INBOX")
    r.send(b"i IDLE\r\n")
    assert r.line().startswith(b"+")
    world.clock.advance(0.2)
    r.send(b"DONE\r\nn NOOP\r\nc CAPABILITY\r\n")
    lines = r.response(b"c")
    tags = [line.split(b" ")[0] for line in lines if not line.startswith(b"*")]
    assert tags == [b"i", b"n", b"c"], lines


def test_connection_lost_while_idling_stops_the_polls(world):
    r = world.connect()
    r.cmd(b"s SELECT INBOX")
    r.send(b"i IDLE\r\n")
    assert r.line().startswith(b"+")
    r.close()
    assert world.clock.getDelayedCalls() == []

"""IMAP in memory: what the connection does for every command: strictly ordered answers to
pipelined commands, BAD for malformed input, long lines and literals (docs/design/imap.md,
"Serialized dispatch" and "Lines and literals")."""
from __future__ import annotations

import re

from twisted.logger import capturedLogs

from tests.unit.imapkit import simple, tagged, world  # noqa: F401


def test_pipelined_commands_answer_in_order(world):
    """SELECT/STATUS/APPEND/FETCH pipelined must answer in command order."""
    r = world.connect()
    msg = simple("pipe")
    batch = (b"p1 SELECT INBOX\r\np2 STATUS Sent (MESSAGES)\r\n"
             b"p3 APPEND Drafts {%d+}\r\n" % len(msg) + msg + b"\r\n"
             b"p4 NOOP\r\np5 LIST \"\" \"*\"\r\np6 FETCH 1:* (FLAGS)\r\np7 EXAMINE INBOX\r\n")
    r.send(batch)
    tags = []
    while len(tags) < 7:
        line = r.line()
        m = re.match(rb"(p\d) ", line)
        if m:
            tags.append(m.group(1))
    assert tags == [b"p1", b"p2", b"p3", b"p4", b"p5", b"p6", b"p7"]


def test_malformed_commands_get_bad_and_session_continues(world):
    r = world.connect()
    with capturedLogs() as events:
        for i, line in enumerate([b"x", b"a1 FROB", b'a2 SELECT "unterminated', b"a3 FETCH",
                                  b"a4 FETCH 1:x FLAGS", b"a5 LIST ((", b"a6 UID FROB 1", b"* NOOP",
                                  b"a8 FETCH 1 (BODY[HEADER.FIELDS])",
                                  b"a9 APPEND INBOX (\\Seen) notaliteral", b"b1 STORE 1 FLAGS"]):
            tag = line.split(b" ")[0]
            r.send(line + b"\r\n")
            got = r.line()
            while got.startswith(b"* ") and tag != b"*":
                got = r.line()
            assert b" BAD " in got or got.startswith(b"* BAD") or b" NO " in got, (line, got)
    assert tagged(r.cmd(b"z NOOP")).startswith(b"z OK")
    logged = [e["log_format"].format(**e) for e in events if "log_format" in e]
    assert any(t.startswith("imap: BAD command from 127.0.0.1") for t in logged), logged


def test_long_lines_accepted_up_to_64k_and_refused_beyond(world):
    """A 20 KB UID set is legal (Twisted dropped lines over 16 KB)."""
    r = world.connect()
    r.cmd(b"s SELECT INBOX")
    uids = b",".join(b"%d" % i for i in range(1, 18000, 2))
    assert len(uids) > 16384
    assert tagged(r.cmd(b"a UID FETCH " + uids + b" (FLAGS)")).startswith(b"a OK")
    resp = r.cmd(b"b NOOP " + b"x" * 70000)
    assert tagged(resp).startswith(b"b BAD")
    assert tagged(r.cmd(b"c NOOP")).startswith(b"c OK")


def test_oversized_literal_of_another_command_is_refused(world):
    r = world.connect()
    r.send(b"a CREATE {%d}\r\n" % (2 * 1024 * 1024))
    assert r.line() == b"a BAD literal too large"
    assert tagged(r.cmd(b"b NOOP")).startswith(b"b OK")
    # A non-synchronizing one far beyond the limit: the server hangs up rather than read it.
    r.send(b"c CREATE {%d+}\r\n" % (10 * 1024 * 1024))
    assert r.line() == b"c BAD literal too large"
    assert r.line().startswith(b"* BYE")
    assert r.disconnected


def test_commands_of_the_wrong_state_are_bad(world):
    r = world.connect(login_as=None)
    assert tagged(r.cmd(b"a SELECT INBOX")) == b"a BAD log in first"
    r = world.connect()
    assert tagged(r.cmd(b"b FETCH 1 FLAGS")) == b"b BAD no mailbox selected"
    assert tagged(r.cmd(b"c LOGIN x y")).startswith(b"c BAD")


def test_hangup_aborts_a_client_that_never_answers_the_close(world):
    r = world.connect()
    released = []
    r.proto.on_close = lambda: released.append(1)  # as LimitedFactory sets it
    r.cmd(b"a LOGOUT")
    assert r.disconnected and not r.transport.aborted
    world.clock.advance(9.9)
    assert not r.transport.aborted
    world.clock.advance(0.2)
    assert r.transport.aborted
    r.close()
    assert released == [1]


def test_a_client_that_closes_is_not_aborted(world):
    r = world.connect()
    r.cmd(b"a LOGOUT")
    r.close()
    world.clock.advance(60)
    assert not r.transport.aborted
    assert world.clock.getDelayedCalls() == []


def test_an_evicted_session_gets_bye_unavailable_and_is_closed(world):
    """The listener's fairness rules drop a session through its evict() (docs/design/limits.md)."""
    c = world.connect(login_as=None)
    c.proto.evict("idle while others wait")
    assert c.line() == b"* BYE [UNAVAILABLE] idle while others wait"
    assert c.transport.disconnecting

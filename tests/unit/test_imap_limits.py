"""IMAP in memory: the limits that hold before login (line length, literals, commands per
second, time to log in), AUTHENTICATE responses too long, output backpressure, and the hooks
the listener's factory gives meaning to (docs/design/imap.md, "Limits")."""
from __future__ import annotations

import base64

from twisted.internet import defer
from twisted.logger import capturedLogs

from mailsuite.directory.api import DirectoryUnavailable
from tests.unit.imapkit import PASSWORD, simple, tagged, world  # noqa: F401


def _preauth(world):
    return world.connect(login_as=None)


# -- literals before login ----------------------------------------------------------------------

def test_append_before_login_is_refused_without_continuation(world):
    c = _preauth(world)
    c.send(b"a APPEND INBOX {26214400}\r\n")
    line = c.line()
    assert line.startswith(b"a BAD") and not line.startswith(b"+"), line
    assert c.pending() == b""
    assert not c.disconnected
    # The session stays in step: the next command gets its own answer.
    assert tagged(c.cmd(b"b CAPABILITY")).startswith(b"b OK")


def test_small_append_literal_before_login_is_refused_too(world):
    c = _preauth(world)
    c.send(b"a APPEND INBOX {10}\r\n")
    assert c.line().startswith(b"a BAD")
    assert b"+" not in c.pending()


def test_non_synchronizing_literal_before_login_closes(world):
    c = _preauth(world)
    c.send(b"a APPEND INBOX {26214400+}\r\n" + b"x" * 65536)
    out = c.pending()
    assert out.startswith(b"a BAD") and b"* BYE" in out
    assert c.disconnected
    assert c.proto.literal_buf == bytearray() and c.proto.segments == []


def test_large_login_literal_is_refused_small_one_read(world):
    c = _preauth(world)
    c.send(b"a LOGIN {100000}\r\n")
    assert c.line().startswith(b"a BAD")
    assert c.pending() == b""
    c.send(b"b LOGIN {17}\r\n")
    assert c.line().startswith(b"+")
    c.send(b"alice@example.org " + PASSWORD.encode() + b"\r\n")
    assert tagged(c.response(b"b")).startswith(b"b OK")


def test_many_small_literals_before_login_are_bounded(world):
    c = _preauth(world)
    imap = c.proto.config.imap
    for _ in range(400):
        if c.disconnected:
            break
        c.send(b"a ID (" + b"x" * 500 + b" {1+}\r\nx")
    assert b"a BAD" in c.pending()
    held = sum(len(s) + len(lit or b"") for s, lit in c.proto.segments)
    assert held < imap.preauth_max_line + imap.preauth_max_literal + 1000


# -- lines before login -------------------------------------------------------------------------

def test_line_without_newline_before_login_is_bad_and_closes(world):
    c = _preauth(world)
    for _ in range(160):  # 10 MB offered in 64 KiB reads
        if c.disconnected:
            break
        c.send(b"A" * 65536)
    assert c.disconnected
    out = c.pending()
    assert b"BAD" in out and b"* BYE" in out
    assert len(c.proto._buffer) == 0


def test_long_line_after_login_is_bad_and_the_session_goes_on(world):
    c = world.connect()
    c.send(b"a NOOP " + b"x" * 100000 + b"\r\n")
    assert c.line().startswith(b"a BAD")
    assert tagged(c.cmd(b"b NOOP")).startswith(b"b OK")


def test_login_line_up_to_the_preauth_limit_works(world):
    c = _preauth(world)
    pad = b"x" * 5000
    resp = c.cmd(b'a ID ("name" "' + pad + b'")')
    assert tagged(resp).startswith(b"a OK")


# -- AUTHENTICATE -------------------------------------------------------------------------------

def test_huge_authenticate_response_is_bad_and_stays_in_step(world):
    c = _preauth(world)
    c.send(b"a AUTHENTICATE PLAIN\r\n")
    assert c.line().startswith(b"+")
    c.send(b"A" * 100000 + b"\r\nb CAPABILITY\r\n")
    c.clock.advance(0)
    lines = c.response(b"a")
    assert tagged(lines).startswith(b"a BAD"), lines
    resp = c.response(b"b")
    assert tagged(resp).startswith(b"b OK")
    assert resp[0].startswith(b"* CAPABILITY")
    # And a normal AUTHENTICATE still works afterwards.
    c.send(b"c AUTHENTICATE PLAIN\r\n")
    assert c.line().startswith(b"+")
    c.send(base64.b64encode(b"\0alice@example.org\0" + PASSWORD.encode()) + b"\r\n")
    assert tagged(c.response(b"c")).startswith(b"c OK")


def test_endless_authenticate_response_closes(world):
    c = _preauth(world)
    c.send(b"a AUTHENTICATE PLAIN\r\n")
    assert c.line().startswith(b"+")
    for _ in range(40):
        if c.disconnected:
            break
        c.send(b"A" * 65536)
    assert c.disconnected


# -- rate and time before login -----------------------------------------------------------------

def test_commands_per_second_before_login_are_paced(world):
    world.config.imap.max_commands_per_second = 5
    c = _preauth(world)
    c.send(b"".join(b"n%d NOOP\r\n" % i for i in range(12)))
    assert c.pending().count(b" OK NOOP") == 5
    assert c.proto.paused  # the rest waits in the kernel, not in our memory
    c.clock.advance(1.0)
    assert c.pending().count(b" OK NOOP") == 10
    c.clock.advance(1.0)
    assert c.pending().count(b" OK NOOP") == 12


def test_commands_after_login_are_not_paced(world):
    world.config.imap.max_commands_per_second = 5
    c = world.connect()
    c.send(b"".join(b"n%d NOOP\r\n" % i for i in range(50)))
    assert c.pending().count(b" OK NOOP") == 50


def test_login_timeout_says_bye(world):
    world.config.imap.login_timeout = 60
    c = _preauth(world)
    c.clock.advance(59)
    assert not c.disconnected
    c.clock.advance(1)
    assert c.disconnected and b"* BYE" in c.pending()


def test_login_timeout_is_cancelled_by_login(world):
    world.config.imap.login_timeout = 60
    c = world.connect()
    c.clock.advance(120)
    assert not c.disconnected


def test_hooks_progress_and_authenticated(world):
    c = _preauth(world)
    seen: list[str] = []
    c.proto.on_progress = lambda: seen.append("progress")
    c.proto.on_authenticated = lambda: seen.append("auth")
    c.cmd(b"a CAPABILITY")
    c.cmd(b"b garbage")
    c.cmd(b"c LOGIN alice@example.org " + PASSWORD.encode())
    c.cmd(b"d NOOP")
    assert seen == ["progress", "progress", "auth", "progress", "progress"]


# -- environment faults -------------------------------------------------------------------------

def test_login_during_directory_outage_is_unavailable_in_one_line(world):
    down = DirectoryUnavailable("database is down")
    world.directory.authenticate = lambda *a, **k: defer.fail(down)
    c = _preauth(world)
    with capturedLogs() as events:
        resp = c.cmd(b"a LOGIN alice@example.org " + PASSWORD.encode())
    assert tagged(resp).startswith(b"a NO [UNAVAILABLE]"), resp
    assert not [e for e in events if e.get("log_failure")]
    assert len([e for e in events if "unavailable" in e["log_format"]]) == 1
    assert c.proto.auth_failures == 0


# -- output backpressure ------------------------------------------------------------------------

def test_no_command_is_read_while_the_client_does_not_read(world):
    c = world.connect()
    c.cmd(b"s SELECT INBOX")
    c.proto.gate.pauseProducing()  # what the transport does when its buffer is full
    c.send(b"a NOOP\r\nb NOOP\r\nc NOOP\r\n")
    out = c.pending()
    assert b"a OK" in out and b"b OK" not in out
    assert c.proto.paused
    c.proto.gate.resumeProducing()
    c.clock.advance(0)
    out = c.pending()
    assert b"b OK" in out and b"c OK" in out


def test_fetch_of_big_bodies_waits_for_the_client(world):
    big = simple("big", body="x" * 1024 * 1023 + "\r\n")
    world.append("alice@example.org", "", big)
    c = world.connect()
    c.cmd(b"s SELECT INBOX")
    c.proto.gate.pauseProducing()
    c.send(b"".join(b"f%d FETCH 1 BODY.PEEK[]\r\n" % i for i in range(40)))
    written = len(c.pending())
    assert written < 300 * 1024, written  # one chunk of one body, not 40 MiB
    for _ in range(40 * 20):
        if b"f39 OK" in c.buf:
            break
        c.proto.gate.resumeProducing()
        c.clock.advance(0)
        c.pending()
        c.proto.gate.pauseProducing()
    assert b"f39 OK" in c.buf


def test_a_client_that_reads_nothing_for_a_timeout_period_is_closed(world):
    big = simple("big", body="x" * 600 * 1024 + "\r\n")
    world.append("alice@example.org", "", big)
    c = world.connect()
    c.cmd(b"s SELECT INBOX")
    c.proto.gate.pauseProducing()
    c.send(b"f FETCH 1 BODY.PEEK[]\r\n")
    timeout = world.config.limits.imap_timeout
    c.clock.advance(timeout)
    assert not c.disconnected  # a FETCH in progress is given the benefit of the doubt once
    c.clock.advance(timeout)
    assert c.disconnected and b"* BYE" in c.pending()


def test_a_slow_but_reading_client_is_not_closed(world):
    big = simple("big", body="x" * 600 * 1024 + "\r\n")
    world.append("alice@example.org", "", big)
    c = world.connect()
    c.cmd(b"s SELECT INBOX")
    write = c.transport.write

    def write_and_fill(data: bytes) -> None:  # every write fills the transport's buffer
        write(data)
        c.proto.gate.pauseProducing()
    c.transport.write = write_and_fill
    c.send(b"f FETCH 1 BODY.PEEK[]\r\n")
    timeout = world.config.limits.imap_timeout
    for _ in range(4):
        c.clock.advance(timeout - 1)
        c.proto.gate.resumeProducing()  # it read a little
    assert not c.disconnected and c.proto.busy


def test_a_command_of_many_literals_is_refused(world):
    c = world.connect()
    c.send(b"a LIST" + b" {0+}\r\n" * 1000 + b"\r\n")
    c.send(b"b NOOP\r\n")
    out = c.pending()
    assert b"a BAD too many literals" in out and b"b OK" in out
    assert len(c.proto.segments) == 0

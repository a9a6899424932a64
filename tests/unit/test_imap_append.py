"""IMAP in memory: APPEND (authenticated and selected states): literal forms, APPENDUID,
TRYCREATE, the size limit, and a client that goes away mid-literal."""
from __future__ import annotations

import os
import re

from tests.unit.imapkit import MAX_SIZE, simple, tagged, world  # noqa: F401


def test_append_variants_literal_plus_and_appenduid(world):
    r = world.connect()
    r.cmd(b"x CREATE AppendBox")
    msg = simple("append")
    # No flag list, no date; LITERAL+ (RFC 7888) needs no continuation.
    resp = r.cmd(b"a APPEND AppendBox {%d+}\r\n" % len(msg) + msg)
    m = re.match(rb"a OK \[APPENDUID (\d+) (\d+)\]", tagged(resp))
    assert m, resp
    uid1 = int(m.group(2))
    resp = r.cmd(b'b APPEND AppendBox (\\Seen $Label1) "17-Jul-1996 02:44:25 -0700" {%d+}\r\n'
                 % len(msg) + msg)
    uid2 = int(re.match(rb"b OK \[APPENDUID \d+ (\d+)\]", tagged(resp)).group(1))
    assert uid2 == uid1 + 1
    # Synchronizing literal: wait for "+" first.
    r.send(b"c APPEND AppendBox () {%d}\r\n" % len(msg))
    assert r.line().startswith(b"+")
    r.send(msg + b"\r\n")
    assert tagged(r.response(b"c")).startswith(b"c OK [APPENDUID")
    r.cmd(b"d SELECT AppendBox")
    resp = r.cmd(b"e UID FETCH %d (FLAGS INTERNALDATE RFC822.SIZE)" % uid2)
    assert b"\\Seen" in resp[0] and b"$Label1" in resp[0]
    assert b'"17-Jul-1996 09:44:25 +0000"' in resp[0]
    assert b"RFC822.SIZE %d" % len(msg) in resp[0]


def test_append_to_missing_folder_gives_trycreate(world):
    """[TRYCREATE] (Twisted sent BAD Server error)."""
    r = world.connect()
    msg = simple()
    resp = r.cmd(b"a APPEND DoesNotExist {%d+}\r\n" % len(msg) + msg)
    assert tagged(resp).startswith(b"a NO") and b"[TRYCREATE]" in tagged(resp)


def test_append_to_other_folder_sends_no_exists(world):
    """APPEND to Sent while INBOX is selected must not send Sent's EXISTS."""
    r = world.connect(login_as="bob@example.org")
    r.cmd(b"a SELECT INBOX")
    msg = simple("sent copy")
    for i in range(2):
        resp = r.cmd(b"b%d APPEND Sent (\\Seen) {%d+}\r\n" % (i, len(msg)) + msg)
        assert not [line for line in resp if line.endswith(b"EXISTS")], resp


def test_append_to_the_selected_folder_announces_exists(world):
    r = world.connect()
    r.cmd(b"a SELECT INBOX")
    msg = simple("to inbox")
    resp = r.cmd(b"b APPEND INBOX {%d+}\r\n" % len(msg) + msg)
    assert b"* 1 EXISTS" in resp


def test_append_over_the_limit_is_refused_before_reading(world):
    r = world.connect()
    folder = world.maildir("alice@example.org")
    before = world.messages("alice@example.org")
    r.send(b"a APPEND INBOX {%d}\r\n" % (MAX_SIZE + 1))
    line = r.line()
    assert line.startswith(b"a NO [TOOBIG]") or line.startswith(b"a NO [LIMIT]"), line
    # Non-synchronizing: the client sends it anyway; the server skips it and goes on.
    big = b"x" * (MAX_SIZE + 10)
    resp = r.cmd(b"b APPEND INBOX {%d+}\r\n" % len(big) + big)
    assert tagged(resp).startswith(b"b NO [TOOBIG]")
    assert tagged(r.cmd(b"c NOOP")).startswith(b"c OK")
    assert world.messages("alice@example.org") == before
    assert os.listdir(os.path.join(folder, "tmp")) == []


def test_dropped_connection_mid_append_leaves_no_file(world):
    r = world.connect()
    before = world.messages("alice@example.org")
    r.send(b"a APPEND INBOX {5000+}\r\n" + b"Subject: partial\r\n\r\n" + b"y" * 1000)
    r.close()
    assert world.messages("alice@example.org") == before
    assert os.listdir(os.path.join(world.maildir("alice@example.org"), "tmp")) == []

"""POP3 TRANSACTION and UPDATE states in memory over a real Maildir: STAT/LIST/UIDL/TOP/RETR,
DELE only at QUIT, pipelining, errors."""
from __future__ import annotations

import io
import os

import pytest

from mailsuite.pop3.retrieval import TopReader
from tests.dotted import dotted_messages
from tests.unit.pop3kit import USERS, Pop3World, message

ALICE = USERS[0]


@pytest.fixture
def world(tmp_path):
    return Pop3World(str(tmp_path / "mail"))


def test_stat_list_uidl_top_and_uidl_stability(world):
    body = b"line1\r\nline2\r\nline3\r\n"
    keys = [world.put(ALICE, message(f"m{i}", body)) for i in range(3)]
    sizes = [len(message(f"m{i}", body)) for i in range(3)]
    c = world.login(ALICE)
    assert c.command("STAT") == b"+OK 3 %d" % sum(sizes)
    assert c.command("LIST").startswith(b"+OK")
    assert c.multiline() == [f"{i + 1} {s}".encode() for i, s in enumerate(sizes)]
    assert c.command("UIDL").startswith(b"+OK")
    uidls = [line.split()[1].decode() for line in c.multiline()]
    assert uidls == keys  # the Maildir key, the same identity IMAP sees
    assert c.command("UIDL 2").split()[2].decode() == keys[1]
    assert c.command("TOP 2 1") == b"+OK"
    top = c.multiline()
    assert top[-2:] == [b"", b"line1"] and b"Subject: m1" in top
    c.command("QUIT")
    # Flag changes (an IMAP client reading the message) do not change the UIDL.
    inbox = world.store.account(ALICE).folder("INBOX")
    for info in inbox.sync():
        inbox.add_flags(info.uid, ["\\Seen", "$Forwarded"])
    assert all(":2," in n for n in os.listdir(os.path.join(world.maildir(ALICE), "cur")))
    c = world.login(ALICE, port="pop3")
    c.command("UIDL")
    assert [line.split()[1].decode() for line in c.multiline()] == keys
    c.command("QUIT")


def test_dot_line_at_16k_boundary_and_large_message_byte_identical(world):
    """Twisted ended the message at a '.' line on a 16 KiB chunk boundary and sent the rest as
    fake replies. Lines starting with '.' are everywhere here, including exactly at offsets
    16384 and 65536 (our chunk size)."""
    dotted, big = dotted_messages()
    world.put(ALICE, dotted)
    world.put(ALICE, big)
    c = world.login(ALICE)
    assert c.retr_bytes(1) == dotted
    assert c.retr_bytes(2) == big
    assert c.command("NOOP").startswith(b"+OK")  # the stream ended where it should
    assert c.unread() == b""
    c.command("QUIT")


def test_dele_quit_removes_and_dropped_connection_removes_nothing(world):
    keys = [world.put(ALICE, message(f"d{i}")) for i in range(3)]
    c = world.login(ALICE)
    assert c.command("DELE 1").startswith(b"+OK")
    assert c.command("RETR 1").startswith(b"-ERR")  # deleted in this session
    assert c.command("STAT").startswith(b"+OK 2 ")
    c.disconnect()  # drop without QUIT: the maildrop lock is released, nothing removed
    c = world.login(ALICE)
    assert c.command("STAT").startswith(b"+OK 3 ")
    c.command("DELE 1")
    c.command("RSET")
    c.command("DELE 2")
    c.retr_bytes(3)
    assert c.command("QUIT").startswith(b"+OK")
    assert c.closed()
    cur = os.path.join(world.maildir(ALICE), "cur")
    remaining = os.listdir(cur)
    assert sorted(n.split(":")[0] for n in remaining) == sorted([keys[0], keys[2]])
    # RETR'd messages are marked \Seen at QUIT, like Dovecot does.
    assert any(n.startswith(keys[2]) and n.endswith(":2,S") for n in remaining)
    c = world.login(ALICE)
    c.command("UIDL")
    assert [line.split()[1].decode() for line in c.multiline()] == [keys[0], keys[2]]
    c.command("QUIT")


def test_bad_commands_get_err_and_the_session_goes_on(world):
    world.put(ALICE, message("x"))
    c = world.login(ALICE)
    for bad in ["RETR abc", "RETR 0", "RETR 99", "TOP 1 x", "DELE 7",
                "FOO", "STLS", "USER x", "\x01\x02"]:
        assert c.command(bad).startswith(b"-ERR"), bad
    assert c.command("STAT") == b"+OK 1 %d" % len(message("x"))
    # The tenth error closes the connection: a client that only sends garbage goes away.
    assert c.command("LIST -1").startswith(b"-ERR Too many errors")
    assert c.closed()


def test_pipelined_commands_answered_in_order(world):
    world.put(ALICE, message("a"))
    world.put(ALICE, message("bb"))
    c = world.login(ALICE)
    c.send(b"STAT\r\nRETR 1\r\nLIST 2\r\nUIDL 1\r\nNOOP\r\n")
    assert c.line().startswith(b"+OK 2 ")
    assert c.line().startswith(b"+OK")
    assert b"Subject: a" in c.multiline()
    assert c.line() == b"+OK 2 %d" % len(message("bb"))
    assert c.line().startswith(b"+OK 1 ")
    assert c.line() == b"+OK"
    c.command("QUIT")


def test_line_too_long_is_an_error_not_a_command(world):
    c = world.connect()
    c.line()
    c.send(b"USER " + b"x" * 5000 + b"\r\nNOOP\r\n")
    assert c.line().startswith(b"-ERR Line too long")
    assert c.line().startswith(b"-ERR")  # NOOP is not valid before login
    assert c.command("QUIT").startswith(b"+OK")


def test_top_reader_limits_body_lines():
    msg = b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3\r\n"
    assert TopReader(io.BytesIO(msg), 0).read(1 << 20) == b"A: 1\r\nB: 2\r\n\r\n"
    r = TopReader(io.BytesIO(msg), 2)
    assert r.read(3) + r.read(3) + r.read(100) + r.read(100) == b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n"
    assert TopReader(io.BytesIO(msg), 99).read(1 << 20) == msg

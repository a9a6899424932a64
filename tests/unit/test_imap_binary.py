"""IMAP in memory: BINARY (RFC 3516): BINARY[part]<o.n> decodes base64 and quoted-printable,
BINARY.SIZE, literal8 for NUL in FETCH responses and APPEND, [UNKNOWN-CTE], BODY[] without NUL
(docs/design/imap.md, "BINARY")."""
from __future__ import annotations

import base64

from mailsuite.imap.binary import decode_qp
from tests.unit.imapkit import tagged, world  # noqa: F401

MULTI = (b"From: a@example.org\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
         b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
         b"--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
         + base64.encodebytes(b"hello\0world, binary \xff bytes").replace(b"\n", b"\r\n") +
         b"--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
         b"caf=C3=A9 =\r\nau lait  \r\nnext=3Dline\r\n"
         b"--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n"
         b"begin 644 x\r\n"
         b"--b\r\nContent-Type: text/plain\r\n\r\nplain 7bit\r\n"
         b"--b--\r\n")


def test_binary_decodes_base64_and_qp_with_sizes_and_partials(world):
    world.append("alice@example.org", "Bin", MULTI)
    c = world.connect()
    c.cmd(b"s SELECT Bin")
    resp = c.cmd(b"a FETCH 1 (BINARY.SIZE[1] BINARY.PEEK[1])")
    assert resp[0] == (b"* 1 FETCH (BINARY.SIZE[1] 27 BINARY[1] ~{27}\r\n"
                       b"hello\0world, binary \xff bytes)")
    resp = c.cmd(b"b FETCH 1 (BINARY.PEEK[2] BINARY.SIZE[2])")
    assert resp[0] == (b"* 1 FETCH (BINARY[2] {24}\r\ncaf\xc3\xa9 au lait\r\nnext=line"
                       b" BINARY.SIZE[2] 24)")
    resp = c.cmd(b"c FETCH 1 (BINARY.PEEK[1]<6.5>)")
    assert resp[0] == b"* 1 FETCH (BINARY[1]<6> {5}\r\nworld)"
    resp = c.cmd(b"d FETCH 1 (BINARY.PEEK[4] BINARY.SIZE[4])")
    assert resp[0] == b"* 1 FETCH (BINARY[4] {10}\r\nplain 7bit BINARY.SIZE[4] 10)"
    resp = c.cmd(b"e FETCH 1 (FLAGS)")
    assert b"\\Seen" not in resp[0]  # .PEEK and .SIZE never set \Seen


def test_binary_unknown_cte_is_no_and_binary_sets_seen(world):
    world.append("alice@example.org", "Bin", MULTI)
    c = world.connect()
    c.cmd(b"s SELECT Bin")
    resp = c.cmd(b"a FETCH 1 (BINARY.PEEK[3])")
    assert tagged(resp).startswith(b"a NO [UNKNOWN-CTE]")
    resp = c.cmd(b"b FETCH 1 (BINARY[4])")
    assert b"\\Seen" in resp[0] and tagged(resp).startswith(b"b OK")


def test_binary_syntax_errors_are_bad(world):
    world.append("alice@example.org", "Bin", MULTI)
    c = world.connect()
    c.cmd(b"s SELECT Bin")
    for item in (b"BINARY[1.MIME]", b"BINARY[HEADER]", b"BINARY.SIZE[1]<0.5>", b"BINARY[0]",
                 b"BINARY.FOO[1]"):
        resp = c.cmd(b"x FETCH 1 (" + item + b")")
        assert tagged(resp).startswith(b"x BAD"), (item, resp)


def test_append_literal8_keeps_nul_body_replaces_it(world):
    msg = (b"From: a@example.org\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Transfer-Encoding: binary\r\n\r\n\0-\xe4\n\r\n\n")
    c = world.connect()
    c.send(b"a APPEND INBOX ~{%d}\r\n" % len(msg))
    assert c.line().startswith(b"+")
    c.send(msg + b"\r\n")
    assert tagged(c.response(b"a")).startswith(b"a OK [APPENDUID")
    c.cmd(b"s SELECT INBOX")
    resp = c.cmd(b"b FETCH 1 (BINARY.SIZE[1] BINARY.PEEK[1])")
    assert resp[0] == b"* 1 FETCH (BINARY.SIZE[1] 7 BINARY[1] ~{7}\r\n\0-\xe4\n\r\n\n)"
    resp = c.cmd(b"c FETCH 1 (BODY.PEEK[1])")
    assert resp[0] == b"* 1 FETCH (BODY[1] {7}\r\n\x80-\xe4\n\r\n\n)"  # NUL is no CHAR8


def test_decode_qp_soft_breaks_and_trailing_space():
    assert decode_qp(b"hello  \r\nbar=\r\n\r\nfoo\t= \r\n=62\r\nx=4") == b"hello\r\nbar\r\nfoo\tb\r\nx=4"

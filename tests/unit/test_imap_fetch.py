"""IMAP in memory: FETCH and UID FETCH (selected state): partial fetches, headers served from
the raw bytes, BODYSTRUCTURE and sections, the macros, \\Seen, index-only items."""
from __future__ import annotations

import os
import re

from tests.unit.imapkit import fetch_data, simple, tagged, world  # noqa: F401


def test_partial_fetch_in_chunks_reassembles_byte_identical(world):
    """Thunderbird fetches messages over 15 KB in 10240-byte chunks (docs/design/imap.md,
    "Partial FETCH")."""
    body = b"".join(b"line %06d %s\r\n" % (i, b"abcdefghij" * 6) for i in range(2100))
    msg = simple("partial", body=body.decode())
    assert len(msg) > 150_000
    world.append("alice@example.org", "PartialBox", msg)
    r = world.connect()
    r.cmd(b"s SELECT PartialBox")
    got = b""
    offset = 0
    i = 0
    while True:
        tag = b"p%d" % i
        r.send(tag + b" UID FETCH 1 (UID BODY.PEEK[]<%d.10240>)\r\n" % offset)
        line = r.line()
        m = re.search(rb"BODY\[\]<(\d+)> \{(\d+)\}$", line)
        assert m, line
        assert int(m.group(1)) == offset  # the origin only, not <o.n>
        n = int(m.group(2))
        got += r.read_exact(n)
        rest = r.response(tag)
        assert tagged(rest).startswith(tag + b" OK")
        offset += n
        i += 1
        if n < 10240:
            break
    assert got == msg
    resp = r.cmd(b"z FETCH 1 BODY.PEEK[]<%d.100>" % (len(msg) + 5))
    assert b'BODY[]<%d> ""' % (len(msg) + 5) in resp[0]


def test_header_fetch_keeps_raw_8bit_bytes_duplicates_and_order(world):
    """Raw UTF-8/8-bit headers, duplicate Received, original case and order
    (docs/design/imap.md, "Headers from raw bytes")."""
    header = (b"Received: from a by b; Mon, 02 Feb 2026 10:00:00 +0000\r\n"
              b"Received: from c by d; Mon, 02 Feb 2026 09:00:00 +0000\r\n"
              b"From: J\xc3\xbcrgen <j@example.org>\r\n"
              b"Subject: Gr\xc3\xbc\xc3\x9fe \xe9 latin1\r\n"
              b"Message-ID: <8bit@example.org>\r\n"
              b"X-Folded: one\r\n two\r\n")
    msg = header + b"\r\nbody\r\n"
    world.append("alice@example.org", "EightBit", msg)
    r = world.connect()
    r.cmd(b"s SELECT EightBit")
    resp = r.cmd(b"a FETCH 1 (BODY.PEEK[HEADER])")
    assert header + b"\r\n" in resp[0]
    resp = r.cmd(b"b FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT RECEIVED X-FOLDED)])")
    expected = (b"Received: from a by b; Mon, 02 Feb 2026 10:00:00 +0000\r\n"
                b"Received: from c by d; Mon, 02 Feb 2026 09:00:00 +0000\r\n"
                b"Subject: Gr\xc3\xbc\xc3\x9fe \xe9 latin1\r\nX-Folded: one\r\n two\r\n\r\n")
    assert b"{%d}\r\n" % len(expected) + expected in resp[0]
    resp = r.cmd(b"c FETCH 1 (BODY.PEEK[HEADER.FIELDS.NOT (RECEIVED SUBJECT FROM X-FOLDED)])")
    assert b"Message-ID: <8bit@example.org>\r\n\r\n" in resp[0] and b"Received" not in resp[0]
    resp = r.cmd(b"d FETCH 1 (ENVELOPE)")
    assert tagged(resp).startswith(b"d OK") and b"J\xc3\xbcrgen" in resp[0]
    assert tagged(r.cmd(b"e NOOP")).startswith(b"e OK")  # the connection survived


NESTED = (b"From: a@example.org\r\nTo: b@example.org\r\nSubject: =?UTF-8?B?w5xiZXI=?=\r\n"
          b"MIME-Version: 1.0\r\n"
          b'Content-Type: multipart/mixed; boundary="Outer-Boundary"\r\n\r\n'
          b"preamble\r\n"
          b"--Outer-Boundary\r\n"
          b'Content-Type: multipart/alternative; boundary="inner"\r\n\r\n'
          b"--inner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nplain text\r\n"
          b"--inner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>html</p>\r\n"
          b"--inner--\r\n"
          b"--Outer-Boundary\r\n"
          b"Content-Type: message/rfc822\r\n\r\n"
          b"From: inner@example.org\r\nSubject: inner\r\n"
          b'Content-Type: multipart/mixed; boundary="deep"\r\n\r\n'
          b"--deep\r\nContent-Type: text/plain\r\n\r\ndeep one\r\n"
          b"--deep\r\nContent-Type: application/octet-stream; name=\"a;b.bin\"\r\n"
          b"Content-Transfer-Encoding: base64\r\n"
          b"Content-Disposition: attachment; filename=\"a;b.bin\"\r\n\r\nAAEC\r\n"
          b"--deep--\r\n"
          b"--Outer-Boundary\r\n"
          b"Content-Type: text/plain;\r\n\r\nweird params\r\n"
          b"--Outer-Boundary--\r\nepilogue\r\n")


def test_bodystructure_and_sections_of_nested_multipart(world):
    """Case-preserved boundary, trailing ';', quoted ';' in values, message/rfc822."""
    world.append("alice@example.org", "Nested", NESTED)
    r = world.connect()
    r.cmd(b"s SELECT Nested")
    data = fetch_data(r.cmd(b"x FETCH 1 (BODYSTRUCTURE BODY ENVELOPE)"))
    bs = data[1][b"BODYSTRUCTURE"]
    assert bs.is_multipart
    parts, subtype = bs[0], bs[1]
    assert subtype == b"mixed" or subtype == b"MIXED"
    assert len(parts) == 3
    assert parts[0][1].upper() == b"ALTERNATIVE"
    assert parts[1][0].upper() == b"MESSAGE" and parts[1][1].upper() == b"RFC822"
    resp = r.cmd(b"a FETCH 1 BODYSTRUCTURE")[0]
    assert b'"BOUNDARY" "Outer-Boundary"' in resp
    assert b'"NAME" "a;b.bin"' in resp
    sections = {
        b"1.1": b"plain text",
        b"1.2": b"<p>html</p>",
        b"2.HEADER": b"From: inner@example.org\r\nSubject: inner\r\n"
                     b'Content-Type: multipart/mixed; boundary="deep"\r\n\r\n',
        b"2.1": b"deep one",
        b"2.2": b"AAEC",
        b"2.2.MIME": b'Content-Type: application/octet-stream; name="a;b.bin"\r\n'
                     b"Content-Transfer-Encoding: base64\r\n"
                     b'Content-Disposition: attachment; filename="a;b.bin"\r\n\r\n',
        b"3": b"weird params",
        b"1.1.MIME": b"Content-Type: text/plain; charset=utf-8\r\n\r\n",
    }
    for i, (sec, want) in enumerate(sections.items()):
        resp = r.cmd(b"f%d FETCH 1 (BODY.PEEK[%s])" % (i, sec))
        m = re.search(rb"BODY\[" + re.escape(sec) + rb"\] \{(\d+)\}\r\n", resp[0])
        assert m, resp
        got = resp[0][m.end():m.end() + int(m.group(1))]
        assert got == want, (sec, got)
    resp = r.cmd(b"g FETCH 1 (BODY.PEEK[2.TEXT])")
    assert b"--deep\r\nContent-Type: text/plain" in resp[0]
    resp = r.cmd(b"h FETCH 1 (BODY.PEEK[9])")
    assert tagged(resp).startswith(b"h OK")


def _flags(r, tag: bytes) -> tuple:
    return fetch_data(r.cmd(tag + b" FETCH 1 (FLAGS)"))[1][b"FLAGS"]


def test_fetch_macros_rfc822_items_and_seen(world):
    msg = simple("macro")
    world.append("alice@example.org", "Macros", msg)
    r = world.connect()
    r.cmd(b"s SELECT Macros")
    d = fetch_data(r.cmd(b"a FETCH 1 ALL"))[1]
    assert b"ENVELOPE" in d and b"RFC822.SIZE" in d and b"INTERNALDATE" in d and b"FLAGS" in d
    assert d[b"ENVELOPE"].subject == b"macro"
    d = fetch_data(r.cmd(b"b FETCH 1 FULL"))[1]
    assert b"BODY" in d
    d = fetch_data(r.cmd(b"c FETCH 1 (RFC822.HEADER RFC822.SIZE)"))[1]
    assert d[b"RFC822.HEADER"] == msg.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert b"\\Seen" not in _flags(r, b"d")
    d = fetch_data(r.cmd(b"e FETCH 1 (RFC822.TEXT)"))[1]
    assert d[b"RFC822.TEXT"] == b"body text\r\n"
    assert b"\\Seen" in _flags(r, b"f")
    r.cmd(b"g STORE 1 -FLAGS.SILENT (\\Seen)")
    d = fetch_data(r.cmd(b"h FETCH 1 (RFC822)"))[1]
    assert d[b"RFC822"] == msg
    assert b"\\Seen" in _flags(r, b"i")


def test_examine_body_fetch_does_not_set_seen(world):
    world.append("alice@example.org", "SelBox", simple("b"))
    r = world.connect()
    r.cmd(b"b EXAMINE SelBox")
    r.cmd(b"d FETCH 1 BODY[]")
    resp = r.cmd(b"e FETCH 1 FLAGS")
    assert b"\\Seen" not in resp[0]


def test_fetch_flags_does_not_open_message_files(world):
    """FETCH FLAGS/UID/RFC822.SIZE/INTERNALDATE come from the index, not from the files: with
    the file emptied behind the server's back, RFC822.SIZE still reports the indexed size."""
    msg = simple("index")
    world.append("alice@example.org", "IndexOnly", msg)
    r = world.connect()
    r.cmd(b"s SELECT IndexOnly")
    cur = os.path.join(world.maildir("alice@example.org", "IndexOnly"), "cur")
    for n in os.listdir(cur):
        open(os.path.join(cur, n), "wb").close()
    d = fetch_data(r.cmd(b"a FETCH 1 (UID FLAGS RFC822.SIZE INTERNALDATE)"))
    assert d[1][b"RFC822.SIZE"] == len(msg)


def test_large_sections_are_streamed_in_one_literal(world):
    """A section over the streaming threshold is read from the file in chunks."""
    body = b"y" * (300 * 1024) + b"\r\n"
    msg = simple("large", body=body.decode())
    world.append("alice@example.org", "Large", msg)
    r = world.connect()
    r.cmd(b"s SELECT Large")
    d = fetch_data(r.cmd(b"a FETCH 1 (BODY.PEEK[] BODY.PEEK[TEXT]<0.10>)"))[1]
    assert d[b"BODY[]"] == msg
    assert d[b"BODY[TEXT]<0>"] == b"y" * 10

"""IMAP in memory: MULTIAPPEND (RFC 3502) all or none with an APPENDUID set, CATENATE (RFC 4469)
with TEXT parts and IMAP URLs to the user's own messages, [BADURL], [TOOBIG], [TRYCREATE]
(docs/design/imap.md, "APPEND: MULTIAPPEND and CATENATE")."""
from __future__ import annotations

import errno
import os
import re

from mailsuite.imap.append import BadUrl, parse_url
from tests.unit.imapkit import MAX_SIZE, simple, tagged, world  # noqa: F401


def _lit(data: bytes) -> bytes:
    return b"{%d+}\r\n" % len(data) + data


def test_multiappend_stores_every_message_with_one_appenduid_set(world):
    c = world.connect()
    one, two, three = simple("one"), simple("two"), simple("three")
    resp = c.cmd(b"a APPEND INBOX (\\Seen) " + _lit(one) + b' (\\Flagged) "02-Feb-2026 10:00:00 +0000" '
                 + _lit(two) + b" " + _lit(three))
    m = re.match(rb"a OK \[APPENDUID \d+ 1:3\]", tagged(resp))
    assert m, resp
    c.cmd(b"s SELECT INBOX")
    resp = c.cmd(b"f FETCH 1:3 (FLAGS INTERNALDATE BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"\\Seen" in resp[0] and b"Subject: one" in resp[0]
    assert b"\\Flagged" in resp[1] and b"02-Feb-2026 10:00:00 +0000" in resp[1]
    assert b"Subject: three" in resp[2]


def test_multiappend_is_all_or_none(world, monkeypatch):
    c = world.connect()
    # The second message's URL is bad: nothing is stored, not even the first.
    resp = c.cmd(b"a APPEND INBOX " + _lit(simple("one")) + b' CATENATE (URL "/INBOX/;UID=99")')
    assert tagged(resp).startswith(b"a NO [BADURL /INBOX/;UID=99]"), resp
    assert world.messages("alice@example.org") == []
    # The disk fills while the second is written: the first is gone again.
    real_fsync = os.fsync
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "full")
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    resp = c.cmd(b"b APPEND INBOX " + _lit(simple("one")) + b" " + _lit(simple("two")))
    assert tagged(resp).startswith(b"b NO [OVERQUOTA]"), resp
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert world.messages("alice@example.org") == []
    assert os.listdir(os.path.join(world.maildir("alice@example.org"), "tmp")) == []


def test_catenate_text_and_urls_of_own_messages(world):
    src = simple("source", body="source body\r\n")
    world.append("alice@example.org", "Src", src)
    c = world.connect()
    resp = c.cmd(b"v STATUS Src (UIDVALIDITY)")
    validity = int(re.search(rb"UIDVALIDITY (\d+)", resp[0]).group(1))
    resp = c.cmd(b'a APPEND INBOX CATENATE (URL "/Src;UIDVALIDITY=%d/;UID=1/;SECTION=HEADER" TEXT '
                 % validity + _lit(b"new body\r\n") + b' URL "/Src/;UID=1/;SECTION=TEXT/;PARTIAL=7.4")')
    assert tagged(resp).startswith(b"a OK [APPENDUID"), resp
    c.cmd(b"s SELECT INBOX")
    resp = c.cmd(b"f FETCH 1 BODY.PEEK[]")
    header = src[:src.index(b"\r\n\r\n") + 4]
    assert resp[0].endswith(header + b"new body\r\nbody)")


def test_catenate_errors(world):
    world.append("alice@example.org", "Src", simple("source"))
    c = world.connect()
    for url, why in ((b"/Src;UIDVALIDITY=1/;UID=1", b"BADURL"), (b"/Src/;UID=7", b"BADURL"),
                     (b"/Nope/;UID=1", b"BADURL"), (b"/Src/;UID=1/;SECTION=9", b"BADURL"),
                     (b"imap://bob%40example.org@host/INBOX/;UID=1", b"BADURL"),
                     (b"/Src/;UID=1;URLAUTH=anonymous", b"BADURL")):
        resp = c.cmd(b'a APPEND INBOX CATENATE (URL "' + url + b'")')
        assert tagged(resp).startswith(b"a NO [" + why), (url, resp)
    resp = c.cmd(b'b APPEND Missing CATENATE (URL "/Src;UIDVALIDITY=1/;UID=1")')
    assert tagged(resp).startswith(b"b NO [TRYCREATE]")
    big = b"x" * (MAX_SIZE - 10)
    resp = c.cmd(b'c APPEND INBOX CATENATE (TEXT ' + _lit(big) + b' URL "/Src/;UID=1")')
    assert tagged(resp).startswith(b"c NO [TOOBIG]"), resp
    for args in (b"CATENATE ()", b"CATENATE (TEXT)", b"CATENATE (FOO {1+}\r\nx)", b"CATENATE"):
        assert tagged(c.cmd(b"d APPEND INBOX " + args)).startswith(b"d BAD"), args
    assert world.messages("alice@example.org") == []


def test_parse_url_forms():
    u = parse_url(b"imap://alice%40example.org@mail.example.org/Sent%20Items;UIDVALIDITY=5/;UID=3"
                  b"/;SECTION=1.MIME/;PARTIAL=0.100", "alice@example.org")
    assert (u.mailbox, u.uidvalidity, u.uid, u.section, u.partial) == ("Sent Items", 5, 3, b"1.MIME", (0, 100))
    assert parse_url(b"/inbox/;uid=1", None).mailbox == "INBOX"
    for bad in (b"/INBOX", b"/INBOX/;UID=0", b"http://x/INBOX/;UID=1", b"/INBOX/;UID=1/;SECTION=BOGUS",
                b"/%ff/;UID=1"):
        try:
            parse_url(bad, "alice@example.org")
        except BadUrl:
            continue
        raise AssertionError(bad)


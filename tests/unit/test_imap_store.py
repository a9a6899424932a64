"""IMAP in memory: STORE, COPY, MOVE, EXPUNGE, UID EXPUNGE, CLOSE, UNSELECT (selected state)."""
from __future__ import annotations

import os
import re

from tests.unit.imapkit import simple, tagged, world  # noqa: F401


def test_store_flags_keywords_and_silent(world):
    world.append("alice@example.org", "Flags", simple("f"))
    r = world.connect()
    r.cmd(b"s SELECT Flags")
    resp = r.cmd(b"a STORE 1 +FLAGS (\\Flagged $Forwarded)")
    # A new keyword is announced in * FLAGS and PERMANENTFLAGS before the FETCH that shows it
    # (RFC 3501 §7.2.6).
    assert resp[0].startswith(b"* FLAGS (") and b"$Forwarded" in resp[0]
    assert resp[1].startswith(b"* OK [PERMANENTFLAGS (") and b"$Forwarded" in resp[1]
    assert b"\\Flagged" in resp[2] and b"$Forwarded" in resp[2]
    resp = r.cmd(b"b STORE 1 -FLAGS (\\Flagged)")
    assert resp[0].startswith(b"* 1 FETCH") and b"\\Flagged" not in resp[0]
    resp = r.cmd(b"c STORE 1 FLAGS (\\Answered $Junk)")
    assert resp[0].startswith(b"* FLAGS (") and b"$Junk" in resp[0]
    fetch = [line for line in resp if line.startswith(b"* 1 FETCH")][0]
    assert re.search(rb"FLAGS \(([^)]*)\)", fetch).group(1).split() == \
        [b"\\Answered", b"\\Recent", b"$Junk"]  # this session selected it first: \Recent
    resp = r.cmd(b"a STORE 1 +FLAGS.SILENT (\\Draft)")
    assert resp == [b"a OK STORE completed"]
    resp = r.cmd(b"b UID STORE 1 -FLAGS (\\Draft)")
    assert b"UID 1" in resp[0] and b"\\Draft" not in resp[0]
    assert tagged(r.cmd(b"c STORE 1 +FLAGS (\\Bogus)")).startswith(b"c BAD")
    assert tagged(r.cmd(b"d STORE 5 +FLAGS (\\Seen)")).startswith(b"d BAD")
    r.close()
    names = os.listdir(os.path.join(world.maildir("alice@example.org", "Flags"), "cur"))
    assert names[0].endswith(":2,Ra") or ":2,R" in names[0]


def test_copy_move_copyuid_and_trycreate(world):
    for i in range(3):
        world.append("alice@example.org", "CopySrc", simple(f"c{i}"), flags=("\\Flagged",))
    r = world.connect()
    r.cmd(b"x CREATE CopyDst")
    r.cmd(b"s SELECT CopySrc")
    resp = r.cmd(b"a UID COPY 1:2 CopyDst")
    assert re.match(rb"a OK \[COPYUID \d+ 1:2 1:2\]", tagged(resp)), resp
    resp = r.cmd(b"b COPY 1 Missing")
    assert tagged(resp).startswith(b"b NO [TRYCREATE]")
    resp = r.cmd(b"c MOVE 2:3 CopyDst")
    assert re.match(rb"\* OK \[COPYUID \d+ 2:3 3:4\]", resp[0]), resp
    assert resp[1:3] == [b"* 3 EXPUNGE", b"* 2 EXPUNGE"]
    resp = r.cmd(b"d UID MOVE 1 Missing")
    assert tagged(resp).startswith(b"d NO [TRYCREATE]")
    r.cmd(b"e SELECT CopyDst")
    assert r.cmd(b"f SEARCH ALL")[0] == b"* SEARCH 1 2 3 4"
    assert r.cmd(b"g SEARCH FLAGGED")[0] == b"* SEARCH 1 2 3 4"


def test_expunge_numbers_shift_correctly_and_uid_expunge(world):
    for i in range(6):
        world.append("alice@example.org", "Expunge", simple(f"e{i}"))
    r = world.connect()
    r.cmd(b"s SELECT Expunge")
    r.cmd(b"a STORE 2:3,5 +FLAGS.SILENT (\\Deleted)")
    resp = r.cmd(b"b EXPUNGE")
    # Descending order keeps each number valid when it is sent.
    assert resp[:3] == [b"* 5 EXPUNGE", b"* 3 EXPUNGE", b"* 2 EXPUNGE"], resp
    resp = r.cmd(b"c FETCH 1:* UID")
    assert [int(re.search(rb"UID (\d+)", line).group(1)) for line in resp[:-1]] == [1, 4, 6]
    r.cmd(b"d UID STORE 4,6 +FLAGS.SILENT (\\Deleted)")
    resp = r.cmd(b"e UID EXPUNGE 6")
    assert resp[0] == b"* 3 EXPUNGE" and tagged(resp).startswith(b"e OK")
    resp = r.cmd(b"f UID SEARCH DELETED")
    assert resp[0] == b"* SEARCH 4"
    assert tagged(r.cmd(b"f2 CHECK")).startswith(b"f2 OK")
    resp = r.cmd(b"g CLOSE")
    assert tagged(resp).startswith(b"g OK") and not resp[:-1]
    resp = r.cmd(b"h STATUS Expunge (MESSAGES)")
    assert b"MESSAGES 1" in resp[0]
    r.cmd(b"i SELECT Expunge")
    assert tagged(r.cmd(b"j UNSELECT")).startswith(b"j OK")
    assert tagged(r.cmd(b"k FETCH 1 UID")).startswith(b"k BAD")


def test_read_only_mailbox_refuses_changes(world):
    world.append("alice@example.org", "SelBox", simple("a"))
    r = world.connect()
    r.cmd(b"b EXAMINE SelBox")
    assert tagged(r.cmd(b"c STORE 1 +FLAGS (\\Flagged)")).startswith(b"c NO")
    assert tagged(r.cmd(b"d EXPUNGE")).startswith(b"d NO")
    assert tagged(r.cmd(b"e MOVE 1 INBOX")).startswith(b"e NO")

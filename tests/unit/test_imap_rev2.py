"""IMAP in memory: IMAP4rev2 (RFC 9051) beside IMAP4rev1. Each difference is checked in a session
that has not enabled IMAP4rev2 (rev1 behaviour, unchanged) and in one that has."""
from __future__ import annotations

import pytest

from tests.unit.imapkit import World, simple, tagged, world  # noqa: F401

USER = "alice@example.org"


def ok(c, line: bytes) -> list[bytes]:
    resp = c.cmd(line)
    assert tagged(resp).split(b" ")[1] == b"OK", resp
    return resp


def status_of(c, line: bytes) -> bytes:
    return tagged(c.cmd(line)).split(b" ")[1]


def rev2(c) -> None:
    resp = ok(c, b"e ENABLE IMAP4rev2")
    assert resp[0] == b"* ENABLED IMAP4rev2"


@pytest.fixture
def box(world: World):
    """Three new messages in INBOX (\\Recent for the first session that selects), 2 \\Seen."""
    for i in range(1, 4):
        world.append(USER, "INBOX", simple(f"m{i}"), flags=("\\Seen",) if i == 2 else ())
    return world


def test_capability_lists_both_revisions(world: World):
    c = world.connect()
    caps = ok(c, b"c CAPABILITY")[0].split()
    assert b"IMAP4rev1" in caps and b"IMAP4rev2" in caps
    assert caps.index(b"IMAP4rev1") < caps.index(b"IMAP4rev2")


def test_enable_reports_once_and_in_order(world: World):
    c = world.connect()
    resp = ok(c, b"e ENABLE CONDSTORE imap4rev2 X-UNKNOWN")
    assert resp[0] == b"* ENABLED CONDSTORE IMAP4rev2"
    assert ok(c, b"e2 ENABLE IMAP4rev2")[0] == b"* ENABLED"  # already on: nothing newly enabled
    assert c.proto.rev2


def test_select_rev1_then_rev2(box: World):
    c = box.connect()
    resp = ok(c, b"s SELECT INBOX")
    assert b"* 3 RECENT" in resp
    assert any(line.startswith(b"* OK [UNSEEN 1]") for line in resp)
    assert not any(line.startswith(b"* LIST") for line in resp)
    d = box.connect()
    rev2(d)
    resp = ok(d, b"s SELECT INBOX")
    assert not any(b"RECENT" in line for line in resp)
    assert not any(b"[UNSEEN" in line for line in resp)
    assert b'* LIST () "/" "INBOX"' in resp  # RFC 9051 §6.3.2
    assert any(line.startswith(b"* OK [UIDVALIDITY ") for line in resp)
    assert any(line.startswith(b"* OK [UIDNEXT 4]") for line in resp)
    assert b"* 3 EXISTS" in resp


def test_no_recent_flag_in_fetch_after_enable(box: World):
    c = box.connect()
    ok(c, b"s SELECT INBOX")
    assert b"\\Recent" in ok(c, b"f FETCH 1 FLAGS")[0]
    # Enabling in the selected state takes \Recent away at once.
    rev2(c)
    assert ok(c, b"f FETCH 1 FLAGS")[0] == b"* 1 FETCH (FLAGS ())"
    resp = ok(c, b"st STORE 1 +FLAGS (\\Flagged)")
    assert resp[0] == b"* 1 FETCH (FLAGS (\\Flagged))"


def test_new_messages_announced_without_recent(box: World):
    c = box.connect()
    rev2(c)
    ok(c, b"s SELECT INBOX")
    box.append(USER, "INBOX", simple("m4"))
    resp = ok(c, b"n NOOP")
    assert b"* 4 EXISTS" in resp and not any(b"RECENT" in line for line in resp)
    d = box.connect()
    ok(d, b"s SELECT INBOX")
    box.append(USER, "INBOX", simple("m5"))
    resp = ok(d, b"n NOOP")
    assert b"* 5 EXISTS" in resp and b"* 1 RECENT" in resp


def test_search_answers_esearch(box: World):
    c = box.connect()
    ok(c, b"s SELECT INBOX")
    assert ok(c, b"a SEARCH UNSEEN")[0] == b"* SEARCH 1 3"
    rev2(c)
    assert ok(c, b"a SEARCH UNSEEN")[0] == b'* ESEARCH (TAG "a") ALL 1,3'
    assert ok(c, b"b UID SEARCH ALL")[0] == b'* ESEARCH (TAG "b") UID ALL 1:3'
    # Nothing found: no ALL (RFC 9051 §7.3.4).
    resp = ok(c, b"c SEARCH DELETED")
    assert resp[0] == b'* ESEARCH (TAG "c")' and len(resp) == 2
    assert ok(c, b"d SEARCH RETURN (COUNT) ALL")[0] == b'* ESEARCH (TAG "d") COUNT 3'
    # SAVE alone still sends nothing, and $ works with the ESEARCH answers (RFC 9051 §6.4.4.1).
    resp = ok(c, b"e SEARCH RETURN (SAVE) SEEN")
    assert len(resp) == 1
    assert ok(c, b"f SEARCH $")[0] == b'* ESEARCH (TAG "f") ALL 2'
    assert not any(line.startswith(b"* SEARCH") for line in c.cmd(b"g SEARCH ALL"))


def test_search_recent_new_old_bad_in_rev2(box: World):
    c = box.connect()
    ok(c, b"s SELECT INBOX")
    for key in (b"RECENT", b"NEW", b"OLD", b"NOT (OR SEEN NEW)"):
        assert status_of(c, b"a SEARCH " + key) == b"OK"
    rev2(c)
    for key in (b"RECENT", b"NEW", b"OLD", b"NOT (OR SEEN NEW)"):
        assert status_of(c, b"a SEARCH " + key) == b"BAD"
        assert status_of(c, b"b SORT (DATE) UTF-8 " + key) == b"BAD"
        assert status_of(c, b"c THREAD REFERENCES UTF-8 " + key) == b"BAD"
    assert status_of(c, b"d SORT (DATE) UTF-8 ALL") == b"OK"


def test_status_recent_bad_in_rev2(box: World):
    c = box.connect()
    resp = ok(c, b"a STATUS INBOX (MESSAGES RECENT)")
    assert resp[0] == b'* STATUS "INBOX" (MESSAGES 3 RECENT 3)'
    rev2(c)
    assert status_of(c, b"a STATUS INBOX (MESSAGES RECENT)") == b"BAD"
    assert status_of(c, b'l LIST "" "*" RETURN (STATUS (RECENT))') == b"BAD"
    resp = ok(c, b"b STATUS INBOX (MESSAGES DELETED SIZE UIDNEXT)")
    assert resp[0].startswith(b'* STATUS "INBOX" (MESSAGES 3 DELETED 0 SIZE ')


def test_utf8_mailbox_names(world: World):
    name = "Entwürfe/Ärger".encode()
    c = world.connect()
    rev2(c)
    ok(c, b'a CREATE "' + name + b'"')
    resp = ok(c, b'l LIST "" "Entw*"')
    assert b'* LIST (\\Noselect \\HasChildren) "/" "Entw\xc3\xbcrfe"' in resp
    assert b'* LIST (\\HasNoChildren) "/" "' + name + b'"' in resp
    resp = ok(c, b'st STATUS "' + name + b'" (MESSAGES)')
    assert resp[0] == b'* STATUS "' + name + b'" (MESSAGES 0)'
    resp = ok(c, b's SELECT "' + name + b'"')
    assert b'* LIST () "/" "' + name + b'"' in resp
    # The same folder in a rev1 session: modified UTF-7 (RFC 3501 §5.1.3).
    d = world.connect()
    resp = ok(d, b'l LIST "" "Entw*"')
    assert b'* LIST (\\HasNoChildren) "/" "Entw&APw-rfe/&AMQ-rger"' in resp
    ok(d, b'x SELECT "Entw&APw-rfe/&AMQ-rger"')
    # In rev2 "&" is just a character: "&APw-" names another (missing) folder.
    assert status_of(c, b'x SELECT "Entw&APw-rfe"') == b"NO"
    ok(c, b'y CREATE "R&D"')
    assert b'* LIST (\\HasNoChildren) "/" "R&-D"' in ok(d, b'l LIST "" "R*"')
    assert b'* LIST (\\HasNoChildren) "/" "R&D"' in ok(c, b'l LIST "" "R*"')


def test_utf8_names_normalized_and_invalid(world: World):
    c = world.connect()
    rev2(c)
    decomposed = "Entwu\u0308rfe".encode()
    ok(c, b'a CREATE "' + decomposed + b'"')
    resp = ok(c, b'l LIST "" "Entw*"')
    assert b'* LIST (\\HasNoChildren) "/" "Entw\xc3\xbcrfe"' in resp  # NFC (RFC 9051 §5.1)
    resp = c.cmd(b'b CREATE "bad\xff"')
    assert tagged(resp).startswith(b"b NO [CANNOT]")


def test_append_copy_rename_utf8(box: World):
    c = box.connect()
    rev2(c)
    ok(c, "a CREATE Ablage".encode())
    ok(c, "r RENAME Ablage Ablage-ä".encode())
    msg = simple("x")
    resp = c.cmd(b'p APPEND "Ablage-\xc3\xa4" {%d+}\r\n' % len(msg) + msg)
    assert tagged(resp).startswith(b"p OK [APPENDUID")
    ok(c, b"s SELECT INBOX")
    assert tagged(ok(c, b'c COPY 1 "Ablage-\xc3\xa4"')).startswith(b"c OK [COPYUID")
    assert b"(MESSAGES 2)" in ok(c, b'st STATUS "Ablage-\xc3\xa4" (MESSAGES)')[0]


def test_list_nonexistent_and_children(world: World):
    c = world.connect()
    rev2(c)
    ok(c, b"a CREATE gone")
    ok(c, b"b SUBSCRIBE gone")
    ok(c, b"c DELETE gone")
    resp = ok(c, b'l LIST (SUBSCRIBED) "" "*"')
    assert b'* LIST (\\NonExistent \\Subscribed) "/" "gone"' in resp
    resp = ok(c, b'l LIST "" "*"')
    assert b'* LIST (\\HasNoChildren) "/" "INBOX"' in resp
    # LSUB is no IMAP4rev2 command, but a server that also speaks rev1 keeps answering it.
    assert b'* LSUB (\\Noselect) "/" "gone"' in ok(c, b'ls LSUB "" "*"')


def test_response_codes(world: World):
    c = world.connect()
    rev2(c)
    ok(c, b"a CREATE x")
    assert tagged(c.cmd(b"b CREATE x")).startswith(b"b NO [ALREADYEXISTS]")
    assert tagged(c.cmd(b"c CREATE inbox")).startswith(b"c NO [ALREADYEXISTS]")
    assert tagged(c.cmd(b"d DELETE nope")).startswith(b"d NO [NONEXISTENT]")
    assert tagged(c.cmd(b"e SELECT nope")).startswith(b"e NO [NONEXISTENT]")
    assert tagged(c.cmd(b"f STATUS nope (MESSAGES)")).startswith(b"f NO [NONEXISTENT]")
    assert tagged(c.cmd(b"g DELETE INBOX")).startswith(b"g NO [CANNOT]")


def test_select_twice_closed_and_uid_expunge(box: World):
    c = box.connect()
    rev2(c)
    ok(c, b"s SELECT INBOX")
    ok(c, b"st STORE 1 +FLAGS.SILENT (\\Deleted)")
    resp = ok(c, b"x UID EXPUNGE 1")
    assert resp[0] == b"* 1 EXPUNGE"
    resp = ok(c, b"s2 SELECT INBOX")
    assert resp[0].startswith(b"* OK [CLOSED]")


def test_delete_parent_only_name_haschildren(world: World):
    c = world.connect()
    ok(c, b"a CREATE p/q")
    assert tagged(c.cmd(b"b DELETE p")).startswith(b"b NO [NONEXISTENT]")
    rev2(c)
    assert tagged(c.cmd(b"b DELETE p")).startswith(b"b NO [HASCHILDREN]")  # RFC 9051 §6.3.5
    assert tagged(c.cmd(b"c DELETE nope")).startswith(b"c NO [NONEXISTENT]")


def test_select_denormalized_name_gets_oldname(world: World):
    c = world.connect()
    rev2(c)
    ok(c, "a CREATE Entwürfe".encode())
    decomposed = "Entwu\u0308rfe".encode()
    resp = ok(c, b'b SELECT "' + decomposed + b'"')
    assert b'* LIST () "/" "Entw\xc3\xbcrfe" ("OLDNAME" ("' + decomposed + b'"))' in resp
    resp = ok(c, b"c SELECT inbox")
    assert b'* LIST () "/" "INBOX"' in resp

"""IMAP in memory: SELECT and EXAMINE, and how a session learns of other sessions' changes
(refresh: EXPUNGE, FETCH FLAGS, EXISTS; docs/design/imap.md, "Selection and refresh")."""
from __future__ import annotations

import os
import re

import pytest

from tests.unit.imapkit import simple, tagged, world  # noqa: F401
from tests.unit.test_smtp_flood import captured_log


def test_select_and_examine_responses(world):
    world.append("alice@example.org", "SelBox", simple("a"), flags=("\\Seen",))
    world.append("alice@example.org", "SelBox", simple("b"))
    r = world.connect()
    resp = r.cmd(b"a SELECT SelBox")
    text = b"\n".join(resp)
    assert b"* 2 EXISTS" in text and re.search(rb"\* \d+ RECENT", text)
    assert b"* FLAGS (" in text and b"[PERMANENTFLAGS (" in text and b"\\*)" in text
    assert b"[UNSEEN 2]" in text and b"[UIDVALIDITY " in text and b"[UIDNEXT 3]" in text
    assert tagged(resp).startswith(b"a OK [READ-WRITE]")
    resp = r.cmd(b"b EXAMINE SelBox")
    assert tagged(resp).startswith(b"b OK [READ-ONLY]")
    assert tagged(r.cmd(b"c STORE 1 +FLAGS (\\Flagged)")).startswith(b"c NO")
    # A body fetch in EXAMINE does not set \Seen.
    r.cmd(b"d FETCH 2 BODY[]")
    resp = r.cmd(b"e FETCH 2 FLAGS")
    assert b"\\Seen" not in resp[0]
    assert tagged(r.cmd(b"f SELECT NoSuchBox")).startswith(b"f NO")
    assert tagged(r.cmd(b"g FETCH 1 FLAGS")).startswith(b"g BAD")  # failed SELECT deselects


def test_two_sessions_see_each_others_changes(world):
    for i in range(3):
        world.append("alice@example.org", "Shared", simple(f"s{i}"))
    a, b = world.connect(), world.connect()
    a.cmd(b"s SELECT Shared")
    b.cmd(b"s SELECT Shared")
    a.cmd(b"a STORE 2 +FLAGS (\\Flagged)")
    resp = b.cmd(b"b NOOP")
    assert any(re.match(rb"\* 2 FETCH \(.*FLAGS \(\\Flagged\)", line) for line in resp), resp
    a.cmd(b"c STORE 1 +FLAGS.SILENT (\\Deleted)")
    a.cmd(b"d EXPUNGE")
    msg = simple("new one")
    a.cmd(b"e APPEND Shared {%d+}\r\n" % len(msg) + msg)
    resp = b.cmd(b"f NOOP")
    assert b"* 1 EXPUNGE" in resp and b"* 3 EXISTS" in resp, resp
    assert resp.index(b"* 1 EXPUNGE") < resp.index(b"* 3 EXISTS")
    # No EXPUNGE during a non-UID FETCH (RFC 3501 §7.4.1), but after it.
    a.cmd(b"g STORE 1 +FLAGS.SILENT (\\Deleted)")
    a.cmd(b"h EXPUNGE")
    resp = b.cmd(b"i FETCH 1:3 UID")
    assert not [line for line in resp if line.endswith(b"EXPUNGE")]
    resp = b.cmd(b"j NOOP")
    assert b"* 1 EXPUNGE" in resp


@pytest.mark.parametrize("command", [b"LIST \"\" \"Nothing\"", b"CAPABILITY", b"NAMESPACE"])
def test_commands_without_mailbox_data_still_report_expunges(world, command):
    """REFRESH_AFTER: other sessions' changes are reported after these commands too."""
    for i in range(2):
        world.append("alice@example.org", "Shared", simple(f"s{i}"))
    a, b = world.connect(), world.connect()
    a.cmd(b"s SELECT Shared")
    b.cmd(b"s SELECT Shared")
    a.cmd(b"c STORE 1 +FLAGS.SILENT (\\Deleted)")
    a.cmd(b"d EXPUNGE")
    assert b"* 1 EXPUNGE" in b.cmd(b"x " + command)


def test_selected_folder_deleted_by_another_session(world):
    world.append("alice@example.org", "Doomed", simple("doomed"))
    r = world.connect()
    r.cmd(b"s SELECT Doomed")
    c = world.connect()
    assert tagged(c.cmd(b"x DELETE Doomed")).startswith(b"x OK")
    resp = []
    r.send(b"a NOOP\r\n")
    with pytest.raises(ConnectionError):
        while True:
            resp.append(r.line())
    assert resp and resp[0].startswith(b"* BYE"), resp


def test_empty_mailbox_star_ranges(world):
    r = world.connect()
    r.cmd(b"x CREATE Empty")
    r.cmd(b"s SELECT Empty")
    assert r.cmd(b"a FETCH 1:* FLAGS") == [b"a OK FETCH completed"]
    assert r.cmd(b"b UID FETCH 1:* FLAGS") == [b"b OK FETCH completed"]
    assert tagged(r.cmd(b"c FETCH 1 FLAGS")).startswith(b"c BAD")
    assert r.cmd(b"d SEARCH ALL")[0] == b"* SEARCH"


def test_delivery_to_new_is_recent_and_announced_on_noop(world):
    r = world.connect()
    resp = r.cmd(b"s SELECT INBOX")
    assert b"* 0 EXISTS" in resp
    world.deliver("alice@example.org", simple("fresh"))
    resp = r.cmd(b"a NOOP")
    assert resp[:2] == [b"* 1 EXISTS", b"* 1 RECENT"], resp


def test_a_message_listed_below_a_uid_already_shown_stays_out_of_the_view(world):
    """Should the store ever list a message below a UID the client has seen (its file was
    out of cur/ while the session looked), showing it would shift every sequence number after
    it under the client: the session leaves it out and says so in the log."""
    for i in range(4):
        world.append("alice@example.org", "INBOX", simple(f"m{i}"))
    cur = os.path.join(world.maildir("alice@example.org"), "cur")
    third = sorted(os.listdir(cur))[2]
    aside = os.path.join(world.maildir("alice@example.org"), third)
    os.rename(os.path.join(cur, third), aside)
    r = world.connect()
    assert b"* 3 EXISTS" in r.cmd(b"s SELECT INBOX")
    os.rename(aside, os.path.join(cur, third))
    world.append("alice@example.org", "INBOX", simple("m4"))
    with captured_log() as events:
        resp = r.cmd(b"n NOOP")
    assert b"* 4 EXISTS" in resp, resp
    uids = [int(m.group(1)) for line in r.cmd(b"f FETCH 1:* UID")
            if (m := re.match(rb"\* \d+ FETCH \(UID (\d+)\)", line))]
    assert uids == [1, 2, 4, 5]
    assert [e["uids"] for e in events if "left out of its view" in e.get("log_format", "")] \
        == [[3]]

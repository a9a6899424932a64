"""IMAP in memory: what imaptest's base groups and stress profile check (docs/design/imap.md,
"Conformance"): \\Recent, * FLAGS before new keywords, section numbers below message/rfc822,
ENVELOPE groups, address SEARCH, LIST-EXTENDED and LSUB parents, MOVE into the same folder,
and expunged messages that stay readable until the EXPUNGE is announced."""
from __future__ import annotations

import os
import re

from mailsuite.imap import message as mime
from tests.unit.imapkit import fetch_data, simple, tagged, world  # noqa: F401

ALICE = "alice@example.org"


def test_recent_is_claimed_by_the_first_read_write_select_only(world):
    r = world.connect()
    r.cmd(b"a CREATE Rec")
    for i in range(2):
        assert tagged(r.cmd(b"b APPEND Rec {%d+}\r\n" % len(simple(f"r{i}")) + simple(f"r{i}"))
                      ).startswith(b"b OK")
    assert b"* 2 RECENT" in r.cmd(b"c EXAMINE Rec")  # EXAMINE shows, does not take
    r.cmd(b"d CLOSE")
    assert b'* STATUS "Rec" (RECENT 2)' in r.cmd(b"e STATUS Rec (RECENT)")
    assert b"* 2 RECENT" in r.cmd(b"f SELECT Rec")
    assert b"* SEARCH 1 2" in r.cmd(b"g SEARCH RECENT")
    assert b"* SEARCH" in r.cmd(b"h SEARCH OLD") and b"* SEARCH 1" not in r.cmd(b"h SEARCH OLD")
    other = world.connect()
    assert b"* 0 RECENT" in other.cmd(b"a SELECT Rec")  # the first SELECT took them
    # A COPY into the selected folder is \Recent for this session at the next NOOP.
    other.cmd(b"b COPY 1 Rec")
    resp = other.cmd(b"c NOOP")
    assert b"* 3 EXISTS" in resp and b"* 1 RECENT" in resp
    r.cmd(b"i CLOSE")
    assert b'* STATUS "Rec" (RECENT 0)' in r.cmd(b"j STATUS Rec (RECENT)")


def test_new_keyword_is_announced_in_flags_before_a_fetch_shows_it(world):
    world.append(ALICE, "Kw", simple("k"))
    a, b = world.connect(), world.connect()
    a.cmd(b"a SELECT Kw")
    b.cmd(b"a SELECT Kw")
    resp = a.cmd(b"b STORE 1 +FLAGS ($Hello)")
    assert resp[0].startswith(b"* FLAGS (") and b"$Hello" in resp[0]
    assert resp[1].startswith(b"* OK [PERMANENTFLAGS (") and b"$Hello" in resp[1]
    assert resp[2].startswith(b"* 1 FETCH")
    resp = b.cmd(b"b NOOP")  # the other session hears of it the same way
    flags = [i for i, line in enumerate(resp) if line.startswith(b"* FLAGS")]
    fetch = [i for i, line in enumerate(resp) if line.startswith(b"* 1 FETCH")]
    assert flags and fetch and flags[0] < fetch[0], resp
    assert b"* FLAGS" not in b"".join(a.cmd(b"c STORE 1 +FLAGS ($Hello)"))  # known already


NESTED = (b"From: outer@example.org\r\nSubject: outer\r\nMIME-Version: 1.0\r\n"
          b"Content-Type: message/rfc822\r\n\r\n"
          b"From: inner@example.org\r\nSubject: inner\r\n\r\nHello world\r\n")


def test_sections_of_a_message_rfc822_at_the_top():
    root = mime.parse(NESTED)
    inner = NESTED[NESTED.index(b"From: inner"):]

    def sect(path, text=None, names=None):
        piece = mime.section(NESTED, root, path, text, names)
        if isinstance(piece, tuple):
            return NESTED[piece[0]:piece[0] + piece[1]]
        return piece
    assert sect([1]) == inner  # part 1 of a non-multipart message: its whole body
    assert sect([1], b"HEADER") == b"From: inner@example.org\r\nSubject: inner\r\n\r\n"
    assert sect([1], b"TEXT") == b"Hello world\r\n"
    assert sect([1], b"HEADER.FIELDS", [b"SUBJECT"]) == b"Subject: inner\r\n\r\n"
    assert sect([1, 1]) == b"Hello world\r\n"


def test_envelope_groups_comments_and_routes():
    def env(value: bytes) -> bytes:
        return mime.serialize(mime.addresses(value))
    assert env(b"group: g1@d1.org, g2@d2.org;, group2: g3@d3.org;") == (
        b'((NIL NIL "group" NIL) (NIL NIL "g1" "d1.org") (NIL NIL "g2" "d2.org") '
        b'(NIL NIL NIL NIL) (NIL NIL "group2" NIL) (NIL NIL "g3" "d3.org") (NIL NIL NIL NIL))')
    assert env(b"group:;, group2: (foo) ;") == (
        b'((NIL NIL "group" NIL) (NIL NIL NIL NIL) (NIL NIL "group2" NIL) (NIL NIL NIL NIL))')
    assert env(b"user@domain (Real Name)") == b'(("Real Name" NIL "user" "domain"))'
    assert env(b"<@route:user@domain>") == b'((NIL "@route" "user" "domain"))'
    assert env(b'"Doe, John" <j@x.org>, b@c') == b'(("Doe, John" NIL "j" "x.org") (NIL NIL "b" "c"))'


def test_search_from_finds_an_address_with_comments_inside(world):
    world.append(ALICE, "Addr", simple("plain"))
    world.append(ALICE, "Addr", b"From: <user-from (comment)@ (comment) domain.org>\r\n"
                 b"Subject: x\r\n\r\nbody\r\n")
    r = world.connect()
    r.cmd(b"a SELECT Addr")
    assert b"* SEARCH 2" in r.cmd(b"b SEARCH FROM user-from@domain.org")


def test_list_extended_errors_childinfo_and_lsub_parents(world):
    r = world.connect()
    for name in (b"P/a", b"P/b/c", b"P/d"):
        r.cmd(b"x CREATE " + name)
    r.cmd(b"y SUBSCRIBE P/a")
    r.cmd(b"y SUBSCRIBE P/b/c")
    assert tagged(r.cmd(b'a LIST (RECURSIVEMATCH) "" "*"')).startswith(b"a BAD")
    assert tagged(r.cmd(b'a LIST (RECURSIVEMATCH REMOTE) "" "*"')).startswith(b"a BAD")
    assert tagged(r.cmd(b'b LIST "" "*" RETURN (BOGUS)')).startswith(b"b BAD")
    resp = r.cmd(b'c LIST (SUBSCRIBED RECURSIVEMATCH) "" "P/%"')
    assert b'* LIST (\\HasNoChildren \\Subscribed) "/" "P/a"' in resp
    assert [line for line in resp if b'"P/b"' in line] == \
        [b'* LIST (\\NonExistent) "/" "P/b" (CHILDINFO ("SUBSCRIBED"))']  # only a path
    assert not [line for line in resp if b'"P/d"' in line]
    resp = r.cmd(b'd LSUB "" "P/%"')
    assert b'* LSUB (\\Noselect) "/" "P/b"' in resp
    assert [line for line in resp if line.endswith(b'"P/a"')]


def test_move_into_the_same_folder_gives_a_new_uid(world):
    world.append(ALICE, "Same", simple("m"))
    r = world.connect()
    r.cmd(b"a SELECT Same")
    resp = r.cmd(b"b MOVE 1 Same")
    assert any(re.match(rb"\* OK \[COPYUID \d+ 1 2\]", line) for line in resp), resp
    assert b"* 1 EXPUNGE" in resp and b"* 1 EXISTS" in resp
    assert b"UID 2" in b"".join(r.cmd(b"c FETCH 1 UID"))


def test_expunged_message_stays_readable_until_the_expunge_is_announced(world):
    for i in range(3):
        world.append(ALICE, "Shared", simple(f"s{i}", body=f"needle{i}\r\n"))
    a, b = world.connect(), world.connect()
    a.cmd(b"a SELECT Shared")
    b.cmd(b"a SELECT Shared")
    a.cmd(b"b STORE 2 +FLAGS.SILENT (\\Deleted)")
    assert b"* 2 EXPUNGE" in a.cmd(b"c EXPUNGE")
    tmp = os.path.join(world.maildir(ALICE, "Shared"), "tmp")
    assert [n for n in os.listdir(tmp) if n.startswith("expunged.")]
    # b has not been told (no EXPUNGE during FETCH/SEARCH, RFC 3501 §7.4.1): all of it is there.
    resp = b.cmd(b"b FETCH 2 (BODY.PEEK[TEXT])")
    assert fetch_data(resp)[2][b"BODY[TEXT]"] == b"needle1\r\n"
    assert b"* SEARCH 1 2 3" in b.cmd(b"c SEARCH BODY needle")
    assert b"* SEARCH 2" in b.cmd(b"d SEARCH SUBJECT s1")
    assert b"* 2 EXPUNGE" in b.cmd(b"e NOOP")
    # Announced to every session that showed it: the held file goes at the next sync.
    a.cmd(b"f NOOP")
    assert not [n for n in os.listdir(tmp) if n.startswith("expunged.")]


def test_a_closed_selection_gives_its_held_messages_back(world):
    world.append(ALICE, "Gone", simple("g"))
    a, b = world.connect(), world.connect()
    a.cmd(b"a SELECT Gone")
    b.cmd(b"a SELECT Gone")
    a.cmd(b"b STORE 1 +FLAGS.SILENT (\\Deleted)")
    a.cmd(b"c EXPUNGE")
    tmp = os.path.join(world.maildir(ALICE, "Gone"), "tmp")
    assert [n for n in os.listdir(tmp) if n.startswith("expunged.")]
    b.cmd(b"b SELECT INBOX")  # never announced, but the selection is over
    world.append(ALICE, "Gone", simple("h"))  # the next sync of the folder drops it
    a.cmd(b"d NOOP")
    assert not [n for n in os.listdir(tmp) if n.startswith("expunged.")]


def test_search_strings_match_decomposed_text_and_cut_characters(world):
    # imaptest searches for byte substrings of Dovecot's decomposed upper-case form, cutting
    # characters in half: `u` is found in `ü`, and so is half of the UTF-8 of `ß`.
    world.append(ALICE, "Uni", simple("=?utf-8?q?Gr=C3=BC=C3=9Fe?= alle"))
    r = world.connect()
    r.cmd(b"a SELECT Uni")
    for needle in (b"GRU", "grüß".encode(), b"\xcc\x88", b"\xcc\x88\xc3"):
        resp = r.cmd(b"b SEARCH CHARSET UTF-8 SUBJECT {%d+}\r\n" % len(needle) + needle)
        assert b"* SEARCH 1" in resp, (needle, resp)
    assert b"* SEARCH 1" not in r.cmd(b"c SEARCH SUBJECT xyz")


def test_search_body_also_finds_part_headers_and_the_stored_encoding(world):
    msg = (b"From: a@example.org\r\nSubject: qp\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n"
           b"Content-Type: text/plain; charset=\"utf-8\"\r\n"
           b"Content-Transfer-Encoding: quoted-printable\r\n\r\nsoft=\r\nbreak caf=C3=A9\r\n--XX--\r\n")
    world.append(ALICE, "Qp", msg)
    r = world.connect()
    r.cmd(b"a SELECT Qp")
    for needle in (b'"softbreak"', "café".encode(), b'"charset=\\"utf"', b'"caf=C3"'):
        resp = r.cmd(b"b SEARCH CHARSET UTF-8 BODY {%d+}\r\n" % len(needle) + needle
                     if not needle.startswith(b'"') else b"b SEARCH BODY " + needle)
        assert b"* SEARCH 1" in resp, (needle, resp)

"""IMAP in memory: SEARCH and UID SEARCH (selected state): every search key, CHARSET with
literals, and Message-ID look-ups as Thunderbird sends them."""
from __future__ import annotations

import calendar
import os
import datetime

import pytest

from tests.unit.imapkit import World, simple, tagged, world  # noqa: F401


@pytest.fixture(scope="module")
def search_world(tmp_path_factory) -> World:
    """One SearchBox for every test here: SEARCH changes nothing, so they may share it (the
    \\Recent flags, which SELECT takes, are taken once here)."""
    w = World(str(tmp_path_factory.mktemp("search")))
    add = w.append
    jan10 = calendar.timegm(datetime.datetime(2025, 1, 10, 12, 0).timetuple())
    add("alice@example.org", "SearchBox", simple("first apple", body="The quick brown fox\r\n"),
        flags=("\\Seen",), date=jan10)
    add("alice@example.org", "SearchBox",
        simple("second =?UTF-8?Q?Gr=C3=BC=C3=9Fe?=", body="lazy dog\r\n", extra="Cc: carol@example.org\r\n"),
        flags=("\\Flagged",))
    big = simple("third", body="x" * 5000 + "\r\n").replace(b"Date: Mon, 02 Feb 2026", b"Date: Sun, 01 Mar 2026")
    add("alice@example.org", "SearchBox", big, flags=("\\Deleted", "$Label1"))
    add("alice@example.org", "SearchBox",
        simple("fourth", body="Größe im Text\r\n",
               extra="Content-Type: text/plain; charset=utf-8\r\n"
                     "Content-Transfer-Encoding: quoted-printable\r\n")
        .replace(b"Gr\xc3\xb6\xc3\x9fe im Text", b"Gr=C3=B6=C3=9Fe im Text"))
    # The first session to select a folder takes its \Recent messages (RFC 3501 §2.3.2): one
    # does so now, so that NEW, OLD and RECENT mean the same in every test, whatever the order.
    _search_box(w).cmd(b"z LOGOUT")
    return w


def _search_box(w: World):
    r = w.connect()
    r.cmd(b"s SELECT SearchBox")
    return r


@pytest.mark.parametrize("criteria,expected", [
    ("ALL", [1, 2, 3, 4]),
    ("SEEN", [1]), ("UNSEEN", [2, 3, 4]), ("FLAGGED", [2]), ("DELETED", [3]), ("UNDELETED", [1, 2, 4]),
    ("KEYWORD $Label1", [3]), ("UNKEYWORD $Label1", [1, 2, 4]),
    ("FROM sender@remote", [1, 2, 3, 4]), ("SUBJECT apple", [1]), ("SUBJECT APPLE", [1]),
    ("TO alice", [1, 2, 3, 4]), ("CC carol", [2]), ("BODY fox", [1]), ("TEXT lazy", [2]),
    ("TEXT second", [2]), ("HEADER Message-ID <third@remote.example>", [3]),
    ("LARGER 3000", [3]), ("SMALLER 3000", [1, 2, 4]),
    ("SENTSINCE 1-Mar-2026", [3]), ("SENTBEFORE 1-Mar-2026", [1, 2, 4]), ("SENTON 2-Feb-2026", [1, 2, 4]),
    ("BEFORE 1-Jan-2026", [1]), ("SINCE 1-Jan-2026", [2, 3, 4]), ("ON 10-Jan-2025", [1]),
    ("OR SEEN FLAGGED", [1, 2]), ("NOT SEEN", [2, 3, 4]), ("NOT (OR SEEN FLAGGED)", [3, 4]),
    ("(SEEN) (SUBJECT apple)", [1]), ("2:3", [2, 3]), ("UID 1,4", [1, 4]), ("1:* NOT 2", [1, 3, 4]),
    ("OR (SUBJECT first) (OR BODY dog LARGER 4000)", [1, 2, 3]),
    ("UNFLAGGED", [1, 3, 4]), ("ANSWERED", []), ("UNANSWERED", [1, 2, 3, 4]), ("DRAFT", []),
    ("UNDRAFT", [1, 2, 3, 4]), ("OLD", [1, 2, 3, 4]), ("NEW", []), ("RECENT", []),
    ("HEADER X-Absent \"\"", []), ("HEADER Cc \"\"", [2]), ("*", [4]), ("UID *", [4]),
])
def test_search_keys(search_world, criteria, expected):
    r = _search_box(search_world)
    resp = r.cmd(b"a SEARCH " + criteria.encode())
    assert tagged(resp).startswith(b"a OK"), resp
    assert sorted(int(n) for n in resp[0].split()[2:]) == expected


def test_search_header_message_id_and_uid_search(search_world):
    """Thunderbird finds its saved copies with UID SEARCH HEADER Message-ID."""
    r = _search_box(search_world)
    resp = r.cmd(b"a UID SEARCH HEADER Message-ID <fourth@remote.example>")
    assert tagged(resp).startswith(b"a OK") and resp[0].split()[2:] == [b"4"]


def test_search_charset_utf8_with_literal(search_world):
    """CHARSET UTF-8 SUBJECT {n} gets a continuation and matches decoded words."""
    r = _search_box(search_world)
    term = "grüße".encode()
    r.send(b"a SEARCH CHARSET UTF-8 SUBJECT {%d}\r\n" % len(term))
    assert r.line().startswith(b"+")
    r.send(term + b"\r\n")
    resp = r.response(b"a")
    assert resp[0] == b"* SEARCH 2", resp
    term = "größe".encode()
    resp = r.cmd(b"b UID SEARCH CHARSET UTF-8 BODY {%d+}\r\n" % len(term) + term)
    assert resp[0] == b"* SEARCH 4", resp
    assert tagged(r.cmd(b"c SEARCH CHARSET KOI8-Q ALL")).startswith(b"c NO [BADCHARSET")
    assert tagged(r.cmd(b"d SEARCH FROBNICATE")).startswith(b"d BAD")


def test_search_in_an_empty_mailbox(world):
    r = world.connect()
    r.cmd(b"s SELECT Trash")
    assert r.cmd(b"d SEARCH ALL")[0] == b"* SEARCH"


def test_a_message_expunged_by_another_process_gives_expungeissued(world):
    """Its file is gone before the session was told (RFC 2180 §4.1): the body cannot be
    searched, and the tagged OK says so (RFC 5530 EXPUNGEISSUED), as Dovecot's does."""
    for n in range(3):
        world.append("alice@example.org", "INBOX", simple(f"m{n}", body="needle\r\n"))
    r = world.connect()
    r.cmd(b"s SELECT INBOX")
    cur = os.path.join(world.maildir("alice@example.org"), "cur")
    os.unlink(os.path.join(cur, sorted(os.listdir(cur))[1]))  # another process's EXPUNGE
    resp = r.cmd(b"b SEARCH BODY needle")
    assert resp[0] == b"* SEARCH 1 3"
    assert tagged(resp).startswith(b"b OK [EXPUNGEISSUED]")
    resp = r.cmd(b"c SEARCH BODY needle")  # told nothing yet: the same
    assert tagged(resp).startswith(b"c OK [EXPUNGEISSUED]")
    assert tagged(r.cmd(b"d SEARCH ALL")) == b"d OK SEARCH completed"  # no file read

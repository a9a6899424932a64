"""IMAP in memory: the search extensions over the wire: ESEARCH (RFC 4731), SEARCHRES (RFC 5182),
WITHIN (RFC 5032), SORT and SORT=DISPLAY (RFC 5256, RFC 5957), THREAD (RFC 5256)."""
from __future__ import annotations

import time

import pytest

from mailsuite.imap import search as searchmod
from tests.unit.imapkit import World, tagged, world  # noqa: F401

USER = "alice@example.org"


def msg(subject: str, frm: str, date: str, mid: str, refs: str = "", size_pad: int = 0) -> bytes:
    extra = f"References: {refs}\r\n" if refs else ""
    return (f"From: {frm}\r\nTo: alice@example.org\r\nSubject: {subject}\r\nDate: {date}\r\n"
            f"Message-ID: {mid}\r\n{extra}\r\nbody{'x' * size_pad}\r\n").encode()


@pytest.fixture
def box(world: World):
    """Six messages in INBOX, selected: 2, 4 and 6 \\Seen."""
    now = time.time()
    data = [
        msg("Re: beta", "Carol <carol@c.example>", "Tue, 03 Feb 2026 10:00:00 +0000", "<m1@x>", "<m2@x>"),
        msg("beta", "alice@a.example", "Mon, 02 Feb 2026 10:00:00 +0000", "<m2@x>", size_pad=100),
        msg("[list] alpha", "Bob <bob@b.example>", "Wed, 04 Feb 2026 10:00:00 +0000", "<m3@x>"),
        msg("Fwd: alpha", "dave@d.example", "Thu, 05 Feb 2026 10:00:00 +0000", "<m4@x>", size_pad=50),
        msg("gamma", "eve@e.example", "Fri, 06 Feb 2026 10:00:00 +0000", "<m5@x>", "<m4@x>"),
        msg("delta", "frank@f.example", "Sat, 07 Feb 2026 10:00:00 +0000", "<m6@x>"),
    ]
    for i, d in enumerate(data, 1):
        # INTERNALDATE: message i arrived (7 - i) days ago.
        world.append(USER, "INBOX", d, flags=("\\Seen",) if i % 2 == 0 else (),
                     date=now - (7 - i) * 86400)
    c = world.connect()
    assert tagged(c.cmd(b"s SELECT INBOX")).startswith(b"s OK")
    return c


def untagged(resp: list[bytes], prefix: bytes) -> list[bytes]:
    return [line for line in resp if line.startswith(prefix)]


def ok(c, line: bytes) -> list[bytes]:
    resp = c.cmd(line)
    assert tagged(resp).split(b" ")[1] == b"OK", resp
    return resp


def test_capabilities_advertised(world):
    caps = world.connect().cmd(b"c CAPABILITY")[0].split()
    for cap in (b"ESEARCH", b"SEARCHRES", b"WITHIN", b"SORT", b"SORT=DISPLAY", b"THREAD=ORDEREDSUBJECT",
                b"THREAD=REFERENCES"):
        assert cap in caps


@pytest.mark.parametrize("options,expected", [
    (b"(MIN)", b'* ESEARCH (TAG "a") MIN 1'),
    (b"(MAX)", b'* ESEARCH (TAG "a") MAX 5'),
    (b"(COUNT)", b'* ESEARCH (TAG "a") COUNT 3'),
    (b"(ALL)", b'* ESEARCH (TAG "a") ALL 1,3,5'),
    (b"()", b'* ESEARCH (TAG "a") ALL 1,3,5'),
    (b"(MIN MAX COUNT)", b'* ESEARCH (TAG "a") MIN 1 MAX 5 COUNT 3'),
])
def test_esearch(box, options, expected):
    resp = ok(box, b"a SEARCH RETURN " + options + b" UNSEEN")
    assert untagged(resp, b"* ") == [expected]


def test_esearch_uid_and_empty(box):
    resp = ok(box, b"a UID SEARCH RETURN (ALL COUNT) 2:4")
    assert untagged(resp, b"* ESEARCH") == [b'* ESEARCH (TAG "a") UID ALL 2:4 COUNT 3']
    resp = ok(box, b"b SEARCH RETURN (MIN MAX ALL) 1000")
    assert untagged(resp, b"* ESEARCH") == [b'* ESEARCH (TAG "b")']
    resp = ok(box, b"c UID SEARCH RETURN (COUNT) UID 1000")
    assert untagged(resp, b"* ESEARCH") == [b'* ESEARCH (TAG "c") UID COUNT 0']


@pytest.mark.parametrize("line", [b"a SEARCH RETURN (BOGUS) ALL", b"a SEARCH RETURN ALL",
                                  b"a SEARCH RETURN", b"a SEARCH $,1", b"a FETCH $,1 FLAGS",
                                  b"a SEARCH OLDER 0", b"a SEARCH YOUNGER x"])
def test_bad_syntax(box, line):
    assert tagged(box.cmd(line)).startswith(b"a BAD")


def test_searchres_save_and_use(box):
    # RFC 5182 §2.1: SAVE alone sends no ESEARCH; "$" then names the saved messages.
    resp = ok(box, b"a SEARCH RETURN (SAVE) UNSEEN")
    assert untagged(resp, b"* ") == []
    resp = ok(box, b"b FETCH $ (UID)")
    assert untagged(resp, b"* ") == [b"* 1 FETCH (UID 1)", b"* 3 FETCH (UID 3)", b"* 5 FETCH (UID 5)"]
    resp = ok(box, b"c UID FETCH $ (FLAGS)")
    assert len(untagged(resp, b"* ")) == 3
    ok(box, b"d STORE $ +FLAGS.SILENT (\\Flagged)")
    assert untagged(ok(box, b"e SEARCH FLAGGED"), b"* SEARCH") == [b"* SEARCH 1 3 5"]
    # "$" in SEARCH, with and without UID; SAVE and "$" in one command uses the old value.
    assert untagged(ok(box, b"f SEARCH $ SUBJECT beta"), b"* SEARCH") == [b"* SEARCH 1"]
    assert untagged(ok(box, b"g UID SEARCH UID $"), b"* SEARCH") == [b"* SEARCH 1 3 5"]
    resp = ok(box, b"h SEARCH RETURN (SAVE ALL) NOT $")
    assert untagged(resp, b"* ESEARCH") == [b'* ESEARCH (TAG "h") ALL 2,4,6']
    assert untagged(ok(box, b"i SEARCH $"), b"* SEARCH") == [b"* SEARCH 2 4 6"]


def test_searchres_min_max_saves_only_those(box):
    resp = ok(box, b"a SEARCH RETURN (SAVE MIN) UNSEEN")
    assert untagged(resp, b"* ESEARCH") == [b'* ESEARCH (TAG "a") MIN 1']
    assert untagged(ok(box, b"b SEARCH $"), b"* SEARCH") == [b"* SEARCH 1"]
    ok(box, b"c SEARCH RETURN (SAVE MIN MAX) UNSEEN")
    assert untagged(ok(box, b"d SEARCH $"), b"* SEARCH") == [b"* SEARCH 1 5"]
    ok(box, b"e SEARCH RETURN (SAVE MIN COUNT) UNSEEN")
    assert untagged(ok(box, b"f SEARCH $"), b"* SEARCH") == [b"* SEARCH 1 3 5"]


def test_searchres_copy_move_expunge(box, world):
    ok(box, b"a CREATE Other")
    ok(box, b"b UID SEARCH RETURN (SAVE) SEEN")
    assert b"COPYUID" in tagged(ok(box, b"c COPY $ Other"))
    resp = ok(box, b"d MOVE $ Other")
    assert untagged(resp, b"* ") [-3:] == [b"* 6 EXPUNGE", b"* 4 EXPUNGE", b"* 2 EXPUNGE"]
    # The moved messages left the selected folder, and "$" with them (RFC 5182 §2.1).
    assert untagged(ok(box, b"e FETCH $ (UID)"), b"* ") == []
    assert untagged(ok(box, b"f STATUS Other (MESSAGES)"), b"* STATUS") == [b"* STATUS \"Other\" (MESSAGES 6)"]
    ok(box, b"g SEARCH RETURN (SAVE) 1")
    ok(box, b"h STORE $ +FLAGS (\\Deleted)")
    resp = ok(box, b"i UID EXPUNGE $")
    assert untagged(resp, b"* ") == [b"* 1 EXPUNGE"]


def test_searchres_failed_search_and_select_reset(box):
    ok(box, b"a SEARCH RETURN (SAVE) ALL")
    assert tagged(box.cmd(b"b SEARCH RETURN (SAVE) NOSUCHKEY")).startswith(b"b BAD")
    assert untagged(ok(box, b"c SEARCH $"), b"* SEARCH") == [b"* SEARCH"]
    ok(box, b"d SEARCH RETURN (SAVE) ALL")
    ok(box, b"e SELECT INBOX")
    assert untagged(ok(box, b"f FETCH $ (UID)"), b"* ") == []
    assert untagged(ok(box, b"g SEARCH $"), b"* SEARCH") == [b"* SEARCH"]


def test_within(box, monkeypatch):
    assert untagged(ok(box, b"a SEARCH YOUNGER 216000"), b"* SEARCH") == [b"* SEARCH 5 6"]  # 2.5 days
    assert untagged(ok(box, b"b SEARCH OLDER 216000"), b"* SEARCH") == [b"* SEARCH 1 2 3 4"]
    monkeypatch.setattr(searchmod, "now", lambda: time.time() + 86400)
    assert untagged(ok(box, b"c SEARCH YOUNGER 216000"), b"* SEARCH") == [b"* SEARCH 6"]


@pytest.mark.parametrize("criteria,expected", [
    (b"(ARRIVAL)", b"1 2 3 4 5 6"),
    (b"(REVERSE ARRIVAL)", b"6 5 4 3 2 1"),
    (b"(DATE)", b"2 1 3 4 5 6"),
    (b"(SUBJECT)", b"3 4 1 2 6 5"),
    (b"(SUBJECT REVERSE DATE)", b"4 3 1 2 6 5"),
    (b"(FROM)", b"2 3 1 4 5 6"),
    (b"(DISPLAYFROM)", b"2 3 1 4 5 6"),
    (b"(REVERSE SIZE)", b"2 4 1 5 3 6"),
    (b"(TO SIZE)", b"6 3 5 1 4 2"),
    (b"(CC)", b"1 2 3 4 5 6"),
])
def test_sort(box, criteria, expected):
    resp = ok(box, b"a SORT " + criteria + b" UTF-8 ALL")
    assert untagged(resp, b"* SORT") == [b"* SORT " + expected]


def test_sort_with_search_keys_and_uid(box):
    assert untagged(ok(box, b"a SORT (SUBJECT) US-ASCII UNSEEN"), b"* SORT") == [b"* SORT 3 1 5"]
    ok(box, b"b STORE 1 +FLAGS (\\Deleted)")
    ok(box, b"c EXPUNGE")
    assert untagged(ok(box, b"d UID SORT (DATE) UTF-8 ALL"), b"* SORT") == [b"* SORT 2 3 4 5 6"]
    assert untagged(ok(box, b"e SORT (DATE) UTF-8 ALL"), b"* SORT") == [b"* SORT 1 2 3 4 5"]
    assert untagged(ok(box, b"f SORT (DATE) UTF-8 1000"), b"* SORT") == [b"* SORT"]


@pytest.mark.parametrize("line,answer", [
    (b"a SORT (SUBJECT) KOI8-R ALL", b"a NO [BADCHARSET"),
    (b"a SORT (NOPE) UTF-8 ALL", b"a BAD"),
    (b"a SORT SUBJECT UTF-8 ALL", b"a BAD"),
    (b"a SORT (SUBJECT) UTF-8", b"a BAD"),
    (b"a SORT (REVERSE) UTF-8 ALL", b"a BAD"),
    (b"a THREAD NOPE UTF-8 ALL", b"a BAD"),
    (b"a THREAD REFERENCES UTF-8", b"a BAD"),
    (b"a THREAD REFERENCES KOI8-R ALL", b"a NO [BADCHARSET"),
])
def test_sort_thread_errors(box, line, answer):
    assert tagged(box.cmd(line)).startswith(answer)


def test_sort_thread_need_a_selected_mailbox(world):
    c = world.connect()
    assert tagged(c.cmd(b"a SORT (DATE) UTF-8 ALL")).startswith(b"a BAD")
    assert tagged(c.cmd(b"b THREAD REFERENCES UTF-8 ALL")).startswith(b"b BAD")


def test_thread(box):
    resp = ok(box, b"a THREAD REFERENCES UTF-8 ALL")
    # 2 <- 1 and 4 <- 5 by References; 4 ("Fwd: alpha", a forward) goes under 3 ("[list]
    # alpha") by base subject.
    assert untagged(resp, b"* THREAD") == [b"* THREAD (2 1)(3 4 5)(6)"]
    resp = ok(box, b"b THREAD ORDEREDSUBJECT UTF-8 ALL")
    assert untagged(resp, b"* THREAD") == [b"* THREAD (2 1)(3 4)(5)(6)"]
    # Without 2, 1's parent is a dummy with one child: 1 becomes a root.
    resp = ok(box, b"c UID THREAD REFERENCES UTF-8 NOT 2")
    assert untagged(resp, b"* THREAD") == [b"* THREAD (1)(3 4 5)(6)"]
    resp = ok(box, b"d THREAD REFERENCES UTF-8 1000")
    assert untagged(resp, b"* THREAD") == [b"* THREAD"]

"""FETCH's batch formatter (`_write_fast`) writes exactly the bytes of the general one
(`_write_batch`) for the same items, over varied flags, keywords, \\Recent, sizes, dates and
header sections (docs/design/imap.md, "FETCH")."""
from __future__ import annotations

import random

import pytest

from mailsuite.imap.fetch import INDEX_ITEMS, FetchCommand, compute_batch
from mailsuite.imap.parser import FetchAtt, fetch_atts, tokenize

from tests.unit.imapkit import world  # noqa: F401

ITEM_SETS = [
    b"(UID FLAGS RFC822.SIZE)",
    b"(FLAGS)",
    b"(UID FLAGS RFC822.SIZE INTERNALDATE)",
    b"FAST",
    b"(BODY.PEEK[HEADER])",
    b"(UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS (FROM TO CC BCC SUBJECT DATE MESSAGE-ID "
    b"PRIORITY X-PRIORITY REFERENCES NEWSGROUPS IN-REPLY-TO CONTENT-TYPE REPLY-TO)])",
    b"(BODY.PEEK[HEADER]<0.9> FLAGS BODY.PEEK[HEADER]<3.4> RFC822.HEADER)",
    b"(RFC822.SIZE BODY.PEEK[TEXT] FLAGS)",
]
KEYWORDS = ["$Forwarded", "$Junk", "$label1", "Work", "$MDNSent", "NonJunk"]
SYSTEM = ["\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft"]


def fill(world, rng: random.Random) -> None:
    for i in range(60):
        flags = rng.sample(SYSTEM, rng.randrange(3)) + rng.sample(KEYWORDS, rng.randrange(3))
        header = b"Subject: m%d%s\r\nFrom: a%d@example.net\r\n" % (
            i, b" " * rng.randrange(3), i)
        if i == 5:
            header += b"X-Huge: " + b"h" * 300_000 + b"\r\n"  # streamed, not formatted inline
        body = b"x" * (300_000 if i == 7 else rng.choice([0, 10, 5000])) + b"\r\n"
        world.append("alice@example.org", "Mixed", header + b"\r\n" + body, tuple(flags),
                     date=1_700_000_000 + rng.randrange(10**8) + rng.random())


def both_writers(r, cmd, uids, computed) -> tuple[bytes, bytes]:
    """What the general writer and the batch formatter write for the same messages."""
    r.pending()
    r.buf = b""
    cmd._write_batch(uids, computed)
    general = r.pending()
    r.buf = b""
    cmd._write_fast(uids, computed)
    return general, r.pending()


@pytest.mark.parametrize("items", ITEM_SETS)
@pytest.mark.parametrize("modseq", [False, True])
def test_fast_formatter_writes_the_same_bytes_as_the_general_one(world, items, modseq):
    fill(world, random.Random(items + bytes([modseq])))
    r = world.connect()
    r.cmd(b"s SELECT Mixed")
    world.append("alice@example.org", "Mixed", b"Subject: late\r\n\r\n")
    r.cmd(b"s2 SELECT Mixed")  # \Recent for the late one only
    atts = [FetchAtt(b"UID")] + fetch_atts(tokenize([(items, None)])[0])
    sel = r.proto.sel
    uids = [info.uid for _, info in sel.infos()]
    cmd = FetchCommand(r.proto, uids, atts, uid=True)
    cmd.modseq = modseq
    needs_file = any(a.name not in INDEX_ITEMS for a in atts)
    computed = compute_batch(sel.folder, uids, atts) if needs_file else None
    general, fast = both_writers(r, cmd, uids, computed)
    assert general.count(b" FETCH (") == len(uids)
    assert (b"\\Recent" in general) == (b"FLAGS" in general)
    assert fast == general


def test_locate_finds_runs_and_skips_uids_not_in_the_view(world):
    for i in range(8):
        world.append("alice@example.org", "Locate", b"Subject: %d\r\n\r\n" % i)
    r = world.connect()
    r.cmd(b"s SELECT Locate")
    r.cmd(b"d UID STORE 3 +FLAGS (\\Deleted)")
    r.cmd(b"e EXPUNGE")
    sel = r.proto.sel
    assert [(u, seq) for u, seq, _ in sel.locate([1, 2, 4, 5])] == [(1, 1), (2, 2), (4, 3), (5, 4)]
    # As many UIDs as view entries up to the last one, but one of them is not in the view.
    assert [(u, seq) for u, seq, _ in sel.locate([1, 3, 4])] == [(1, 1), (4, 3)]
    assert [(u, seq) for u, seq, _ in sel.locate([6, 7, 8])] == [(6, 5), (7, 6), (8, 7)]
    assert [u for u, _, _ in sel.locate(list(range(1, 9)))] == [1, 2, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("items", [b"(UID FLAGS RFC822.SIZE)", b"FAST", b"(FLAGS UID)"])
def test_index_items_over_a_scattered_set_with_own_changes_match_the_general_one(world, items):
    """The column-wise formatter of index-only items (a set with gaps and UIDs not in the view,
    and this session's own flag changes laid over the view) writes the general one's bytes."""
    fill(world, random.Random(items))
    r = world.connect()
    r.cmd(b"s SELECT Mixed")
    r.cmd(b"d UID STORE 3 +FLAGS (\\Deleted)")
    r.cmd(b"e EXPUNGE")
    sel = r.proto.sel
    view = [info.uid for _, info in sel.infos()]
    sel.set_flags(view[1], frozenset({"$Mine"}))  # as a STORE of this session leaves it
    scattered = [u for u in range(1, max(view) + 3) if u % 2 == 0 or u == 3]
    for uids in (scattered, view[:20]):  # view[:20]: a gap-free run, one slice of the view
        atts = [FetchAtt(b"UID")] + fetch_atts(tokenize([(items, None)])[0])
        cmd = FetchCommand(r.proto, uids, atts, uid=True)
        general, fast = both_writers(r, cmd, uids, None)
        assert general.count(b" FETCH (") == len([u for u in uids if u in view])
        assert b"$Mine" in general
        assert fast == general

"""mailsuite-cache (docs/design/maildir.md, "Header cache"): header blocks served from one file,
validated against the messages, rebuilt when lost or corrupt, and FETCH output byte-identical to
reading each message file."""
from __future__ import annotations

import os
import random

import pytest

from mailsuite.imap.fetch import compute_batch, compute_one
from mailsuite.imap.parser import fetch_atts, tokenize
from mailsuite.mailbox.cache import CACHE, HeaderCache
from mailsuite.mailbox.store import MailStore

from tests.unit.test_mailbox_store import deliver

ITEM_SETS = [
    b"(BODY.PEEK[HEADER])",
    b"(UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM TO CC SUBJECT DATE MESSAGE-ID "
    b"PRIORITY X-PRIORITY REFERENCES NEWSGROUPS IN-REPLY-TO CONTENT-TYPE REPLY-TO)])",
    b"(BODY.PEEK[HEADER.FIELDS.NOT (RECEIVED SUBJECT)] FLAGS)",
    b"(RFC822.HEADER)",
    b"(BODY.PEEK[HEADER]<0.10> BODY.PEEK[HEADER]<7.3> BODY.PEEK[HEADER]<100000.5>)",
]


def atts_of(items: bytes):
    return fetch_atts(tokenize([(items, None)])[0])


def random_message(rng: random.Random, i: int) -> bytes:
    """Varied header blocks: folded and duplicate fields, 8-bit, NUL, LF-only endings, no
    blank line, an empty header, huge headers (past the cache's and the streaming limits)."""
    kind = {7: 3, 8: 4}.get(i, rng.randrange(10))
    nl = b"\n" if kind == 1 else b"\r\n"
    fields = [b"Received: from h%d by mx; Mon, 02 Feb 2026 10:00:00 +0000" % j
              for j in range(rng.randrange(4))]
    fields += [b"From: S\xc3\xbcnder %d <s%d@example.net>" % (i, i),
               b"Subject: message %d%s" % (i, b" with\x00nul" if kind == 2 else b""),
               b"X-Folded: one" + nl + b"\ttwo " + b"x" * rng.randrange(200)]
    if kind == 3 and i == 7:
        fields.append(b"X-Big: " + b"y" * 70_000)  # over MAX_HEADER: never cached
    if kind == 4 and i == 8:
        fields.append(b"X-Huge: " + b"z" * 300_000)  # over the streaming threshold
    rng.shuffle(fields)
    header = nl.join(fields) + nl
    if kind == 5:
        return header  # no body, no blank line
    if kind == 6:
        return nl + b"body only" + nl
    return header + nl + b"body %d" % i + nl


@pytest.fixture
def inbox(tmp_path):
    account = MailStore(str(tmp_path / "mail")).account("alice@example.org")
    account.ensure_layout()
    rng = random.Random(12)
    new = os.path.join(account.path, "new")
    for i in range(300):
        with open(os.path.join(new, f"{1700000000 + i}.M{i}P7Q{i}.host"), "wb") as f:
            f.write(random_message(rng, i))
    folder = account.folder("INBOX")
    folder.sync()
    return folder


def from_files(folder, uids, atts):
    out = {}
    for u in uids:
        with folder.open_message(u) as f:
            out[u] = compute_one(f, u, atts)
    return out


def comparable(pieces, atts):
    """Pieces by item position (ids differ between parses); FileRanges by their fields."""
    def value(p):
        return p if isinstance(p, bytes) else ("range", p.uid, p.offset, p.length, p.binary)
    return {u: [value(d[id(a)]) for a in atts if id(a) in d] for u, d in pieces.items()}


@pytest.mark.parametrize("items", ITEM_SETS)
def test_cached_headers_give_the_same_pieces_as_the_message_files(inbox, items):
    atts = atts_of(items)
    uids = [m.uid for m in inbox.messages()]
    expected = comparable(from_files(inbox, uids, atts), atts)
    cache_path = os.path.join(inbox.path, CACHE)
    cold = comparable(compute_batch(inbox, uids, atts), atts)  # reads files, writes the cache
    assert os.path.getsize(cache_path) > 0
    warm = comparable(compute_batch(inbox, uids, atts), atts)  # from the cache
    fresh = MailStore(inbox.account.store.mail_dir).account("alice@example.org").folder("INBOX")
    other = comparable(compute_batch(fresh, uids[::7], atts), atts)  # another process, seeks
    assert cold == expected
    assert warm == expected
    assert other == {u: expected[u] for u in uids[::7]}


def test_the_cache_is_read_not_the_files(inbox):
    atts = atts_of(b"(BODY.PEEK[HEADER])")
    uids = [m.uid for m in inbox.messages()]
    first = compute_batch(inbox, uids, atts)
    cache = inbox._state.header_cache
    assert cache.records > 200 and cache.marks[0][0] == 1
    # Empty a cached message's file behind the store's back: the header still comes from
    # the cache (the key and size in the record still match the index).
    m = next(i for i in inbox.messages() if len(first[i.uid][id(atts[0])]) < 1000)
    open(m.path, "wb").close()
    again = compute_batch(inbox, [m.uid], atts)
    assert again[m.uid][id(atts[0])] == first[m.uid][id(atts[0])]


def test_records_are_validated_against_key_size_and_uidvalidity(tmp_path):
    path = str(tmp_path / CACHE)
    cache = HeaderCache(path)

    class Info:
        def __init__(self, uid, key, size):
            self.uid, self.key, self.size = uid, key, size

    a, b = Info(1, "k1", 10), Info(2, "k2", 20)
    cache.add([(a, b"A: 1\r\n\r\n"), (b, b"B: 2\r\n\r\n")], uidvalidity=5, live={1: a, 2: b})
    assert cache.headers([a, b], 5) == {1: b"A: 1\r\n\r\n", 2: b"B: 2\r\n\r\n"}
    assert cache.headers([Info(1, "other", 10), Info(2, "k2", 21)], 5) == {}
    assert cache.headers([a, b], 6) == {}  # another UIDVALIDITY: nothing is trusted
    reread = HeaderCache(path)  # another process
    assert reread.headers([b], 5) == {2: b"B: 2\r\n\r\n"}
    # Under a new UIDVALIDITY the file starts over.
    cache.add([(Info(1, "n1", 3), b"\r\n")], uidvalidity=6, live={})
    assert HeaderCache(path).headers([Info(1, "n1", 3)], 6) == {1: b"\r\n"}
    assert HeaderCache(path).headers([a], 5) == {}


def test_a_corrupt_tail_is_ignored_and_cut_off_at_the_next_append(tmp_path):
    path = str(tmp_path / CACHE)

    class Info:
        def __init__(self, uid):
            self.uid, self.key, self.size = uid, f"k{uid}", uid

    infos = [Info(u) for u in range(1, 6)]
    live = {i.uid: i for i in infos}
    HeaderCache(path).add([(i, b"H: %d\r\n\r\n" % i.uid) for i in infos[:3]], 9, live)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # flip a byte in the last record, then a torn append
        f.seek(size - 6)
        f.write(b"X")
        f.seek(0, os.SEEK_END)
        f.write(b"\x04\x00\x00")
    cache = HeaderCache(path)
    assert set(cache.headers(infos, 9)) == {1, 2}
    cache.add([(i, b"H: %d\r\n\r\n" % i.uid) for i in infos[2:]], 9, live)
    assert HeaderCache(path).headers(infos, 9) == {i.uid: b"H: %d\r\n\r\n" % i.uid for i in infos}


def test_garbage_or_a_missing_file_is_rebuilt(inbox):
    atts = atts_of(b"(BODY.PEEK[HEADER])")
    uids = [m.uid for m in inbox.messages()]
    expected = comparable(compute_batch(inbox, uids, atts), atts)
    path = os.path.join(inbox.path, CACHE)
    with open(path, "wb") as f:
        f.write(b"not a cache at all" * 100)
    fresh = MailStore(inbox.account.store.mail_dir).account("alice@example.org").folder("INBOX")
    assert comparable(compute_batch(fresh, uids, atts), atts) == expected
    with open(path, "rb") as f:
        assert f.read(16) == b"mailsuite-cache "
    os.unlink(path)
    assert comparable(compute_batch(fresh, uids, atts), atts) == expected
    assert os.path.exists(path)


def test_expunged_and_new_messages_and_a_changed_flag(inbox):
    atts = atts_of(b"(BODY.PEEK[HEADER])")
    compute_batch(inbox, [m.uid for m in inbox.messages()], atts)
    inbox.expunge([3, 4])
    inbox.add_flags(5, ["\\Seen"])  # renames the file: same key, same record
    deliver(inbox.path, 2, body=b"Subject: late\r\n\r\nx\r\n", start=900)
    uids = [m.uid for m in inbox.sync()]
    got = comparable(compute_batch(inbox, uids, atts), atts)
    assert 3 not in got and 4 not in got
    assert got == comparable(from_files(inbox, uids, atts), atts)
    assert got[uids[-1]] == [b"{17}\r\nSubject: late\r\n\r\n"]


def test_a_file_of_mostly_expunged_messages_is_compacted_keeping_the_live_records(tmp_path):
    path = str(tmp_path / CACHE)

    class Info:
        def __init__(self, uid):
            self.uid, self.key, self.size = uid, f"k{uid}", uid

    infos = [Info(u) for u in range(1, 2001)]
    cache = HeaderCache(path)
    cache.add([(i, b"H: %d\r\n\r\n" % i.uid) for i in infos], 3, {i.uid: i for i in infos})
    big = os.path.getsize(path)
    live = {i.uid: i for i in infos[::10]}  # 200 left: 2000 records > 2 * 200 + 1000
    late = Info(3000)
    live[3000] = late
    cache.add([(late, b"L: 1\r\n\r\n")], 3, live)
    assert os.path.getsize(path) < big / 4
    expected = {u: (b"H: %d\r\n\r\n" % u if u != 3000 else b"L: 1\r\n\r\n") for u in live}
    assert HeaderCache(path).headers(sorted(live.values(), key=lambda i: i.uid), 3) == expected
    assert cache.headers(sorted(live.values(), key=lambda i: i.uid), 3) == expected


def test_any_ascending_subset_finds_exactly_its_cached_records(tmp_path):
    """Records with gaps (UIDs never cached) and subsets that skip records, start between
    marks, or ask for UIDs past the last record."""
    path = str(tmp_path / CACHE)

    class Info:
        def __init__(self, uid):
            self.uid, self.key, self.size = uid, f"k{uid}", uid * 3

    rng = random.Random(5)
    cached = [Info(u) for u in range(1, 1400) if u % 7 and not 300 <= u < 340]
    HeaderCache(path).add([(i, b"H: %d\r\n\r\n" % i.uid) for i in cached], 4,
                          {i.uid: i for i in cached})
    cache = HeaderCache(path)
    have = {i.uid for i in cached}
    for _ in range(60):
        uids = sorted(rng.sample(range(1, 1500), rng.randrange(1, 400)))
        got = cache.headers([Info(u) for u in uids], 4)
        assert got == {u: b"H: %d\r\n\r\n" % u for u in uids if u in have}


def test_keys_that_are_not_ascii_match_only_themselves(tmp_path):
    """A Maildir name with UTF-8 or with undecodable octets (surrogate-escaped)."""
    path = str(tmp_path / CACHE)

    class Info:
        def __init__(self, uid, key):
            self.uid, self.key, self.size = uid, key, 7

    infos = [Info(1, "n\u00e4me.host"), Info(2, "raw\udcff.host"), Info(3, "plain.host")]
    HeaderCache(path).add([(i, b"H: %d\r\n\r\n" % i.uid) for i in infos], 2,
                          {i.uid: i for i in infos})
    cache = HeaderCache(path)
    assert set(cache.headers(infos, 2)) == {1, 2, 3}
    assert cache.headers([Info(1, "name.host"), Info(2, "raw\udcfe.host")], 2) == {}

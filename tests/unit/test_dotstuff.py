"""The one dot-stuffer (mailsuite.dotstuff, used by POP3 RETR/TOP and the courier's DATA), fed
in every kind of chunking: Twisted's per-chunk stuffing loses the line-start state at chunk
boundaries (docs/design/pop3.md)."""
from __future__ import annotations

import io
import random

import pytest

from mailsuite.dotstuff import DotStuffer, dot_stuff
from mailsuite.pop3.retrieval import TopReader


def reference(data: bytes) -> bytes:
    """Whole-message stuffing: CRLF lines (a bare CR or LF is a line end too), '.' doubled at
    line starts, '.' terminator."""
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    lines = data.split(b"\r\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines) + b".\r\n"


def stuff(data: bytes, cuts: list[int]) -> bytes:
    s = DotStuffer()
    out, prev = [], 0
    for c in sorted(cuts) + [len(data)]:
        out.append(s.feed(data[prev:c]))
        prev = c
    return b"".join(out) + s.finish()


SAMPLES = [
    b"Subject: x\r\n\r\n.\r\n..\r\n.x\r\nend\r\n",
    b".starts with a dot\r\nno final newline",
    b"bare\nlf\n.dot after bare lf\n",
    b"cr at end\r",
    b"",
    b"a" * 16383 + b"\n.\r\n+OK injected\r\n",
    b"\r\n.\r\n",
    b"bare\rcr\r.dot after bare cr\r\r\n",
    b"\r.\r\n\r",
]


@pytest.mark.parametrize("data", SAMPLES)
def test_every_two_way_split_matches_whole_message_stuffing(data):
    want = reference(data.replace(b"\r", b"") if data.endswith(b"\r") else data)
    if data.endswith(b"\r"):
        want = reference(data[:-1] + b"\r\n")
    cuts = range(len(data) + 1) if len(data) < 1000 else range(16370, len(data) + 1)
    for cut in cuts:
        assert stuff(data, [cut]) == want, cut


def test_random_chunkings_of_a_dotty_message():
    rng = random.Random(7)
    lines = [rng.choice([b".", b"..", b".x", b"x.", b"", b"abc"]) for _ in range(2000)]
    data = b"\r\n".join(lines) + b"\r\n"
    want = reference(data)
    for _ in range(200):
        cuts = rng.sample(range(len(data)), rng.randint(1, 50))
        assert stuff(data, cuts) == want


def test_dot_line_exactly_at_16k():
    data = b"x" * 16382 + b"\r\n" + b".\r\nafter\r\n"
    assert stuff(data, [16384]).endswith(b"\r\n..\r\nafter\r\n.\r\n")


def test_bare_cr_and_bare_lf_become_crlf_everywhere():
    """The one defined behaviour: every line end on the wire is CRLF, so a bare CR before a
    "." cannot hide an end-of-data from the peer (nor end the message early)."""
    assert dot_stuff(b"a\rb") == b"a\r\nb\r\n.\r\n"
    assert dot_stuff(b"a\r.\rb") == b"a\r\n..\r\nb\r\n.\r\n"
    assert dot_stuff(b"a\nb\rc\r\n.\n.") == b"a\r\nb\r\nc\r\n..\r\n..\r\n.\r\n"
    assert dot_stuff(b"") == b".\r\n"
    assert dot_stuff(b"x\r") == b"x\r\n.\r\n"
    for chunk_size in (1, 2, 3):  # a CR at the end of one chunk, the LF at the start of the next
        assert dot_stuff(b"a\r\n.b\r\r\n", chunk_size) == b"a\r\n..b\r\n\r\n.\r\n"


def test_dot_at_message_start_and_16k_boundaries_in_one_pass():
    data = b".first\r\n" + b"x" * (16384 - 10) + b"\r\n.\r\n" + b"y" * 16380 + b"\r\n.z\r\n"
    assert dot_stuff(data, chunk_size=16384) == reference(data)
    assert dot_stuff(data, chunk_size=16384).startswith(b"..first\r\n")


def test_top_reader_limits_body_lines():
    msg = b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3\r\n"
    assert TopReader(io.BytesIO(msg), 0).read(1 << 20) == b"A: 1\r\nB: 2\r\n\r\n"
    r = TopReader(io.BytesIO(msg), 2)
    assert r.read(3) + r.read(3) + r.read(100) + r.read(100) == b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n"
    assert TopReader(io.BytesIO(msg), 99).read(1 << 20) == msg


# -- the courier's DATA: every chunk boundary, 16 KiB chunks, bare CR and LF ----------------

def unstuff(wire: bytes) -> bytes:
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    lines = wire[:-3].split(b"\r\n")
    return b"\r\n".join(l[1:] if l.startswith(b".") else l for l in lines)


def test_dot_stuffing_at_every_chunk_boundary():
    """Whatever the chunking, a "." line is stuffed (Twisted misses it at a chunk start)."""
    message = b".\r\nab\r\n.\r\n..x\r\n.\r\nend\r\n"
    expected = b"..\r\nab\r\n..\r\n...x\r\n..\r\nend\r\n.\r\n"
    for size in range(1, len(message) + 1):
        stuffer = DotStuffer()
        out = b"".join(stuffer.feed(message[i:i + size]) for i in range(0, len(message), size))
        assert out + stuffer.finish() == expected, size
    # ...and for every single split point, including between CR and LF.
    for cut in range(len(message) + 1):
        stuffer = DotStuffer()
        out = stuffer.feed(message[:cut]) + stuffer.feed(message[cut:]) + stuffer.finish()
        assert out == expected, cut


def test_dot_stuffing_16k_chunks_random():
    rng = random.Random(4)
    lines = [rng.choice([b".", b"..", b".x", b"x", b"", b"y" * rng.randrange(200)])
             for _ in range(5000)]
    message = b"\r\n".join(lines) + b"\r\n"
    wire = dot_stuff(message, chunk_size=16384)
    assert unstuff(wire) == message
    assert wire.count(b"\r\n.\r\n") == 1


def test_bare_cr_and_lf_become_crlf_and_end_is_terminated():
    assert dot_stuff(b"a\nb\rc\r\n.\n.") == b"a\r\nb\r\nc\r\n..\r\n..\r\n.\r\n"
    assert dot_stuff(b"") == b".\r\n"
    assert dot_stuff(b"x\r") == b"x\r\n.\r\n"
    stuffer = DotStuffer()  # CR at the end of one chunk, LF at the start of the next
    assert stuffer.feed(b"a\r") + stuffer.feed(b"\n.b") + stuffer.finish() == b"a\r\n..b\r\n.\r\n"

"""Outbound dot-stuffing (RFC 5321 §4.5.2), in memory: every chunk boundary, 16 KiB chunks, bare
CR and LF."""
from __future__ import annotations

import random

from mailsuite.courier.client import DotStuffer, dot_stuff


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

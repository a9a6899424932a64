"""IMAP in memory: COMPRESS=DEFLATE (RFC 4978): responses and commands round-trip through zlib
on the StringTransport, commands pipelined after COMPRESS, [COMPRESSIONACTIVE], a flush after
each burst, bounded inflation of a decompression bomb, a corrupt stream closes
(docs/design/imap.md, "COMPRESS=DEFLATE")."""
from __future__ import annotations

import zlib

from tests.unit.imapkit import Client, simple, tagged, world  # noqa: F401


class ZClient(Client):
    """A client that deflates what it sends and inflates what it reads once `start()` ran."""

    zin = None
    zout = None

    def start(self, pipelined: bytes = b"") -> bytes:
        """COMPRESS DEFLATE, with `pipelined` commands sent compressed in the same write."""
        self.zout = zlib.compressobj(6, zlib.DEFLATED, -15)
        rest = self.zout.compress(pipelined) + self.zout.flush(zlib.Z_SYNC_FLUSH) if pipelined else b""
        Client.send(self, b"z COMPRESS DEFLATE\r\n" + rest)
        raw = self.transport.value()
        self.transport.clear()
        ok, _, compressed = raw.partition(b"\r\n")
        self.zin = zlib.decompressobj(-15)
        self.buf = self.zin.decompress(compressed)
        return ok

    def send(self, data: bytes) -> None:
        if self.zout is not None:
            data = self.zout.compress(data) + self.zout.flush(zlib.Z_SYNC_FLUSH)
        Client.send(self, data)

    def _pull(self) -> None:
        raw = self.transport.value()
        self.transport.clear()
        self.buf += self.zin.decompress(raw) if self.zin is not None else raw


def _zclient(world) -> ZClient:
    c = ZClient.__new__(ZClient)
    Client.__init__(c, world)
    return c


def test_compress_round_trip_and_pipelined_commands(world):
    msg = simple("compressed", body="hello " * 2000 + "\r\n")
    world.append("alice@example.org", "", msg)
    c = _zclient(world)
    assert c.start(pipelined=b"p1 NOOP\r\np2 SELECT INBOX\r\n") == b"z OK DEFLATE active"
    assert tagged(c.response(b"p1")) == b"p1 OK NOOP completed"
    assert tagged(c.response(b"p2")).startswith(b"p2 OK")
    resp = c.cmd(b"f FETCH 1 BODY.PEEK[]")
    assert resp[0].endswith(msg + b")")
    # An APPEND literal crosses the inflater too.
    resp = c.cmd(b"a APPEND INBOX {%d+}\r\n" % len(msg) + msg)
    assert tagged(resp).startswith(b"a OK [APPENDUID")
    assert tagged(c.cmd(b"b COMPRESS DEFLATE")).startswith(b"b NO [COMPRESSIONACTIVE]")
    assert tagged(c.cmd(b"c LOGOUT")).startswith(b"c OK")


def test_each_burst_is_flushed(world):
    c = _zclient(world)
    c.start()
    Client.send(c, c.zout.compress(b"n NOOP\r\n") + c.zout.flush(zlib.Z_SYNC_FLUSH))
    # clock.advance(0) ran the flush: the whole reply can be inflated now, without more data.
    raw = c.transport.value()
    assert raw.endswith(b"\x00\x00\xff\xff")
    assert c.line() == b"n OK NOOP completed"


def test_compress_syntax_and_state(world):
    c = world.connect(login_as=None)
    assert tagged(c.cmd(b"a COMPRESS DEFLATE")).startswith(b"a BAD")  # log in first
    c = world.connect()
    assert tagged(c.cmd(b"b COMPRESS")).startswith(b"b BAD")
    assert tagged(c.cmd(b"c COMPRESS GZIP")).startswith(b"c BAD")
    assert b"COMPRESS=DEFLATE" in c.cmd(b"d CAPABILITY")[0]


def test_decompression_bomb_is_inflated_a_chunk_at_a_time(world):
    c = _zclient(world)
    c.start()
    proto = c.proto
    # 16 MiB of "x" without a newline compress to ~16 KiB: a line far over the limit.
    bomb = c.zout.compress(b"x" * (16 * 1024 * 1024)) + c.zout.flush(zlib.Z_SYNC_FLUSH)
    assert len(bomb) < 32 * 1024
    seen = []
    real = type(proto).lineLengthExceeded

    def spy(self, line):
        seen.append(len(self._buffer) + len(line))
        return real(self, line)
    type(proto).lineLengthExceeded = spy
    try:
        Client.send(c, bomb + c.zout.compress(b"\r\nafter NOOP\r\n") + c.zout.flush(zlib.Z_SYNC_FLUSH))
    finally:
        type(proto).lineLengthExceeded = real
    assert seen and max(seen) < 256 * 1024  # never more than a line and a chunk in memory
    lines = c.response(b"after")
    assert lines[-1] == b"after OK NOOP completed"


def test_a_paused_reader_keeps_input_compressed(world):
    c = _zclient(world)
    c.start()
    proto = c.proto
    proto.pauseProducing()
    data = c.zout.compress(b"n NOOP\r\n" * 10000) + c.zout.flush(zlib.Z_SYNC_FLUSH)
    proto.dataReceived(data)
    assert len(proto._buffer) <= 64 * 1024 and proto.inflater.pending  # waiting, compressed
    proto.resumeProducing()
    c.clock.advance(0)
    assert len(c.response(b"n")) == 1


def test_corrupt_stream_says_bye(world):
    c = _zclient(world)
    c.start()
    Client.send(c, b"\xff\xff\xff\xff garbage")
    assert c.line().startswith(b"* BYE invalid deflate data")
    assert c.disconnected

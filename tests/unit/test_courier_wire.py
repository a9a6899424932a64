"""What the courier puts after DATA is wire-safe whatever the spool holds: no NUL, no bare CR or
LF, exactly one end-of-data (docs/design/courier.md, "Wire safety"). The corpus in
tests/unit/corpus/courier_wire/ holds the smuggling shapes; hypothesis tries the rest."""
from __future__ import annotations

import os
import re

from hypothesis import given, settings, strategies as st
from twisted.internet import task
from twisted.internet.testing import MemoryReactorClock

from mailsuite.config import Config
from mailsuite.courier.agent import RemoteAgent, wire_safe
from mailsuite.dotstuff import dot_stuff
from mailsuite.pools import InlinePool
from mailsuite.queue.spool import QueueEntry, Recipient

CORPUS = os.path.join(os.path.dirname(__file__), "corpus", "courier_wire")
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def corpus() -> list[bytes]:
    out = []
    for name in sorted(os.listdir(CORPUS)):
        with open(os.path.join(CORPUS, name), "rb") as f:
            out.append(f.read())
    return out


def assert_wire_safe(message: bytes) -> None:
    safe, repaired = wire_safe(message)
    assert b"\0" not in safe and not BARE.search(safe)
    assert wire_safe(safe) == (safe, "")  # idempotent, nothing left to repair
    assert bool(repaired) == (safe != message)
    wire = dot_stuff(safe)
    # Exactly one end-of-data, at the end: nothing the receiver could read as commands.
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    assert wire.count(b"\r\n.\r\n") == (1 if wire != b".\r\n" else 0)
    assert b"\0" not in wire and not BARE.search(wire)


def test_corpus():
    found = corpus()
    assert len(found) >= 5
    for message in found:
        assert_wire_safe(message)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([b"\0", b"\r", b"\n", b"\r\n", b".", b"a", b"\xff", b" "]),
                max_size=40).map(b"".join))
def test_any_bytes_become_wire_safe(message):
    assert_wire_safe(message)


def test_what_is_reported():
    assert wire_safe(b"a\r\nb\r\n") == (b"a\r\nb\r\n", "")
    assert wire_safe(b"a\0b\0\r\n") == (b"ab\r\n", "2 NUL bytes removed")
    assert wire_safe(b"a\nb\rc\r\n") == (b"a\r\nb\r\nc\r\n", "2 bare CR/LF made CRLF")


class RecordingSigner:
    def __init__(self) -> None:
        self.signed: list[bytes] = []

    def sign(self, message: bytes, sender: str) -> bytes:
        self.signed.append(message)
        return b"DKIM-Signature: v=1\r\n" + message


def test_prepare_repairs_before_signing(tmp_path):
    """The DKIM signature must cover the bytes that go out, so the repair comes first."""
    path = tmp_path / "m.eml"
    path.write_bytes(b"Subject: x\r\n\r\nhello\0\n.\nQUIT\r\n")
    signer = RecordingSigner()
    agent = RemoteAgent(Config().courier, "mx.test.example", reactor=MemoryReactorClock(),
                        clock=task.Clock(), io=InlinePool(), signer=signer)  # type: ignore
    entry = QueueEntry("6b0a0000000000000000a", "a@example.org",
                       [Recipient("b@far.example", "b@far.example", False)], 0.0)
    payloads: list = []
    agent._prepare(entry, str(path)).addCallback(payloads.append)
    [payload] = payloads
    assert signer.signed == [b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n"]
    assert payload.wire == (b"DKIM-Signature: v=1\r\nSubject: x\r\n\r\nhello\r\n..\r\n"
                            b"QUIT\r\n.\r\n")
    assert payload.repaired == "1 NUL byte removed, 2 bare CR/LF made CRLF"

"""ClamdScanner in memory: a fake endpoint hands the INSTREAM protocol a StringTransport, the
test plays clamd by feeding its answer; task.Clock for the deadline, InlinePool for file reads
(docs/design/trust-engines.md)."""
from __future__ import annotations

import struct

import pytest
from twisted.internet import defer, task
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailsuite.config import ClamdSection
from mailsuite.pools import InlinePool
from mailsuite.trust import ACCEPT, REJECT, TEMPFAIL, ContentScanner, Envelope, Verdict
from mailsuite.trust.clamd import ClamdScanner, endpoint_for, interpret

MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\n" + b"x" * 100 + b"\r\n"
ENVELOPE = Envelope(client_ip="192.0.2.7", helo="mx.example.com", mail_from="a@example.org",
                    recipients=("b@example.net",), queue_id="Q123")


class FakeEndpoint:
    """Connects at once over a StringTransport (or refuses, or never connects)."""

    def __init__(self, mode="connect", paused=False):
        self.mode, self.paused = mode, paused
        self.protocol = None
        self.transport = None

    def connect(self, factory):
        if self.mode == "refuse":
            return defer.fail(ConnectionRefusedError())
        if self.mode == "hang":
            return defer.Deferred()
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        if self.paused:
            self.protocol.pauseProducing()
        return defer.succeed(self.protocol)

    def answer(self, data: bytes) -> None:
        self.protocol.dataReceived(data)


@pytest.fixture
def message(tmp_path):
    path = tmp_path / "msg"
    path.write_bytes(MESSAGE)
    return str(path)


def make(endpoint, clock=None, chunk_size=64 * 1024, **settings):
    config = ClamdSection(socket="/run/clamd.test.sock", **settings)
    return ClamdScanner(config, clock or task.Clock(), InlinePool(), endpoint=endpoint,
                        chunk_size=chunk_size)


def outcome(d):
    results = []
    d.addBoth(lambda r: results.append(r) or r)
    return results


def verdict_of(results):
    assert results, "the scan did not finish"
    v = results[0]
    assert isinstance(v, Verdict), v  # scan never errbacks
    for header in v.headers:
        assert "\r" not in header and "\n" not in header
    return v


def instream(data: bytes, chunk: int) -> bytes:
    out = b"zINSTREAM\0"
    for i in range(0, len(data), chunk):
        part = data[i:i + chunk]
        out += struct.pack(">I", len(part)) + part
    return out + b"\0\0\0\0"


def test_is_a_content_scanner():
    scanner = make(FakeEndpoint())
    assert isinstance(scanner, ContentScanner) and scanner.name == "clamd"


def test_wanted():
    sub = Envelope("192.0.2.7", "h", "a@b", ("c@d",), auth_user="u", listener="submission")
    assert make(FakeEndpoint()).wanted(ENVELOPE)
    assert not make(FakeEndpoint()).wanted(sub)
    assert make(FakeEndpoint(), scan_submission=True).wanted(sub)
    off = ClamdScanner(ClamdSection(socket=""), task.Clock(), InlinePool())
    assert not off.wanted(ENVELOPE)


def test_sends_instream_in_chunks_then_clean_accepts(message):
    ep = FakeEndpoint()
    scanner = make(ep, chunk_size=16)
    results = outcome(scanner.scan(ENVELOPE, message, len(MESSAGE)))
    assert ep.transport.value() == instream(MESSAGE, 16)
    assert not results  # waiting for clamd
    ep.answer(b"stream: OK\0")
    v = verdict_of(results)
    assert v.disposition == ACCEPT and v.headers == [] and v.reply is None
    assert ep.transport.disconnecting


def test_answer_in_pieces(message):
    ep = FakeEndpoint()
    results = outcome(make(ep).scan(ENVELOPE, message, len(MESSAGE)))
    ep.answer(b"stream: O")
    assert not results
    ep.answer(b"K\0")
    assert verdict_of(results).disposition == ACCEPT


def test_found_rejects_with_signature(message):
    ep = FakeEndpoint()
    results = outcome(make(ep).scan(ENVELOPE, message, len(MESSAGE)))
    ep.answer(b"stream: Eicar-Test-Signature FOUND\0")
    v = verdict_of(results)
    assert v.disposition == REJECT
    assert (v.reply.code, v.reply.enhanced, v.reply.text) == (
        554, "5.7.0", "message refused: Eicar-Test-Signature")
    assert "Eicar-Test-Signature" in v.log


def test_signature_is_sanitised_and_bounded():
    v = interpret("stream: Bad\r\nName\x01\xe9" + "A" * 300 + " FOUND")
    text = v.reply.text
    assert text.startswith("message refused: Bad Name")
    assert all(" " <= c <= "~" for c in text)
    assert len(text) <= len("message refused: ") + 100


FAILURE_ANSWERS = {
    "error": b"stream: Can't allocate memory ERROR\0",
    "size limit": b"INSTREAM size limit exceeded. ERROR\0",
    "garbage": b"what is this\0",
}


@pytest.mark.parametrize("case", sorted(FAILURE_ANSWERS))
def test_error_answers_tempfail(message, case):
    ep = FakeEndpoint()
    results = outcome(make(ep).scan(ENVELOPE, message, len(MESSAGE)))
    ep.answer(FAILURE_ANSWERS[case])
    v = verdict_of(results)
    assert v.disposition == TEMPFAIL
    assert (v.reply.code, v.reply.enhanced, v.reply.text) == (
        451, "4.7.1", "virus scanner unavailable, try again later")


def test_size_limit_accepts_with_header_when_configured(message):
    ep = FakeEndpoint()
    results = outcome(make(ep, on_failure="accept").scan(ENVELOPE, message, len(MESSAGE)))
    ep.answer(b"INSTREAM size limit exceeded. ERROR\0")
    v = verdict_of(results)
    assert v.disposition == ACCEPT
    assert v.headers == ["X-Virus-Scanned: unscanned (size limit exceeded)"]


def test_refused_connection(message):
    v = verdict_of(outcome(make(FakeEndpoint("refuse")).scan(ENVELOPE, message, len(MESSAGE))))
    assert v.disposition == TEMPFAIL and v.reply.code == 451


def test_refused_connection_accept_policy(message):
    scanner = make(FakeEndpoint("refuse"), on_failure="accept")
    v = verdict_of(outcome(scanner.scan(ENVELOPE, message, len(MESSAGE))))
    assert v.disposition == ACCEPT
    assert v.headers == ["X-Virus-Scanned: unscanned (connection failed)"]


def test_connection_lost_before_answer(message):
    ep = FakeEndpoint()
    results = outcome(make(ep).scan(ENVELOPE, message, len(MESSAGE)))
    ep.protocol.connectionLost(Failure(ConnectionRefusedError()))
    assert verdict_of(results).disposition == TEMPFAIL


@pytest.mark.parametrize("mode", ["hang", "connect"])
def test_timeout(message, mode):
    clock = task.Clock()
    ep = FakeEndpoint(mode)
    results = outcome(make(ep, clock=clock, timeout=30.0).scan(ENVELOPE, message,
                                                                len(MESSAGE)))
    clock.advance(29.9)
    assert not results
    clock.advance(0.2)
    v = verdict_of(results)
    assert v.disposition == TEMPFAIL and "no answer within" in v.log
    assert not clock.getDelayedCalls()
    if ep.transport is not None:
        assert ep.transport.disconnecting


def test_timeout_accept_policy(message):
    clock = task.Clock()
    scanner = make(FakeEndpoint("hang"), clock=clock, on_failure="accept")
    results = outcome(scanner.scan(ENVELOPE, message, len(MESSAGE)))
    clock.advance(31)
    assert verdict_of(results).headers == ["X-Virus-Scanned: unscanned (timeout)"]


def test_flow_control_waits_for_resume(message):
    ep = FakeEndpoint(paused=True)
    results = outcome(make(ep, chunk_size=16).scan(ENVELOPE, message, len(MESSAGE)))
    assert ep.transport.value() == b"zINSTREAM\0"  # paused: not one chunk written
    ep.protocol.resumeProducing()
    assert ep.transport.value() == instream(MESSAGE, 16)
    ep.answer(b"stream: OK\0")
    assert verdict_of(results).disposition == ACCEPT


def test_early_answer_stops_sending(message):
    ep = FakeEndpoint(paused=True)
    results = outcome(make(ep, chunk_size=16).scan(ENVELOPE, message, len(MESSAGE)))
    ep.answer(b"INSTREAM size limit exceeded. ERROR\0")
    ep.protocol.resumeProducing()
    assert ep.transport.value() == b"zINSTREAM\0"
    assert verdict_of(results).disposition == TEMPFAIL


def test_too_large_is_not_scanned(message):
    ep = FakeEndpoint()
    v = verdict_of(outcome(make(ep, max_size=10).scan(ENVELOPE, message, len(MESSAGE))))
    assert v.disposition == ACCEPT
    assert v.headers == ["X-Virus-Scanned: unscanned (too large)"]
    assert ep.protocol is None  # never connected


def test_missing_file_is_a_failure(tmp_path):
    ep = FakeEndpoint()
    v = verdict_of(outcome(make(ep).scan(ENVELOPE, str(tmp_path / "gone"), 10)))
    assert v.disposition == TEMPFAIL
    assert ep.transport.disconnecting


def test_reads_happen_in_the_pool(message):
    calls = []

    class RecordingPool(InlinePool):
        def run(self, fn, *args, **kwargs):
            calls.append(getattr(fn, "__name__", repr(fn)))
            return super().run(fn, *args, **kwargs)

    ep = FakeEndpoint()
    scanner = ClamdScanner(ClamdSection(socket="/x"), task.Clock(), RecordingPool(),
                           endpoint=ep, chunk_size=64)
    results = outcome(scanner.scan(ENVELOPE, message, len(MESSAGE)))
    ep.answer(b"stream: OK\0")
    verdict_of(results)
    assert calls[0] == "open" and calls[-1] == "close"
    reads = -(-len(MESSAGE) // 64) + 1  # every chunk, then the empty read at end of file
    assert calls[1:-1] == ["read"] * reads


def test_endpoint_for():
    from twisted.internet.endpoints import (TCP4ClientEndpoint, TCP6ClientEndpoint,
                                            UNIXClientEndpoint)

    clock = task.Clock()
    assert isinstance(endpoint_for("/run/clamd.sock", clock, 5), UNIXClientEndpoint)
    tcp = endpoint_for("tcp:127.0.0.1:3310", clock, 5)
    assert isinstance(tcp, TCP4ClientEndpoint) and tcp._port == 3310
    assert isinstance(endpoint_for("tcp:[::1]:3310", clock, 5), TCP6ClientEndpoint)

"""Fuzzing the SMTP server in memory: the command parser, the header checks, and whole sessions
(random commands, DATA with dots, CR, LF and NUL at chunk boundaries, huge parameters) cut into
random chunks. The seed inputs in tests/unit/corpus/smtp/ are replayed first.

Invariants of a session: the server never raises; every reply line is well formed; every
complete command (and every end of DATA) gets exactly one final reply, apart from the 421 that
closes a connection; a message is queued exactly when "250 ... queued as" was answered (never one
answered 5xx); the buffers stay within their documented bounds (docs/design/smtp.md, "Memory").
"""
from __future__ import annotations

import base64
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailsuite.smtp import data as smtp_data
from mailsuite.smtp import server as smtp_server
from mailsuite.smtp.address import PathError, parse_path_argument
from mailsuite.smtp.headers import HeaderScan, header_addresses
from mailsuite.smtp.staging import HIGH_WATER
from tests.unit.smtpkit import World

CORPUS = os.path.join(os.path.dirname(__file__), "corpus", "smtp")
CORPUS_FILES = sorted(os.listdir(CORPUS))
REPLY_LINE = re.compile(rb"^[2-5]\d\d[ -][\x20-\x7e]*$")
ALICE = base64.b64encode(b"\0alice@example.org\0secret-pw-1")


class Session:
    """One connection with counters around the protocol's command and end-of-DATA handlers."""

    def __init__(self, port: str, smtp: dict | None = None, io=None):
        self.io = io
        self.world = World(smtp=smtp or {}, limits={"auth_failure_delay": 0.0}, io=io)
        self.client = self.world.connect(port)
        proto = self.client.proto
        self.proto = proto
        self.handled = 0
        self.closed_by_server = False
        handle_line, end_of_data = proto._handle_line, proto._end_of_data

        def counted_line(line):
            self.handled += 1
            handle_line(line)

        def counted_end():
            self.handled += 1
            end_of_data()

        proto._handle_line = counted_line
        proto._end_of_data = counted_end

    def feed(self, chunks: list[bytes], io_steps: list[int] = ()) -> None:
        limit = self.world.config.limits.max_line_length
        for i, chunk in enumerate(chunks):
            if self.io is not None:  # the disk catches up a little, or not at all
                for _ in range(io_steps[i % len(io_steps)] if io_steps else 1):
                    self.io.step()
            self.client.send(chunk)
            assert not self.client.dropped, self.client.dropped
            proto = self.proto
            assert len(proto._buffer) <= smtp_server.PENDING_INPUT_CAP + len(chunk)
            assert len(proto._out) <= smtp_data.DATA_FLUSH + 4 * limit + 4096
            if proto._staged is not None:
                assert proto._staged.backlog <= HIGH_WATER + smtp_data.DATA_FLUSH + 4 * limit
        if self.io is not None:
            while self.io.jobs:
                self.io.drain()
                self.client.wait(0.1)
        self.client.wait(20)  # delayed answers (AUTH failures) come out

    def check(self) -> None:
        out = self.client.transport.value()
        assert out.endswith(b"\r\n") or out == b""
        lines = out.split(b"\r\n")[:-1]
        for line in lines:
            assert REPLY_LINE.match(line), line
        finals = [line for line in lines if line[3:4] == b" "]
        assert finals[0].startswith(b"220 ")
        queued = [f for f in finals if f.startswith(b"250 2.0.0 Ok: queued as")]
        assert len(queued) == len(self.world.queue.messages)
        assert self.world.queue.staged() == [] or self.proto._mode == "data"
        answers = [f for f in finals[1:] if not f.startswith(b"421 ")]
        if self.client.transport.disconnecting:
            assert finals[-1][:3] in (b"421", b"221")
            assert len(answers) <= self.handled
        else:
            # Every complete command was answered once (STARTTLS's 220 is its answer).
            assert len(answers) == self.handled, (len(answers), self.handled)


def run_session(data: bytes, cuts: list[int], port: str = "mx", smtp: dict | None = None,
                io=None, io_steps: list[int] = ()) -> Session:
    session = Session(port, smtp, io)
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    session.feed([data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a], io_steps)
    session.check()
    session.client.disconnect()
    if io is not None:
        io.drain()
    assert session.world.queue.staged() == []
    return session


# -- the corpus, replayed first ----------------------------------------------------------------
@pytest.mark.parametrize("name", CORPUS_FILES)
@pytest.mark.parametrize("mode", ["reject", "normalise"])
def test_corpus(name, mode):
    with open(os.path.join(CORPUS, name), "rb") as f:
        data = f.read()
    port = "submissions" if name.startswith("submission") else "mx"
    smtp = {"bad_line_endings": mode}
    run_session(data, [], port, smtp)
    run_session(data, list(range(0, len(data), 7)), port, smtp)  # and in small pieces


# -- parsers ----------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300), st.sampled_from(["FROM:", "TO:"]), st.booleans())
def test_path_parser_only_raises_path_error(arg, prefix, utf8):
    try:
        parse_path_argument(arg, prefix, allow_utf8=utf8, allow_null=True)
    except PathError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=80),
                max_size=30))
def test_parameters_are_bounded(params):
    try:
        parsed = parse_path_argument("FROM:<a@b.example> " + " ".join(params), "FROM:")
    except PathError:
        return
    assert len(parsed.params) <= 10


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=200).map(lambda t: t.encode()))
def test_header_address_parser_never_raises(raw):
    found = header_addresses(raw)
    assert found is None or all("@" in a for a in found)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=60))
def test_header_scan_never_raises_and_stays_bounded(lines):
    scan = HeaderScan()
    for line in lines:
        scan.line(line)
    assert sum(len(v) for _, v in scan.address_fields) <= 16 * 1024


# -- whole sessions -----------------------------------------------------------------------------
COMMANDS = [b"EHLO client.example", b"HELO client.example", b"EHLO",
            b"MAIL FROM:<x@remote.example>", b"MAIL FROM:<alice@example.org>", b"MAIL FROM:<>",
            b"MAIL FROM:<x@remote.example> SIZE=100",
            b"RCPT TO:<alice@example.org>", b"RCPT TO:<nobody@example.org>",
            b"RCPT TO:<bob@example.org>", b"RCPT TO:<x@other.example>", b"DATA", b"RSET", b"NOOP",
            b"VRFY alice", b"HELP", b"QUIT", b"BDAT 10 LAST", b"AUTH PLAIN", b"AUTH LOGIN",
            b"AUTH PLAIN " + ALICE, b"AUTH PLAIN AAAA", b"*", b"", b".", b"EXPN x",
            b"MAIL FROM:<x@remote.example> " + b"A=B " * 20,
            b"RCPT TO:<a@b.example> X=" + b"y" * 600,
            b"MAIL FROM:<\xc3\xa9@example.org> SMTPUTF8", b"NOOP \xff"]
BODY_PIECES = [b".", b"..", b"\r", b"\n", b"\0", b"\r\n", b"\r\n.\r\n", b"\n.\n", b"\r.\r",
               b"Received: from x", b"From: bob@example.org", b"From: alice@example.org",
               b"Subject: s", b"x" * 300, b"\t folded", b"Message-ID: <a@b>", b":", b" "]

command = st.sampled_from(COMMANDS) | st.binary(max_size=40).filter(lambda b: b"\r\n" not in b)
body = st.lists(st.sampled_from(BODY_PIECES), max_size=40).map(b"".join)
step = st.one_of(command.map(lambda c: c + b"\r\n"),
                 body.map(lambda b: b + b"\r\n.\r\n"),
                 body)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, max_size=25), st.lists(st.integers(0, 4000), max_size=30),
       st.sampled_from(["mx", "submissions"]), st.sampled_from(["reject", "normalise"]))
def test_random_sessions_keep_the_invariants(steps, cuts, port, mode):
    prefix = b"EHLO fuzz.example\r\n"
    if port == "submissions":
        prefix += b"AUTH PLAIN " + ALICE + b"\r\n"
    run_session(prefix + b"".join(steps), cuts, port, {"bad_line_endings": mode})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, max_size=20), st.lists(st.integers(0, 4000), max_size=30),
       st.lists(st.integers(0, 3), min_size=1, max_size=10))
def test_random_sessions_with_a_slow_disk_keep_the_invariants(steps, cuts, io_steps):
    """The same, with the staged-file writes running only now and then (ManualPool)."""
    from tests.unit.test_smtp_streaming import ManualPool

    data = (b"EHLO fuzz.example\r\nMAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\n"
            b"DATA\r\n" + b"".join(steps))
    run_session(data, cuts, io=ManualPool(), io_steps=io_steps)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(BODY_PIECES), max_size=60), st.lists(st.integers(0, 3000),
                                                                      max_size=40))
def test_a_message_is_the_same_however_it_is_cut(pieces, cuts):
    """DATA at every chunk boundary: the stored bytes (or the refusal) do not depend on where
    TCP cut the stream."""
    script = (b"EHLO a.example\r\nMAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\n"
              b"DATA\r\n" + b"".join(pieces) + b"\r\n.\r\nQUIT\r\n")
    whole = run_session(script, [], smtp={"bad_line_endings": "normalise"})
    cut = run_session(script, cuts, smtp={"bad_line_endings": "normalise"})
    strip = [re.sub(rb"id [0-9a-f]{12}|\r\n\t[^\r]*\d\d:\d\d:\d\d[^\r]*|<[0-9a-f.]+@", b"", m.data)
             for m in (whole.world.queue.messages + cut.world.queue.messages)]
    assert len(whole.world.queue.messages) == len(cut.world.queue.messages)
    if strip:
        assert strip[0] == strip[-1]

"""Fuzzing the IMAP command path in memory: the corpus in tests/unit/corpus/imap/ first (the
attack inputs: 15,000 NOTs, deep parentheses, deep MIME, huge literals and numbers, pre-auth
floods), then hypothesis-generated commands. Invariants: nothing raises out of the protocol,
no [SERVERBUG] and no traceback, a bounded log, every well-framed command gets its own tagged
reply (or the connection is closed on purpose), no RecursionError."""
from __future__ import annotations

import os
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from twisted.logger import capturedLogs

from tests.unit.imapkit import World, simple

CORPUS = os.path.join(os.path.dirname(__file__), "corpus", "imap")


def deep_multipart(levels: int) -> bytes:
    out = [b"From: a@example.org\r\nSubject: deep\r\n"]
    for i in range(levels):
        out.append(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i))
    out.append(b"Content-Type: text/plain\r\n\r\ninnermost\r\n")
    for i in reversed(range(levels)):
        out.append(b"--b%d--\r\n" % i)
    return b"".join(out)


def deep_rfc822(levels: int) -> bytes:
    return (b"From: a@example.org\r\nSubject: deep822\r\n"
            + b"Content-Type: message/rfc822\r\n\r\n" * levels + b"\r\ninnermost\r\n")


def wide_multipart(parts: int) -> bytes:
    return (b"From: a@example.org\r\nContent-Type: multipart/mixed; boundary=w\r\n\r\n"
            + b"--w\r\n\r\nx\r\n" * parts + b"--w--\r\n")


_world_cache: dict[str, World] = {}


def _world(tmp_path_factory) -> World:
    if "w" not in _world_cache:
        w = World(str(tmp_path_factory.mktemp("imapfuzz")), max_message_size=1024 * 1024)
        w.config.imap.max_commands_per_second = 1000
        w.append("alice@example.org", "", simple("one"))
        w.append("alice@example.org", "", deep_multipart(10000))
        w.append("alice@example.org", "", deep_rfc822(10000))
        w.append("alice@example.org", "", wide_multipart(100000))
        _world_cache["w"] = w
    return _world_cache["w"]


def _run(world: World, data: bytes, preauth: bool) -> tuple[bytes, list[dict], bool]:
    c = world.connect(login_as=None if preauth else "alice@example.org")
    if not preauth:
        c.cmd(b"S EXAMINE INBOX")  # read-only: the fuzzer must not change the folder
    with capturedLogs() as events:
        for i in range(0, max(len(data), 1), 65536):
            c.send(data[i:i + 65536])
            c.clock.advance(0)
        for _ in range(5):
            c.clock.advance(1)
    out = c.pending()
    closed = c.disconnected
    c.close()  # the world is shared: no timer of this connection may fire in the next test
    return out, list(events), closed


def _check(out: bytes, events: list[dict]) -> None:
    assert b"SERVERBUG" not in out, out[-500:]
    assert not [e for e in events if e.get("log_failure") is not None]
    # One short line per refused command, never a 125 KB traceback.
    assert all(len(repr(e.get("log_format", ""))) < 500 for e in events)
    assert sum(len(str(e.get("error", ""))) for e in events) < 20000


CORPUS_FILES = sorted(os.listdir(CORPUS))


@pytest.mark.parametrize("name", CORPUS_FILES)
def test_corpus(name, tmp_path_factory):
    data = open(os.path.join(CORPUS, name), "rb").read()
    world = _world(tmp_path_factory)
    out, events, closed = _run(world, data, preauth=name.startswith("preauth-"))
    _check(out, events)
    last = data.rstrip(b"\r\n").rsplit(b"\n", 1)[-1]
    m = re.match(rb"([a-z]\d) (NOOP|CAPABILITY)$", last)
    if m:
        assert re.search(rb"(^|\n)" + m.group(1) + rb" OK", out), out[-300:]
    else:
        assert closed, out[-300:]


def test_search_15000_not_is_one_bad_line(tmp_path_factory):
    world = _world(tmp_path_factory)
    data = b"s1 SEARCH " + b"NOT " * 15000 + b"ALL\r\n"
    out, events, closed = _run(world, data, preauth=False)
    assert re.search(rb"s1 BAD .*nested", out), out
    assert len(events) == 1 and len(repr(events[0])) < 2000, [e["log_format"] for e in events]


def test_deep_mime_bodystructure_and_sections(tmp_path_factory):
    world = _world(tmp_path_factory)
    out, events, closed = _run(world, b"f1 FETCH 2:4 (BODYSTRUCTURE)\r\nf2 FETCH 2 BODY.PEEK["
                          + b"1." * 99 + b"1]\r\n", preauth=False)
    _check(out, events)
    assert b"f1 OK" in out and b"f2 OK" in out
    assert len(out) < 2 * 1024 * 1024


# -- hypothesis: generated commands ------------------------------------------------------------

_atom = st.sampled_from([b"ALL", b"1", b"1:*", b"*", b"2,3:4", b"FLAGS", b"UID", b"BODY[]",
                         b"BODY.PEEK[HEADER.FIELDS (SUBJECT)]", b"BODY[1.2.MIME]", b"BODY[]<0.10>",
                         b"RFC822.SIZE", b"ENVELOPE", b"BODYSTRUCTURE", b"NOT", b"OR", b"SEEN",
                         b"UNSEEN", b"SUBJECT", b"HEADER", b"LARGER", b"UID", b"INBOX", b"\\Seen",
                         b"$Label1", b"+FLAGS", b"FLAGS.SILENT", b"0", b"99999999999999999999",
                         b"1." * 20 + b"1", b"CHARSET", b"UTF-8", b"NIL", b"%", b"\xff", b"a]b"])
_quoted = st.binary(max_size=12).map(
    lambda b: b'"' + b.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"\r", b"")
    .replace(b"\n", b"") + b'"')
_literal = st.binary(max_size=20).map(lambda b: b"{%d+}\r\n" % len(b) + b)
_leaf = st.one_of(_atom, _quoted, _literal)
_arg = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=4).map(
    lambda xs: b"(" + b" ".join(xs) + b")"), max_leaves=12)
_name = st.sampled_from([b"SEARCH", b"UID SEARCH", b"FETCH", b"UID FETCH", b"STORE", b"SELECT",
                         b"EXAMINE", b"LIST", b"STATUS", b"NOOP", b"CAPABILITY", b"ID", b"LOGIN",
                         b"AUTHENTICATE", b"ENABLE", b"BOGUS", b"UID BOGUS", b"CHECK"])
_command = st.tuples(_name, st.lists(_arg, max_size=6))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_command, min_size=1, max_size=5), st.booleans())
def test_generated_commands_get_one_tagged_reply_each(tmp_path_factory, commands, preauth):
    world = _world(tmp_path_factory)
    data = b"".join(b"t%d %s %s\r\n" % (i, name, b" ".join(args))
                    for i, (name, args) in enumerate(commands))
    data += b"z9 NOOP\r\n"
    out, events, closed = _run(world, data, preauth)
    _check(out, events)
    if closed:
        return  # a pre-auth limit or LOGOUT: closed on purpose (BYE said why)
    tags = re.findall(rb"(?m)^(t\d+|z9) (?:OK|NO|BAD)", out)
    assert tags == [b"t%d" % i for i in range(len(commands))] + [b"z9"], out[-400:]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=300), st.booleans())
def test_raw_bytes_never_break_the_server(tmp_path_factory, data, preauth):
    # Hypothesis also draws string constants from the source, this marker among them: a client
    # sending it gets it echoed back as its tag, which is no server bug.
    assume(b"SERVERBUG" not in data)
    world = _world(tmp_path_factory)
    out, events, closed = _run(world, data + b"\r\nz9 NOOP\r\n", preauth)
    _check(out, events)

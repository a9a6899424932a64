"""Fuzzing the POP3 command parser and state machine (hypothesis), replaying
tests/unit/corpus/pop3/ first. Invariants: nothing raises, no traceback is logged, every command
gets exactly one status line (+OK, -ERR, or "+ " for a SASL continuation) followed by its
multi-line body when it has one, until the session closes, and the pending input stays bounded.

A corpus file is the client's bytes; `pre-*` files are sent right after the greeting, `txn-*`
files after a login."""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.logger import globalLogPublisher

from mailsuite.pop3.server import MAX_PENDING
from tests.unit.pop3kit import PASSWORD, USERS, Pop3World, message, plain

ALICE = USERS[0]
CORPUS = os.path.join(os.path.dirname(__file__), "corpus", "pop3")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # The throttle's delays are tested elsewhere; here they would only make examples slow.
    return Pop3World(str(tmp_path_factory.mktemp("pop3fuzz")), latency=0.2,
                     auth_failure_delay=0.0)


def session(world: Pop3World, logged_in: bool):
    if not world.store.account(ALICE).folder("INBOX").sync():
        world.put(ALICE, message("fuzz", b".dot\r\nline\r\n"))
    c = world.login(ALICE) if logged_in else world.connect()
    if not logged_in:
        assert c.line().startswith(b"+OK")
    return c


def multiline(command: bytes) -> bool:
    """Whether +OK to this command line is followed by lines up to "." (RFC 1939, 2449, 5034)."""
    verb, _, arg = command.decode("utf-8", "replace").partition(" ")
    verb = verb.upper()
    if verb in ("CAPA", "RETR", "TOP"):
        return True
    return verb in ("LIST", "UIDL", "AUTH") and not arg.strip()


def check(world: Pop3World, commands: list[bytes], logged_in: bool, chunks: int = 1) -> None:
    failures: list[dict] = []

    def observer(event: dict) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observer)
    c = session(world, logged_in)
    try:
        data = b"".join(line + b"\r\n" for line in commands)
        size = max(1, len(data) // chunks)
        for i in range(0, len(data), size):
            if c.closed():
                break
            c.send(data[i:i + size])
            assert len(c.proto._buffer) <= MAX_PENDING
        world.clock.advance(0)
        for _ in range(20):  # the directory's latency
            world.clock.advance(1)
        replies = c.unread().split(b"\r\n")
        assert replies[-1] == b"", "a reply line without CRLF"
        replies = replies[:-1]
        sasl = False
        for command in commands:
            if not replies:
                assert c.closed(), f"no reply to {command!r}"
                break
            status = replies.pop(0)
            assert status.startswith((b"+OK", b"-ERR", b"+ ")), (command, status)
            if sasl:
                sasl = False
                assert not status.startswith(b"+ ")
                continue
            if status == b"+ ":
                sasl = True
                continue
            if status.startswith(b"+OK") and multiline(command):
                while replies and replies[0] != b".":
                    replies.pop(0)
                assert replies, f"multi-line reply to {command!r} not ended"
                replies.pop(0)
        if replies:  # a last notice before the connection closed (errors, rate, overflow)
            assert c.closed() and len(replies) == 1 and replies[0].startswith(b"-ERR"), replies
    finally:
        globalLogPublisher.removeObserver(observer)
        c.disconnect()
    assert not failures, failures[0].get("log_format")


def corpus() -> list[str]:
    return sorted(os.listdir(CORPUS))


@pytest.mark.parametrize("name", corpus())
def test_corpus(world, name):
    with open(os.path.join(CORPUS, name), "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    commands = [line.rstrip(b"\r") for line in lines]
    check(world, commands, logged_in=name.startswith("txn-"))
    check(world, commands, logged_in=name.startswith("txn-"), chunks=5)


VERBS = [b"USER", b"PASS", b"AUTH", b"APOP", b"STLS", b"CAPA", b"NOOP", b"STAT", b"LIST", b"UIDL",
         b"RETR", b"TOP", b"DELE", b"RSET", b"QUIT", b"XTND", b"user", b"Retr", b""]
arguments = st.one_of(
    st.just(b""),
    st.sampled_from([b"1", b"2", b"0", b"-1", b"99999999999999999999", b"1 0", b"1 5", b"1 x",
                     ALICE.encode(), PASSWORD.encode(), b"PLAIN", b"PLAIN " + plain(ALICE).encode(),
                     b"PLAIN =", b"PLAIN *", b"CRAM-MD5", b"x" * 600, b"\xff\xfe", b"\x00",
                     "ü".encode()]),
    st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))
command = st.one_of(
    st.tuples(st.sampled_from(VERBS), arguments).map(lambda t: b" ".join(t) if t[1] else t[0]),
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.just(plain(ALICE).encode()),
    st.just(b"*"))


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(command, min_size=1, max_size=15), st.booleans(), st.integers(1, 4))
def test_fuzz_command_sequences(world, commands, logged_in, chunks):
    check(world, commands, logged_in, chunks)

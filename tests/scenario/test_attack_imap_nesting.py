"""Attack: nesting against the real server. SEARCH with 15,000 nested NOT (and deep
parentheses, deep OR) gets a clean BAD with one short log line, not RecursionError and
[SERVERBUG]; a message with 10,000 nested multiparts or message/rfc822 parts can be FETCHed
(BODYSTRUCTURE, deep sections, SEARCH BODY): deeper parts stay opaque. Other clients are
served meanwhile (docs/design/imap.md, "Limits"). Prints `ATTACK imap_nesting: ...`."""
from __future__ import annotations

import os
import time

import pytest

from tests.harness import rss_kib
from tests.scenario.imapraw import PASSWORD, Raw, serve_normal_client, tagged


@pytest.fixture
def srv(make_server):
    s = make_server(listeners=["imap", "imaps"])
    s.add_user("alice@example.org", PASSWORD)
    s.add_user("bob@example.org", PASSWORD)
    return s


def _deep_multipart(levels: int) -> bytes:
    out = [b"From: a@example.org\r\nSubject: deep\r\n"]
    for i in range(levels):
        out.append(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i))
    out.append(b"Content-Type: text/plain\r\n\r\ninnermost\r\n")
    out += [b"--b%d--\r\n" % i for i in reversed(range(levels))]
    return b"".join(out)


def _deep_rfc822(levels: int) -> bytes:
    return (b"From: a@example.org\r\nSubject: deep822\r\n"
            + b"Content-Type: message/rfc822\r\n\r\n" * levels + b"\r\ninnermost\r\n")


def _drop(srv, data: bytes, n: int) -> None:
    root = srv.maildir("alice@example.org")
    with open(os.path.join(root, "new", f"{int(time.time())}.M{n}P1Q1.attack"), "wb") as f:
        f.write(data)


def test_deep_search_and_deep_mime(srv):
    r = Raw(srv)  # first login: creates the Maildir
    _drop(srv, _deep_multipart(10000), 1)
    _drop(srv, _deep_rfc822(10000), 2)
    assert tagged(r.cmd(b"s SELECT INBOX")).startswith(b"s OK")
    before = rss_kib(srv.process.pid)
    log_before = len(srv.log_text())
    served = attempts = 0

    searches = [b"NOT " * 15000 + b"ALL", b"(" * 5000 + b"ALL" + b")" * 5000,
                b"OR ALL " * 5000 + b"ALL", b"NOT " * 101 + b"ALL"]
    for i, program in enumerate(searches):
        resp = r.cmd(b"q%d SEARCH " % i + program)
        assert tagged(resp).startswith(b"q%d BAD" % i), tagged(resp)[:200]
        attempts += 1
        served += serve_normal_client(srv)
    # A modest nesting still works.
    assert tagged(r.cmd(b"q9 SEARCH " + b"NOT " * 20 + b"ALL")).startswith(b"q9 OK")

    for i, items in enumerate([b"(BODYSTRUCTURE)", b"(BODY ENVELOPE)",
                               b"(BODY.PEEK[" + b"1." * 99 + b"1])",
                               b"(BODY.PEEK[" + b"1." * 30 + b"1.MIME])"]):
        resp = r.cmd(b"f%d FETCH 1:2 " % i + items)
        assert tagged(resp).startswith(b"f%d OK" % i), tagged(resp)[:200]
        attempts += 1
        served += serve_normal_client(srv)
    resp = r.cmd(b"b1 SEARCH BODY innermost")
    assert tagged(resp).startswith(b"b1 OK")
    resp = r.cmd(b"b2 FETCH 1 BODY.PEEK[" + b"1." * 3000 + b"1]")
    assert tagged(resp).startswith(b"b2 BAD")

    after = rss_kib(srv.process.pid)
    log = srv.log_text()[log_before:]
    print(f"\nATTACK imap_nesting: rss_before={before}KiB rss_after={after}KiB "
          f"served={served}/{attempts} log_bytes={len(log)}")
    assert served == attempts
    assert "RecursionError" not in log and "Traceback" not in log and "SERVERBUG" not in log
    assert len(log) < 20 * 1024, log[-2000:]  # one short line per refused command
    assert after - before < 50 * 1024

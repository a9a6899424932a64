"""Attack: memory before login through IMAP literals and endless lines, against the real
server. APPEND literals before login are refused without `+`, a non-synchronizing one is
answered BAD and the connection closed, a 10 MB line without a newline is cut off after a few
KiB; the server's RSS stays flat and other clients are served meanwhile
(docs/design/imap.md, "Limits"). Prints `ATTACK imap_literals: ...`."""
from __future__ import annotations

import os
import socket

import pytest

from tests.harness import rss_kib
from tests.scenario.imapraw import PASSWORD, Raw, read_until_closed, serve_normal_client

ATTACKERS = [f"127.0.0.{n}" for n in range(2, 12)]  # 10 source addresses
MIB = 1024 * 1024


@pytest.fixture
def srv(make_server):
    s = make_server(listeners=["imap", "imaps"])
    s.add_user("alice@example.org", PASSWORD)
    s.add_user("bob@example.org", PASSWORD)
    return s


def _connect(srv, source: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.ports["imap"]), timeout=10,
                                    source_address=(source, 0))
    greeting = sock.recv(4096)
    assert greeting.startswith(b"* OK"), greeting
    return sock


def _send_until_closed(sock: socket.socket, data: bytes, total: int) -> int:
    """Send `total` octets in chunks of `data` until the server closes; the octets sent."""
    sent = 0
    try:
        while sent < total:
            sock.sendall(data)
            sent += len(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def test_preauth_literals_and_endless_lines(srv):
    assert serve_normal_client(srv)  # warm up: the Maildir and the first login exist
    before = rss_kib(srv.process.pid)
    served = attempts = 0
    sockets = []

    # 1. APPEND {25 MiB} before login, from 10 addresses: BAD, never "+ Ready".
    for src in ATTACKERS:
        s = _connect(srv, src)
        s.sendall(b"a APPEND INBOX {26214400}\r\n")
        reply = s.recv(4096)
        assert reply.startswith(b"a BAD") and not reply.startswith(b"+"), reply
        sockets.append(s)
    attempts += 1
    served += serve_normal_client(srv)

    # 2. The same with LITERAL+ and the 25 MiB sent anyway: BAD, BYE and closed.
    for src in ATTACKERS:
        s = _connect(srv, src)
        s.sendall(b"a APPEND INBOX {26214400+}\r\n")
        _send_until_closed(s, b"x" * 65536, 25 * MIB)
        s.settimeout(10)
        try:
            out = read_until_closed(s)
        except ConnectionResetError:
            out = b"a BAD (reset)"
        assert out.startswith(b"a BAD"), out[:200]
        s.close()
    attempts += 1
    served += serve_normal_client(srv)

    # 3. 10 MB without a newline, from each address: BAD and closed after a few KiB.
    accepted = []
    for src in ATTACKERS:
        s = _connect(srv, src)
        accepted.append(_send_until_closed(s, b"A" * 65536, 10 * MIB))
        s.settimeout(10)
        try:
            out = read_until_closed(s)
            assert b"BAD" in out and b"BYE" in out, out[:200]
        except ConnectionResetError:
            pass  # closed while our data was still unread: the kernel answered with RST
        s.close()
    assert max(accepted) < 10 * MIB, accepted  # the server closed before the 10 MB were in
    attempts += 1
    served += serve_normal_client(srv)

    # The refused APPENDs of step 1 are still in step: their next command is answered.
    for s in sockets:
        s.sendall(b"b CAPABILITY\r\n")
        buf = b""
        while b"b OK" not in buf:
            d = s.recv(4096)
            assert d, buf
            buf += d
        s.close()
    attempts += 1
    served += serve_normal_client(srv)

    after = rss_kib(srv.process.pid)
    print(f"\nATTACK imap_literals: rss_before={before}KiB rss_after={after}KiB "
          f"served={served}/{attempts}")
    assert served == attempts
    assert after - before < 30 * 1024, (before, after)  # 20 x 25 MiB offered
    log = srv.log_text()
    assert "Traceback" not in log and "SERVERBUG" not in log
    assert Raw(srv).cmd(b"n NOOP")[-1].startswith(b"n OK")


def test_big_appends_after_login_go_to_disk_not_memory(srv):
    """Logged-in clients APPENDing 20 MiB each at once: the literals are spooled to files as
    they arrive, so RSS stays flat, and the stored messages are intact."""
    assert serve_normal_client(srv)
    before = rss_kib(srv.process.pid)
    size = 20 * MIB
    line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n"
    msg = b"Subject: big append\r\n\r\n" + line * ((size - 30) // len(line))
    clients = [Raw(srv, source=src) for src in ATTACKERS[:5]]
    for i, r in enumerate(clients):
        r.send(b"a%d APPEND INBOX {%d}\r\n" % (i, len(msg)))
        assert r.line().startswith(b"+")
    # Interleave the five literals so the server holds all of them at once.
    for off in range(0, len(msg), MIB):
        for r in clients:
            r.send(msg[off:off + MIB])
    peak = rss_kib(srv.process.pid)
    for i, r in enumerate(clients):
        r.send(b"\r\n")
        assert r.response(b"a%d" % i)[-1].startswith(b"a%d OK [APPENDUID" % i)
    served = int(serve_normal_client(srv))
    after = rss_kib(srv.process.pid)
    for r in clients:
        r.close()
    stored = [p for p in srv.messages("alice@example.org") if os.path.getsize(p) == len(msg)]
    print(f"\nATTACK imap_append_after_login: rss_before={before}KiB rss_after={after}KiB "
          f"rss_during={peak}KiB served={served}/1")
    assert len(stored) == 5
    assert open(stored[0], "rb").read() == msg
    assert max(peak, after) - before < 40 * 1024, (before, peak, after)  # 100 MiB offered
    assert served == 1
    tmp = os.path.join(srv.maildir("alice@example.org"), "tmp")
    assert not [n for n in os.listdir(tmp) if n.startswith("imap-append.")]


def test_no_login_in_time_is_closed(make_server):
    s = make_server(listeners=["imap", "imaps"], extra={"imap": {"login_timeout": 2}})
    s.add_user("bob@example.org", PASSWORD)
    silent = [_connect(s, src) for src in ATTACKERS[:5]]
    assert serve_normal_client(s)
    for sock in silent:
        sock.settimeout(15)
        out = read_until_closed(sock)
        assert b"* BYE" in out, out
        sock.close()

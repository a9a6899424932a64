"""Attack class "pop3 memory": a POP3 client makes the server hold its data.

1. 200 MB pipelined behind a PASS the directory is still checking (before login);
2. logged in, RETR x200 of a 1 MB message plus a NOOP flood, never reading a reply.

The defence (docs/design/pop3.md, "Limits"): the server stops reading while a command runs or
while the client does not read its replies, so TCP holds the attacker back; what still arrives is
capped. RSS stays bounded during the attack and after the attacker is gone, and other clients
are served meanwhile. Prints `ATTACK pop3_memory: ...` (run with -s)."""
from __future__ import annotations

import os
import poplib
import socket
import ssl
import time

import pytest

from tests.harness import HOST, rss_kib
from tests.polling import wait_until

PASSWORD = "secret-pw-1"
ATTACKER, OTHER = "alice@example.org", "bob@example.org"
RSS_GROWTH_LIMIT = 60 * 1024  # KiB: the attack may not cost more than this, during or after




def put(maildir: str, name: str, data: bytes) -> None:
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(maildir, sub), exist_ok=True)
    with open(os.path.join(maildir, "tmp", name), "wb") as f:
        f.write(data)
    os.rename(os.path.join(maildir, "tmp", name), os.path.join(maildir, "new", name))


@pytest.fixture
def pop_server(make_server):
    s = make_server(listeners=["mx", "pop3", "pop3s"])
    s.add_user(ATTACKER, PASSWORD)
    s.add_user(OTHER, PASSWORD)
    body = b"".join(b"line %06d " % i + b"x" * 60 + b"\r\n" for i in range(14000))
    big = b"From: a@example.net\r\nSubject: big\r\n\r\n" + body
    assert len(big) > 1_000_000
    put(s.maildir(ATTACKER), f"1700000001.M1P1Q1.attack,S={len(big)}", big)
    put(s.maildir(OTHER), "1700000002.M2P2Q2.attack,S=40",
        b"From: a@example.net\r\nSubject: hi\r\n\r\nhello\r\n")
    return s


def tls_socket(server) -> tuple[ssl.SSLSocket, object]:
    raw = socket.create_connection((HOST, server.ports["pop3s"]), timeout=10)
    sock = server.ssl_context().wrap_socket(raw, server_hostname="localhost")
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"+OK")
    return sock, reader


def flood(sock: ssl.SSLSocket, data: bytes, limit: int, seconds: float) -> int:
    """Send `data` repeatedly until `limit` octets, `seconds`, or the server stops taking it
    (a send that blocks for a second: TCP's window is shut) or hangs up."""
    sock.settimeout(1.0)
    sent, deadline = 0, time.monotonic() + seconds
    while sent < limit and time.monotonic() < deadline:
        try:
            sock.sendall(data)
        except (socket.timeout, TimeoutError):
            break  # held back by flow control
        except OSError:
            break  # the server closed the connection
        sent += len(data)
    return sent


def served(server, n: int) -> int:
    """How many of `n` normal POP3 sessions (login, STAT, RETR, QUIT) succeed."""
    ok = 0
    for _ in range(n):
        try:
            p = poplib.POP3_SSL(HOST, server.ports["pop3s"], context=server.ssl_context(),
                                timeout=15)
            p.user(OTHER)
            p.pass_(PASSWORD)
            assert p.stat()[0] == 1
            assert b"hello" in b"\n".join(p.retr(1)[1])
            p.quit()
            ok += 1
        except (OSError, poplib.error_proto, AssertionError):
            pass
    return ok


def test_pop3_memory_attacks(pop_server):
    pid = pop_server.process.pid
    assert served(pop_server, 1) == 1  # warm up: every module and the TLS context are loaded
    rss_before = rss_kib(pid)
    total_served = total_tried = 0

    # 1. 200 MB pipelined behind PASS, before login.
    sock, reader = tls_socket(pop_server)
    sock.sendall(f"USER {ATTACKER}\r\nPASS {PASSWORD}\r\n".encode())
    sent = flood(sock, b"NOOP\r\n" * 10000, 200 * 1024 * 1024, 6.0)
    assert sent < 200 * 1024 * 1024, "the server read everything it was sent"
    peak = rss_kib(pid)
    total_served += served(pop_server, 3)
    total_tried += 3
    reader.close()  # the file object holds the socket open otherwise
    sock.close()

    # 2. Logged in, RETR x200 of 1 MB and a NOOP flood, never reading.
    sock, reader = wait_until(lambda: _logged_in(pop_server), timeout=15,
                              message="the maildrop lock given back after attack 1")
    sock.sendall(b"RETR 1\r\n" * 200)
    sent2 = flood(sock, b"NOOP\r\n" * 10000, 200 * 1024 * 1024, 6.0)
    assert sent2 < 200 * 1024 * 1024
    peak = max(peak, rss_kib(pid))
    total_served += served(pop_server, 3)
    total_tried += 3
    reader.close()  # the file object holds the socket open otherwise
    sock.close()

    # Gone: the server noticed (the maildrop lock is free again) and gave the memory back.
    extra, extra_reader = wait_until(lambda: _logged_in(pop_server), timeout=15,
                                     message="the maildrop lock given back after attack 2")
    extra_reader.close()
    extra.close()
    rss_after = rss_kib(pid)
    print(f"\nATTACK pop3_memory: rss_before={rss_before}KiB peak={peak}KiB "
          f"rss_after={rss_after}KiB served={total_served}/{total_tried} "
          f"flood_accepted={sent}+{sent2}B")
    assert total_served == total_tried
    assert peak - rss_before < RSS_GROWTH_LIMIT, (rss_before, peak)
    assert rss_after - rss_before < RSS_GROWTH_LIMIT, (rss_before, rss_after)
    assert "Traceback" not in pop_server.log_text()


def _logged_in(server):
    """A raw pop3s session logged in as the attacker, or None while the maildrop is locked."""
    sock, reader = tls_socket(server)
    sock.sendall(f"USER {ATTACKER}\r\nPASS {PASSWORD}\r\n".encode())
    assert reader.readline().startswith(b"+OK")
    if reader.readline().startswith(b"+OK"):
        return sock, reader
    reader.close()
    sock.close()
    return None

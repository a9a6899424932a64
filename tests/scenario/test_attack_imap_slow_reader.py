"""Attack: a logged-in client that sends 200 FETCH BODY[] of a 1 MiB message, then a flood of
NOOPs, and never reads. The server stops reading its commands once its output buffer is full
(the connection's push producer, docs/design/imap.md, "Limits"), so its RSS stays bounded, and
other clients are served meanwhile. Prints `ATTACK imap_slow_reader: ...`."""
from __future__ import annotations

import os
import socket
import time

import pytest

from tests.harness import rss_kib
from tests.polling import wait_until
from tests.scenario.imapraw import PASSWORD, Raw, serve_normal_client, tagged

MIB = 1024 * 1024


@pytest.fixture
def srv(make_server):
    s = make_server(listeners=["imap", "imaps"],
                    extra={"limits": {"max_message_size": 4 * MIB}})
    s.add_user("alice@example.org", PASSWORD)
    s.add_user("bob@example.org", PASSWORD)
    return s


def _send_until_blocked(sock: socket.socket, data: bytes, limit: int) -> int:
    """Send `data` repeatedly until the server stops reading (a send times out) or `limit`
    octets are sent; the octets sent."""
    sent = 0
    sock.settimeout(2.0)
    try:
        while sent < limit:
            n = sock.send(data)
            sent += n
    except (socket.timeout, BlockingIOError):
        pass
    return sent


def test_fetch_flood_without_reading(srv):
    r = Raw(srv)
    root = srv.maildir("alice@example.org")
    body = (b"0123456789abcdef" * 63 + b"\r\n") * 1040  # ~1 MiB
    with open(os.path.join(root, "new", f"{int(time.time())}.M1P1Q1.big"), "wb") as f:
        f.write(b"From: a@example.org\r\nSubject: big\r\n\r\n" + body)
    assert tagged(r.cmd(b"s SELECT INBOX")).startswith(b"s OK")
    assert serve_normal_client(srv)
    before = rss_kib(srv.process.pid)

    # The attacker: a small receive buffer, 200 FETCHes of 1 MiB, then NOOPs, reading nothing.
    r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    fetches = b"".join(b"f%d FETCH 1 BODY.PEEK[]\r\n" % i for i in range(200))
    r.sock.settimeout(10)
    r.sock.sendall(fetches)
    sent = _send_until_blocked(r.sock, b"n NOOP\r\n" * 512, 64 * MIB)
    assert sent < 64 * MIB  # the server stopped reading our commands

    served = attempts = 0
    for _ in range(5):
        attempts += 1
        served += serve_normal_client(srv)
    after = rss_kib(srv.process.pid)
    print(f"\nATTACK imap_slow_reader: rss_before={before}KiB rss_after={after}KiB "
          f"served={served}/{attempts} commands_sent={sent}")
    assert served == attempts
    assert after - before < 40 * 1024, (before, after)  # not 200 MiB
    r.close()
    wait_until(lambda: serve_normal_client(srv), message="service after the attack")
    log = srv.log_text()
    assert "Traceback" not in log and "SERVERBUG" not in log

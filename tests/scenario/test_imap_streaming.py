"""Large messages are streamed from the file (no whole copies in memory), and connection
limits hold over real TLS connections. (The idle timeout is tested on a clock in
tests/unit/test_imap_login.py.)"""
from __future__ import annotations

import hashlib
import os
import re
import socket
import time

import pytest

from tests.harness import MailServer
from tests.polling import wait_until
from tests.scenario.imapraw import PASSWORD, Raw, admitted, tagged

BIG = 40 * 1024 * 1024


def _peak_kb(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


@pytest.fixture
def big_server(make_server):
    s: MailServer = make_server(listeners=["imap", "imaps"],
                                extra={"limits": {"max_message_size": 64 * 1024 * 1024,
                                                  "max_connections_per_ip": 1}})
    s.add_user("alice@example.org", PASSWORD)
    return s


def test_whole_message_fetch_of_40_mb_streams_without_copies(big_server):
    r = Raw(big_server)  # first login: creates the Maildir
    root = big_server.maildir("alice@example.org")
    head = (b"From: big@example.org\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
            b"Content-Type: text/plain\r\n\r\nsee attachment\r\n--b\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n")
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAx\r\n"
    body = line * ((BIG - len(head)) // len(line))
    data = head + body + b"--b--\r\n"
    name = f"{int(time.time())}.M1P1Q1.test,S={len(data)}"
    with open(os.path.join(root, "new", name), "wb") as f:
        f.write(data)
    digest = hashlib.sha256(data).hexdigest()
    del body
    r.cmd(b"s SELECT INBOX")
    pid = big_server.process.pid
    rss0, hwm0 = _peak_kb(pid)
    r.send(b"a FETCH 1 (BODY.PEEK[])\r\n")
    first = r.line()
    m = re.search(rb"\{(\d+)\}$", first)
    assert m and int(m.group(1)) == len(data), first
    h = hashlib.sha256()
    left = len(data)
    r.sock.settimeout(30)
    while left:
        # Small reads, each hashed: a reader slower than the server, which must wait for it
        # (backpressure) rather than buffer the message.
        chunk = r.read_exact(min(left, 16 * 1024))
        h.update(chunk)
        left -= len(chunk)
    assert h.hexdigest() == digest
    assert tagged(r.response(b"a")).startswith(b"a OK")
    rss1, hwm1 = _peak_kb(pid)
    # Not even one copy of the 40 MB message may have been held in the server's memory.
    assert hwm1 - hwm0 < 20 * 1024, (hwm0, hwm1)
    resp = r.cmd(b"b FETCH 1 (BODYSTRUCTURE BODY.PEEK[1] BODY.PEEK[2]<0.76>)")
    assert b'"APPLICATION" "OCTET-STREAM"' in resp[0] and b"see attachment" in resp[0]
    assert line in resp[0]
    # A client that hangs up in the middle of a streamed literal: the server cleans up quietly.
    r.send(b"c FETCH 1 (BODY[])\r\n")
    r.read_exact(1 << 20)
    r.close()
    # One connection per client IP: a second one is admitted once the server has cleaned up
    # after the first.
    r2 = wait_until(lambda: admitted(big_server), message="the first connection to be released")
    r2.cmd(b"L LOGIN alice@example.org " + PASSWORD.encode())
    assert tagged(r2.cmd(b"d NOOP")).startswith(b"d OK")
    r2.close()
    log = big_server.log_text()
    assert "Traceback" not in log and "critical" not in log, log[-3000:]


def test_connections_per_ip_are_limited(make_server):
    s: MailServer = make_server(listeners=["imaps"], extra={"limits": {"max_connections_per_ip": 3}})
    # LOGOUT over TLS really ends the connection (it once waited forever for close_notify on a
    # paused transport, and each logout leaked a per-IP slot).
    for i in range(5):
        r = wait_until(lambda: admitted(s), message="a free connection slot")
        resp = r.cmd(b"a LOGOUT")
        assert resp[0].startswith(b"* BYE") and tagged(resp).startswith(b"a OK")
        r.close()
    conns = [wait_until(lambda: admitted(s), message="a free connection slot") for _ in range(3)]
    extra = socket.create_connection(("127.0.0.1", s.ports["imaps"]), timeout=10)
    tls = s.ssl_context().wrap_socket(extra)
    assert tls.recv(4096).startswith(b"* BYE")
    tls.close()
    conns.pop().close()
    again = wait_until(lambda: admitted(s), message="a free slot")  # a slot is free again
    assert again.greeting.startswith(b"* OK")
    for c in conns + [again]:
        c.close()

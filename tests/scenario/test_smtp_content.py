"""End to end through the real server: with `[smtp] bad_line_endings = "normalise"` a message
with bare CR/LF is stored with CRLF only, and the courier relays exactly that (never the raw
bytes); NUL is refused and nothing is relayed; a forged From: on submission is 553 and nothing is
relayed. The next hop is a small SMTP sink in the test that records what it receives."""
from __future__ import annotations

import os
import smtplib
import socket
import socketserver
import threading
import uuid

import pytest

from tests.harness import HOST, MailServer
from tests.polling import wait_until

PASSWORD = "secret-pw-1"


class _Sink(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__((HOST, 0), _SinkHandler)
        self.messages: list[bytes] = []  # the DATA section as received on the wire


class _SinkHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(b"220 sink.example ESMTP\r\n")
        while True:
            line = self.rfile.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.wfile.write(b"250-sink.example\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                self.wfile.write(b"354 go on\r\n")
                data = b""
                while not data.endswith(b"\r\n.\r\n"):
                    chunk = self.rfile.readline()
                    if not chunk:
                        return
                    data += chunk
                self.server.messages.append(data)
                self.wfile.write(b"250 2.0.0 kept\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 ok\r\n")


@pytest.fixture(scope="module")
def relay():
    sink = _Sink()
    thread = threading.Thread(target=sink.serve_forever, daemon=True)
    thread.start()
    yield sink
    sink.shutdown()
    sink.server_close()


@pytest.fixture(scope="module")
def normalising(tmp_path_factory, relay):
    s = MailServer(str(tmp_path_factory.mktemp("content")), listeners=["mx", "submissions"],
                   extra={"smtp": {"bad_line_endings": "normalise"},
                          "courier": {"relay": f"{HOST}:{relay.server_address[1]}",
                                      "relay_tls": "none"}})
    s.start()
    try:
        s.add_user("alice@example.org")
        s.add_user("bob@example.org")
        yield s
    finally:
        s.stop()


def submit_raw(server: MailServer, rcpts: list[str], raw: bytes,
               sender: str = "alice@example.org") -> tuple[int, bytes]:
    """Send `raw` as the DATA section exactly as given (smtplib would dot-stuff after a bare
    LF); returns the reply to the final dot."""
    with smtplib.SMTP_SSL(HOST, server.ports["submissions"], timeout=20,
                          context=server.ssl_context()) as c:
        c.login("alice@example.org", PASSWORD)
        assert c.mail(sender)[0] == 250
        for rcpt in rcpts:
            assert c.rcpt(rcpt)[0] == 250
        assert c.docmd("DATA")[0] == 354
        c.send(raw + b".\r\n")
        return c.getreply()


def relayed(sink: _Sink, marker: bytes, timeout: float = 30.0) -> bytes:
    return wait_until(lambda: next((m for m in sink.messages if marker in m), None), timeout,
                      message="the relayed message")


def test_bare_line_ends_are_stored_and_relayed_as_crlf(normalising, relay):
    marker = uuid.uuid4().hex.encode()
    raw = (b"From: alice@example.org\r\nSubject: " + marker + b"\nX-Bare: lf\r\n\r\n"
           b"one\ntwo\rthree\r\n\n.\nMAIL FROM:<evil@x.example>\n.\rend\r\n")
    code, text = submit_raw(normalising, ["far@remote.example", "bob@example.org"], raw)
    assert code == 250, text
    wire = relayed(relay, marker)
    # Every line end on the wire is CRLF, and the only end-of-data is the real one.
    assert b"\r" not in wire.replace(b"\r\n", b"") and b"\n" not in wire.replace(b"\r\n", b"")
    assert wire.count(b"\r\n.\r\n") == 1 and wire.endswith(b"\r\n.\r\n")
    body = wire.split(b"\r\n\r\n", 1)[1]
    assert body == (b"one\r\ntwo\r\nthree\r\n\r\n..\r\nMAIL FROM:<evil@x.example>\r\n..\r\n"
                    b"end\r\n.\r\n")
    # The local copy is the same bytes as the spool held.
    normalising.wait_for_messages("bob@example.org", 1)
    with open(normalising.messages("bob@example.org")[0], "rb") as f:
        local = f.read()
    assert marker in local and b"\n" not in local.replace(b"\r\n", b"")
    assert local.split(b"\r\n\r\n", 1)[1] == (b"one\r\ntwo\r\nthree\r\n\r\n.\r\n"
                                              b"MAIL FROM:<evil@x.example>\r\n.\r\nend\r\n")


def test_nul_is_refused_and_never_relayed(normalising, relay):
    marker = uuid.uuid4().hex.encode()
    raw = b"From: alice@example.org\r\nSubject: " + marker + b"\r\n\r\nnul\0here\r\n"
    code, text = submit_raw(normalising, ["far@remote.example"], raw)
    assert (code, text[:5]) == (550, b"5.6.0")
    # A message sent after it is relayed; the refused one never is.
    follow = uuid.uuid4().hex.encode()
    ok = b"From: alice@example.org\r\nSubject: " + follow + b"\r\n\r\nok\r\n"
    assert submit_raw(normalising, ["far@remote.example"], ok)[0] == 250
    relayed(relay, follow)
    assert not any(marker in m for m in relay.messages)


def test_forged_from_on_submission_is_553_and_never_relayed(normalising, relay):
    marker = uuid.uuid4().hex.encode()
    raw = b"From: The Boss <bob@example.org>\r\nSubject: " + marker + b"\r\n\r\npay now\r\n"
    code, text = submit_raw(normalising, ["far@remote.example"], raw)
    assert (code, text[:5]) == (553, b"5.7.1")
    follow = uuid.uuid4().hex.encode()
    assert submit_raw(normalising, ["far@remote.example"],
                      b"From: Alice <alice@example.org>\r\nSubject: " + follow
                      + b"\r\n\r\nok\r\n")[0] == 250
    relayed(relay, follow)
    assert not any(marker in m for m in relay.messages)


def test_leftover_staged_files_are_removed_at_start_up(tmp_path):
    s = MailServer(str(tmp_path / "restart"), listeners=["mx"])
    incoming = os.path.join(s.data_dir, "queue", "incoming")
    os.makedirs(incoming)
    leftover = os.path.join(incoming, "999999999.deadbeef")  # a crashed receiver's
    with open(leftover, "wb") as f:
        f.write(b"half a message")
    s.start()
    try:
        assert not os.path.exists(leftover)
        sock = socket.create_connection((HOST, s.ports["mx"]), timeout=10)
        assert sock.recv(100).startswith(b"220")
        sock.close()
    finally:
        s.stop()

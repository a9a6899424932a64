"""Unit tests of the SMTP protocol object over a real loopback socket.

The protocol (mailsuite.smtp.server) runs in a subprocess (`python -m tests.test_smtp_server
serve DIR`) with a small Directory/Queue-shaped double that answers slowly (like a database in a
thread pool) and can be told to fail. That lets us test what the real server can't easily show:
replies in order under slow validation, 451 (not 550) when the queue fails, the Received header.
Everything else is tested against the real server in tests/integration/ and tests/dialogs/.
"""
from __future__ import annotations

import json
import os
import smtplib
import socket
import ssl
import subprocess
import sys
import time

import pytest

HOST = "127.0.0.1"


# -- the double server (runs in the subprocess) ---------------------------------------------------
def serve(base: str) -> None:  # pragma: no cover - runs in the child process
    from twisted.cred.error import UnauthorizedLogin
    from twisted.internet import defer, reactor
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from mailsuite.config import Config
    from mailsuite.directory.api import Route
    from mailsuite.smtp import server_factory
    from mailsuite.tls import TLSMaterial, create_self_signed

    config = Config()
    config.server.hostname = "mx.unit.example"
    config.server.data_dir = base
    config.limits.max_recipients = 3
    config.limits.max_message_size = 20000
    config.limits.auth_failure_delay = 0.05
    config.limits.smtp_timeout = 2
    config.limits.max_connections_per_ip = 8
    cert, key = os.path.join(base, "cert.pem"), os.path.join(base, "key.pem")
    create_self_signed("mx.unit.example", cert, key)
    users = {"alice@example.org": "pw-alice", "bob@example.org": "pw-bob"}
    delay = 0.05  # every lookup answers later, like SQL in a thread pool

    def later(value):
        d = defer.Deferred()
        reactor.callLater(delay, d.callback, value)
        return d

    def later_fail(exc):
        d = defer.Deferred()
        reactor.callLater(delay, d.errback, exc)
        return d

    class Directory:
        def route(self, address):
            local, _, domain = address.lower().rpartition("@")
            local = local.split("+", 1)[0]
            if domain != "example.org":
                return later(Route(address, hosted=False))
            canonical = f"{local}@{domain}"
            return later(Route(address, True, (canonical,) if canonical in users else ()))

        def authenticate(self, address, password):
            if users.get(address.lower()) == password:
                return later(address.lower())
            return later_fail(UnauthorizedLogin())

        def sender_addresses(self, user):
            return later(frozenset({user}))

    class Queue:
        n = 0

        def submit(self, sender, recipients, data, meta):
            if b"FAIL-THE-QUEUE" in data:
                return later_fail(OSError(28, "No space left on device"))
            Queue.n += 1
            qid = f"Q{Queue.n}"
            with open(os.path.join(base, qid + ".eml"), "wb") as f:
                f.write(data)
            with open(os.path.join(base, qid + ".json"), "w") as f:
                json.dump({"sender": sender, "recipients": [r for r, _ in recipients],
                           "meta": meta}, f)
            return later(qid)

    class Suite:
        pass

    suite = Suite()
    suite.config, suite.directory, suite.queue = config, Directory(), Queue()
    suite.tls, suite.reactor = TLSMaterial(cert, key, False), reactor
    ports = {}
    for name, policy, implicit in (("mx", "mx", False), ("submission", "submission", False),
                                   ("submissions", "submission", True)):
        factory = server_factory(suite, policy=policy, implicit_tls=implicit)
        if implicit:
            factory = TLSMemoryBIOFactory(suite.tls.server_context(), False, factory)
        ports[name] = reactor.listenTCP(0, factory, interface=HOST).getHost().port
    with open(os.path.join(base, "ports.json"), "w") as f:
        json.dump(ports, f)
    reactor.run()


# -- fixtures and helpers -------------------------------------------------------------------------
class DoubleServer:
    def __init__(self, base: str):
        self.base = base
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.test_smtp_server", "serve",
                                      base], cwd=os.path.dirname(os.path.dirname(__file__)),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        path = os.path.join(base, "ports.json")
        deadline = time.monotonic() + 20
        while not os.path.exists(path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(self.proc.stdout.read().decode())
            time.sleep(0.05)
        time.sleep(0.05)
        with open(path) as f:
            self.ports = json.load(f)

    def queued(self) -> list[dict]:
        out = []
        for name in sorted(os.listdir(self.base)):
            if name.endswith(".json") and name.startswith("Q"):
                with open(os.path.join(self.base, name)) as f:
                    entry = json.load(f)
                with open(os.path.join(self.base, name[:-5] + ".eml"), "rb") as f:
                    entry["data"] = f.read()
                out.append(entry)
        return out

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def double(tmp_path):
    s = DoubleServer(str(tmp_path))
    yield s
    s.stop()


class Raw:
    """A line-level SMTP client that can send anything, including pipelined batches."""

    def __init__(self, port: int, tls_context: ssl.SSLContext | None = None):
        sock = socket.create_connection((HOST, port), timeout=5)
        if tls_context is not None:
            sock = tls_context.wrap_socket(sock)
        self.sock = sock
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> tuple[int, list[bytes]]:
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return int(lines[0][:3]), lines

    def code(self) -> int:
        return self.reply()[0]

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            return True


def tls_client() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the double's throwaway certificate
    return ctx


def ehlo(c: Raw) -> list[bytes]:
    assert c.code() == 220
    c.send(b"EHLO client.example\r\n")
    code, lines = c.reply()
    assert code == 250
    return lines


# -- tests ----------------------------------------------------------------------------------------
def test_pipelined_commands_with_slow_validation_are_answered_in_order(double):
    # Twisted #8126: with asynchronous validateTo, stock ESMTP answered pipelined RCPTs out of
    # order and parsed DATA lines as commands. Every lookup of the double takes 50 ms.
    c = Raw(double.ports["mx"])
    ehlo(c)
    c.send(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\n"
           b"RCPT TO:<nobody@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
           b"RCPT TO:<someone@elsewhere.example>\r\nDATA\r\n")
    codes = [c.reply() for _ in range(6)]
    assert [r[0] for r in codes] == [250, 250, 550, 250, 554, 354]
    assert codes[2][1][0].startswith(b"550 5.1.1")
    assert codes[4][1][0].startswith(b"554 5.7.1")
    c.send(b"Subject: t\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    code, lines = c.reply()
    assert code == 250 and b"queued as Q1" in lines[0]
    assert c.code() == 221
    (entry,) = double.queued()
    assert entry["recipients"] == ["alice@example.org", "bob@example.org"]


def test_large_pipelined_burst_while_a_lookup_is_pending(double):
    # 240 KB of pipelined commands behind a slow RCPT: reading is paused past 64 KiB and resumed
    # after the reply; every command is answered, in order, and memory stays bounded.
    c = Raw(double.ports["mx"])
    ehlo(c)
    n = 40000
    c.send(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\n" + b"NOOP\r\n" * n
           + b"RSET\r\n")
    codes = [c.reply()[1][0][:9] for _ in range(n + 3)]
    assert codes[0] == b"250 2.1.0" and codes[1] == b"250 2.1.5"
    assert set(codes[2:]) == {b"250 2.0.0"}


def test_pipelined_quit_after_data_still_gets_the_250(double):
    # Stock ESMTP went back to command mode before eomReceived finished: a pipelined QUIT could
    # close the connection before the 250 was written (TWISTED-NOTES §1.5).
    c = Raw(double.ports["mx"])
    ehlo(c)
    c.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert [c.code() for _ in range(3)] == [250, 250, 354]
    c.send(b"x\r\n.\r\nQUIT\r\n")
    assert c.code() == 250
    assert c.code() == 221


def test_queue_failure_is_temporary_451_not_550(double):
    # Stock ESMTP answered every failing eomReceived with a permanent 550.
    c = Raw(double.ports["mx"])
    ehlo(c)
    c.send(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert [c.code() for _ in range(3)] == [250, 250, 354]
    c.send(b"Subject: FAIL-THE-QUEUE\r\n\r\nbody\r\n.\r\n")
    code, lines = c.reply()
    assert code == 451 and lines[0].startswith(b"451 4.3.0")
    # The session goes on: the next transaction works.
    c.send(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert [c.code() for _ in range(3)] == [250, 250, 354]
    c.send(b"ok\r\n.\r\n")
    assert c.code() == 250
    assert len(double.queued()) == 1


def test_received_header_is_well_formed(double):
    # Stock ESMTP's default receivedHeader raised TypeError (every DATA got 550).
    with smtplib.SMTP(HOST, double.ports["mx"], local_hostname="client.example") as s:
        s.sendmail("x@remote.example", ["alice@example.org"], b"Subject: hi\r\n\r\nbody\r\n")
    (entry,) = double.queued()
    first = entry["data"].split(b"\r\n\r\n", 1)[0]
    assert first.startswith(b"Received: from client.example (localhost [127.0.0.1])\r\n\tby "
                            b"mx.unit.example (mailsuite) with ESMTP id ")
    assert b"\tfor <alice@example.org>; " in first
    assert entry["data"].endswith(b"\r\n\r\nbody\r\n")
    assert entry["meta"] == {"client_ip": "127.0.0.1", "helo": "client.example",
                             "auth_user": None, "protocol": "ESMTP"}


def test_submission_adds_message_id_and_date_and_marks_esmtpsa(double):
    with smtplib.SMTP(HOST, double.ports["submission"], local_hostname="laptop") as s:
        s.starttls(context=tls_client())
        s.login("alice@example.org", "pw-alice")
        s.sendmail("alice@example.org", ["someone@elsewhere.example"], b"Subject: hi\r\n\r\nb\r\n")
        s.sendmail("alice@example.org", ["bob@example.org"],
                   b"Message-ID: <mine@x>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nb\r\n")
    first, second = double.queued()
    assert b"with ESMTPSA id" in first["data"]
    headers = first["data"].split(b"\r\n\r\n", 1)[0]
    assert b"\r\nMessage-ID: <" in headers and b"\r\nDate: " in headers
    assert first["meta"]["auth_user"] == "alice@example.org"
    assert second["data"].count(b"Message-ID:") == 1 and second["data"].count(b"Date:") == 1


def test_implicit_tls_submission_offers_auth_and_no_starttls(double):
    c = Raw(double.ports["submissions"], tls_client())
    lines = ehlo(c)
    assert b"250-AUTH PLAIN LOGIN" in lines and not any(b"STARTTLS" in l for l in lines)


def test_auth_failures_are_delayed_and_close_the_connection(double):
    c = Raw(double.ports["submissions"], tls_client())
    ehlo(c)
    started = time.monotonic()
    for _ in range(2):
        c.send(b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHdyb25n\r\n")  # alice / wrong
        code, lines = c.reply()
        assert lines[0].startswith(b"535 5.7.8")
    c.send(b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHdyb25n\r\n")
    assert c.code() == 535
    assert c.reply()[1][0].startswith(b"421 4.7.0")
    assert c.closed()
    # 0.05 + 0.10 + 0.15 s at least: stock ESMTP answered at once, unthrottled.
    assert time.monotonic() - started >= 0.3


def test_idle_timeout_uses_configured_value(double):
    # Stock SMTPFactory ignored factory.timeout (always 600 s). The double sets 2 s.
    c = Raw(double.ports["mx"])
    assert c.code() == 220
    started = time.monotonic()
    code, lines = c.reply()
    assert lines[0].startswith(b"421 4.4.2")
    assert 1.5 <= time.monotonic() - started < 5
    assert c.closed()


def test_connection_limit_per_ip(double):
    clients = [Raw(double.ports["mx"]) for _ in range(8)]
    for c in clients:
        assert c.code() == 220
    extra = Raw(double.ports["mx"])
    code, lines = extra.reply()
    assert lines[0].startswith(b"421 4.7.0 Too many connections from your address")
    assert extra.closed()
    clients[0].sock.close()
    time.sleep(0.2)
    again = Raw(double.ports["mx"])
    assert again.code() == 220


def test_disconnect_mid_data_queues_nothing(double):
    c = Raw(double.ports["mx"])
    ehlo(c)
    c.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert [c.code() for _ in range(3)] == [250, 250, 354]
    c.send(b"Subject: half\r\n\r\nsome of the body\r\n")
    c.sock.close()
    time.sleep(0.3)
    assert double.queued() == []


def test_utf8_address_needs_smtputf8(double):
    c = Raw(double.ports["mx"])
    lines = ehlo(c)
    assert b"250-SMTPUTF8" in lines
    c.send("MAIL FROM:<jörg@remote.example>\r\n".encode())
    assert c.reply()[1][0].startswith(b"553 5.6.7")
    c.send("MAIL FROM:<jörg@remote.example> SMTPUTF8\r\n".encode())
    assert c.code() == 250
    c.send("RCPT TO:<alice@example.org>\r\nDATA\r\n".encode())
    assert [c.code() for _ in range(2)] == [250, 354]
    c.send("Subject: grüße\r\n\r\nhi\r\n.\r\n".encode())
    assert c.code() == 250
    (entry,) = double.queued()
    assert entry["sender"] == "jörg@remote.example"


def test_random_garbage_gets_proper_replies_and_no_drop(double):
    # Stock ESMTP dropped the connection on non-ASCII command bytes (UnicodeDecodeError).
    import random

    rng = random.Random(2011)
    for _ in range(5):
        c = Raw(double.ports["mx"])
        assert c.code() == 220
        for _ in range(15):
            line = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60)))
            line = line.replace(b"\r\n", b"\n")
            if line.endswith(b"\r"):
                line += b"x"
            if line[:4].upper() in (b"QUIT", b"EHLO", b"HELO", b"NOOP", b"RSET", b"HELP",
                                    b"VRFY", b"STAR", b"MAIL", b"RCPT", b"DATA", b"AUTH"):
                continue
            c.send(line + b"\r\n")
            code, lines = c.reply()
            assert 500 <= code <= 504, lines
            assert all(l[:3].isdigit() and l.isascii() for l in lines)
        c.send(b"NOOP\r\n")
        assert c.code() == 250


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2])

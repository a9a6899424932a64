"""SMTP dialog tests: each tests/dialogs/*.txt file is a small conversation with the real server.

The runner reads and checks the 220 greeting itself. Format, one directive per line (blank
lines and lines starting with '#' are ignored):
    PORT: mx|submission|submissions   which listener (first directive; default mx)
    C: text          send text + CRLF
    C! raw           send raw bytes; escapes \\r \\n \\t \\0 \\xNN \\\\; no CRLF is added
    S: 250 [2.1.0]   read one reply (all its lines); its code (and enhanced code) must match
    S~ text          the previous reply must contain text;  S!~ text: must not contain it
    TLS              wrap the connection in TLS now (after a 220 to STARTTLS)
    NOREPLY 0.5      nothing may arrive within that many seconds (nothing was answered)
    CLOSED           the server must have closed the connection
    SLEEP 0.2        wait
    START_COUNT addr note how many messages addr's Maildir has now
    DELIVERED addr n exactly n messages reached addr's Maildir since START_COUNT addr
In C:/C! text, {x*1200} expands to 1200 'x' characters, {plain:user:password} to the base64
AUTH PLAIN response and {b64:text} to base64 of text.
All dialogs run against one server (users alice@ and bob@example.org, password secret-pw-1) with
small limits: max_recipients 5, max_message_size 10000, max_auth_failures 3, smtp_timeout 3.
"""
from __future__ import annotations

import base64
import os
import re
import socket
import ssl
import time

import pytest

from tests.harness import MailServer

DIALOG_DIR = os.path.join(os.path.dirname(__file__), "dialogs")
DIALOGS = sorted(n[:-4] for n in os.listdir(DIALOG_DIR) if n.endswith(".txt"))
LIMITS = {"max_recipients": 5, "max_message_size": 10000, "max_auth_failures": 3,
          "auth_failure_delay": 0.05, "smtp_timeout": 3}


@pytest.fixture(scope="module")
def dialog_server(tmp_path_factory):
    server = MailServer(str(tmp_path_factory.mktemp("dialogs")), extra={"limits": LIMITS},
                        listeners=["mx", "submission", "submissions"])
    server.start()
    server.add_user("alice@example.org")
    server.add_user("bob@example.org")
    yield server
    server.stop()


def expand(text: str) -> str:
    text = re.sub(r"\{(.)\*(\d+)\}", lambda m: m.group(1) * int(m.group(2)), text)
    text = re.sub(r"\{plain:([^:}]*):([^}]*)\}", lambda m: base64.b64encode(
        f"\0{m.group(1)}\0{m.group(2)}".encode()).decode(), text)
    return re.sub(r"\{b64:([^}]*)\}", lambda m: base64.b64encode(m.group(1).encode()).decode(),
                  text)


def unescape(text: str) -> bytes:
    out, i = bytearray(), 0
    simple = {"r": b"\r", "n": b"\n", "t": b"\t", "0": b"\0", "\\": b"\\"}
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "x":
                out.append(int(text[i + 2:i + 4], 16))
                i += 4
                continue
            out += simple[nxt]
            i += 2
            continue
        out += c.encode("utf-8")
        i += 1
    return bytes(out)


class Conversation:
    def __init__(self, server: MailServer, port_name: str):
        self.server = server
        self.sock = socket.create_connection(("127.0.0.1", server.ports[port_name]), timeout=10)
        if port_name == "submissions":
            self.start_tls()
        self.buf = b""
        self.transcript: list[str] = []
        self.last: list[bytes] = []

    def start_tls(self) -> None:
        ctx = self.server.ssl_context()
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")

    def send(self, data: bytes) -> None:
        self.transcript.append(f"C: {data[:200]!r}")
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed while waiting for a reply")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        self.transcript.append(f"S: {line[:200]!r}")
        return line

    def reply(self) -> list[bytes]:
        lines = [self._line()]
        while lines[-1][3:4] == b"-":
            lines.append(self._line())
        for line in lines:
            assert re.match(rb"^[2-5]\d\d[ -]", line), f"not an SMTP reply line: {line!r}"
        self.last = lines
        return lines

    def nothing_within(self, seconds: float) -> None:
        if self.buf:
            raise AssertionError(f"unexpected data: {self.buf!r}")
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return
        finally:
            self.sock.settimeout(10)
        if data:
            raise AssertionError(f"unexpected reply: {data!r}")
        raise AssertionError("connection closed instead of staying silent")

    def closed(self) -> bool:
        if self.buf:
            return False
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            return True


def run_dialog(server: MailServer, path: str) -> None:
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    directives = [l for l in lines if l.strip() and not l.startswith("#")]
    port = "mx"
    if directives and directives[0].startswith("PORT:"):
        port = directives.pop(0).split(":", 1)[1].strip()
    before: dict[str, int] = {}
    conv = Conversation(server, port)
    try:
        greeting = conv.reply()
        assert greeting[-1].startswith(b"220 "), f"bad greeting {greeting!r}"
        for d in directives:
            verb, _, arg = d.partition(" ")
            if verb == "C:":
                conv.send(expand(arg).encode("utf-8") + b"\r\n")
            elif verb == "C!":
                conv.send(unescape(expand(arg)))
            elif verb == "S:":
                reply = conv.reply()
                want = arg.split()
                got = reply[-1].decode("utf-8", "replace")
                assert got[:3] == want[0], f"expected {arg}, got {reply!r}"
                if len(want) > 1:
                    assert got[4:].startswith(want[1]), f"expected {arg}, got {reply!r}"
            elif verb == "S~":
                assert any(arg.encode() in l for l in conv.last), f"{arg!r} not in {conv.last!r}"
            elif verb == "S!~":
                assert not any(arg.encode() in l for l in conv.last), f"{arg!r} in {conv.last!r}"
            elif verb == "TLS":
                conv.start_tls()
            elif verb == "NOREPLY":
                conv.nothing_within(float(arg or 0.5))
            elif verb == "CLOSED":
                assert conv.closed(), "the server kept the connection open"
            elif verb == "SLEEP":
                time.sleep(float(arg))
            elif verb == "DELIVERED":
                address, count = arg.split()
                if address not in before:
                    raise AssertionError("DELIVERED needs a START_COUNT earlier in the dialog")
                want_n = int(count)
                found = server.wait_for_messages(address, before[address] + max(want_n, 1),
                                                 timeout=5 if want_n else 1.0)
                assert len(found) - before[address] == want_n, \
                    f"{address}: {len(found) - before[address]} messages, expected {want_n}"
            elif verb == "START_COUNT":
                before[arg] = len(server.messages(arg))
            else:
                raise ValueError(f"unknown directive {d!r}")
    except Exception as e:
        raise AssertionError(f"{e}\ntranscript:\n" + "\n".join(conv.transcript)) from e
    finally:
        conv.sock.close()


@pytest.mark.parametrize("name", DIALOGS)
def test_dialog(dialog_server, name):
    run_dialog(dialog_server, os.path.join(DIALOG_DIR, name + ".txt"))

"""IMAP4rev1 against the real server (`twistd -n mailsuite`) over real sockets: what needs real
TLS, the real directory or a real client library. Everything else about the protocol is tested
in memory in tests/unit/test_imap_*.py. One server per module."""
from __future__ import annotations

import imaplib
import socket
import time

import pytest
from imapclient import IMAPClient

from tests.harness import MailServer
from tests.scenario.imapraw import PASSWORD, Raw, tagged

MAX_SIZE = 1024 * 1024


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("imap"))
    s = MailServer(base, listeners=["mx", "imap", "imaps"],
                   extra={"limits": {"max_message_size": MAX_SIZE, "auth_failure_delay": 0.5,
                                     "max_auth_failures": 3}})
    s.start()
    for user in ("alice@example.org", "bob@example.org", "carol@example.org"):
        s.add_user(user, PASSWORD)
    yield s
    s.stop()


def client(srv, user="alice@example.org") -> IMAPClient:
    c = IMAPClient("127.0.0.1", port=srv.ports["imaps"], ssl=True, ssl_context=srv.ssl_context())
    c.login(user, PASSWORD)
    return c


def simple(subject: str = "hello", body: str = "body text\r\n", extra: str = "") -> bytes:
    return (f"From: Sender <sender@remote.example>\r\nTo: alice@example.org\r\n"
            f"Subject: {subject}\r\nDate: Mon, 02 Feb 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@remote.example>\r\n{extra}\r\n{body}").encode()


# -- what needs real TLS or the real directory -------------------------------------------

def test_starttls_then_login_and_capabilities_change(srv):
    m = imaplib.IMAP4("127.0.0.1", srv.ports["imap"])
    m.starttls(ssl_context=srv.ssl_context())
    typ, data = m.capability()
    caps = data[0].split()
    assert b"AUTH=PLAIN" in caps and b"STARTTLS" not in caps and b"LOGINDISABLED" not in caps
    assert m.login("alice@example.org", PASSWORD)[0] == "OK"
    assert b"AUTH=PLAIN" not in m.capability()[1][0].split()
    m.logout()


def test_starttls_discards_pipelined_plaintext(srv):
    """`a STARTTLS\\r\\nb LOGIN ...` in one packet must not run b inside TLS."""
    sock = socket.create_connection(("127.0.0.1", srv.ports["imap"]), timeout=10)
    f = sock.makefile("rb")
    f.readline()
    sock.sendall(b"a STARTTLS\r\nb LOGIN alice@example.org " + PASSWORD.encode() + b"\r\n")
    assert f.readline().startswith(b"a OK")
    tls = srv.ssl_context().wrap_socket(sock)
    tls.sendall(b"c NOOP\r\n")
    data = b""
    while b"c " not in data:
        data += tls.recv(4096)
    assert data.startswith(b"c OK"), data  # nothing for b: it was discarded
    tls.sendall(b"d SELECT INBOX\r\n")
    data = b""
    while b"\r\nd " not in data and not data.startswith(b"d "):
        data += tls.recv(4096)
    assert b"d BAD" in data  # still not authenticated
    tls.close()


def test_failed_login_is_delayed_logged_and_refused(srv):
    r = Raw(srv, login_as=None)
    t = time.monotonic()
    resp = r.cmd(b"a LOGIN alice@example.org wrong-password")
    assert tagged(resp).startswith(b"a NO [AUTHENTICATIONFAILED]")
    assert time.monotonic() - t >= 0.45
    resp = r.cmd(b"b LOGIN nobody@example.org wrong")
    assert tagged(resp).startswith(b"b NO")
    resp = r.cmd(b"c LOGIN nobody@example.org wrong")
    assert tagged(resp).startswith(b"c NO")
    assert r.line().startswith(b"* BYE")  # max_auth_failures reached: the server hangs up
    r.close()
    log = srv.log_text()
    assert "authentication failed for alice@example.org from 127.0.0.1" in log


def test_python_clients_over_implicit_tls(srv):
    """imaplib and imapclient parse what the server sends: AUTHENTICATE PLAIN, APPEND,
    BODYSTRUCTURE, flags and SEARCH."""
    m = imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=srv.ssl_context())
    typ, _ = m.authenticate("PLAIN", lambda _: b"\0alice@example.org\0" + PASSWORD.encode())
    assert typ == "OK"
    typ, data = m.append("DoesNotExist", None, None, simple())
    assert typ == "NO" and b"[TRYCREATE]" in data[0]
    m.logout()
    c = client(srv)
    c.create_folder("Clients")
    c.append("Clients", simple("multi", extra='MIME-Version: 1.0\r\n'
                               'Content-Type: multipart/mixed; boundary="b"\r\n',
                               body="--b\r\nContent-Type: text/plain\r\n\r\none\r\n--b--\r\n"))
    c.select_folder("Clients")
    bs = c.fetch([1], ["BODYSTRUCTURE"])[1][b"BODYSTRUCTURE"]
    assert bs.is_multipart
    assert set(c.add_flags([1], [b"\\Flagged", b"$Forwarded"])[1]) >= {b"\\Flagged", b"$Forwarded"}
    assert c.search("FLAGGED") == [1]
    c.logout()

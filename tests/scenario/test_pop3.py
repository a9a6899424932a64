"""POP3 against the real server (`twistd -n mailsuite`) with poplib and raw sockets: what needs
a real TLS handshake, real sockets (a 2 MB message streamed with flow control) or the whole
SMTP -> queue -> Maildir -> POP3 path. The protocol itself is tested in memory in
tests/unit/test_pop3_*.py."""
from __future__ import annotations

import base64
import os
import poplib
import shutil
import socket
import time

import pytest

from tests.dotted import dotted_messages
from tests.harness import HOST, MailServer

PASSWORD = "secret-pw-1"
USERS = ["alice@example.org", "bob@example.org"]


@pytest.fixture(scope="module")
def pop_server(tmp_path_factory):
    """One server for the module (starting one per test would cost seconds each); each test
    empties alice's INBOX first, so tests do not depend on each other."""
    base = str(tmp_path_factory.mktemp("pop3"))
    s = MailServer(base, extra={"limits": {"auth_failure_delay": 0.3, "max_auth_failures": 3}},
                   listeners=["mx", "pop3", "pop3s"])
    s.start()
    try:
        for user in USERS:
            s.add_user(user, PASSWORD)
        s.add_user("mallory@example.org", PASSWORD)
        s.admin("user", "disable", "mallory@example.org")
        yield s
    finally:
        s.stop()


@pytest.fixture
def mailbox(pop_server, request):
    """A user with an empty INBOX; returns (address, maildir path)."""
    address = USERS[0]
    md = pop_server.maildir(address)
    shutil.rmtree(md, ignore_errors=True)
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(md, sub))
    return address, md


_seq = [0]


def put(maildir: str, data: bytes) -> str:
    """Deliver like the delivery agent: tmp/ then rename into new/, CRLF, ,S=<size>."""
    _seq[0] += 1
    key = f"{1700000000 + _seq[0]}.M{_seq[0]}P4242Q{_seq[0]}.testhost,S={len(data)}"
    with open(os.path.join(maildir, "tmp", key), "wb") as f:
        f.write(data)
    os.rename(os.path.join(maildir, "tmp", key), os.path.join(maildir, "new", key))
    return key


def message(subject: str, body: bytes = b"hello\r\n") -> bytes:
    return (f"From: sender@example.net\r\nTo: rcpt@example.org\r\nSubject: {subject}\r\n\r\n"
            .encode() + body)


def login(server: MailServer, address: str, implicit: bool = False) -> poplib.POP3:
    if implicit:
        p = poplib.POP3_SSL(HOST, server.ports["pop3s"], context=server.ssl_context(),
                            timeout=15)
    else:
        p = poplib.POP3(HOST, server.ports["pop3"], timeout=15)
        p.stls(server.ssl_context())
    p.user(address)
    p.pass_(PASSWORD)
    return p


def retr_bytes(p: poplib.POP3, n: int) -> bytes:
    _, lines, _ = p.retr(n)
    return b"".join(line + b"\r\n" for line in lines)


# -- TLS and authentication --------------------------------------------------------------------
def test_plaintext_login_refused_before_stls(pop_server, mailbox):
    address, _ = mailbox
    p = poplib.POP3(HOST, pop_server.ports["pop3"], timeout=15)
    caps = p.capa()
    assert "STLS" in caps and "USER" not in caps and "SASL" not in caps
    assert "RESP-CODES" in caps and "UIDL" in caps and "TOP" in caps
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        p.user(address)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        p.pass_(PASSWORD)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        p._shortcmd("AUTH PLAIN " + base64.b64encode(f"\0{address}\0{PASSWORD}".encode())
                    .decode())
    p.stls(pop_server.ssl_context())
    caps = p.capa()
    assert "STLS" not in caps and "USER" in caps and caps["SASL"] == ["PLAIN"]
    p.user(address)
    assert p.pass_(PASSWORD).startswith(b"+OK")
    assert p.stat() == (0, 0)
    p.quit()


def test_pop3s_implicit_tls_and_auth_plain(pop_server, mailbox):
    address, md = mailbox
    put(md, message("one"))
    p = poplib.POP3_SSL(HOST, pop_server.ports["pop3s"], context=pop_server.ssl_context(),
                        timeout=15)
    assert "STLS" not in p.capa() and "USER" in p.capa()
    token = base64.b64encode(f"\0{address}\0{PASSWORD}".encode()).decode()
    assert p._shortcmd("AUTH PLAIN " + token).startswith(b"+OK")
    assert p.stat()[0] == 1
    p.quit()
    # Without an initial response: the server asks with "+ " (RFC 5034 §4).
    p = poplib.POP3_SSL(HOST, pop_server.ports["pop3s"], context=pop_server.ssl_context(),
                        timeout=15)
    p._putcmd("AUTH PLAIN")
    assert p._getline()[0].startswith(b"+")
    assert p._shortcmd(token).startswith(b"+OK")
    p.quit()


def test_wrong_password_disabled_user_and_failure_delay(pop_server, mailbox):
    address, _ = mailbox
    p = poplib.POP3_SSL(HOST, pop_server.ports["pop3s"], context=pop_server.ssl_context(),
                        timeout=15)
    p.user(address)
    t = time.monotonic()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        p.pass_("wrong-password")
    p.user(address)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        p.pass_("wrong-again")
    assert time.monotonic() - t >= 0.3  # the failures are held back by the throttle
    p.user("mallory@example.org")
    with pytest.raises(poplib.error_proto):
        p.pass_(PASSWORD)  # third failure: disabled account, then the connection closes
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        p.noop()
    log = pop_server.log_text()
    assert "pop3 login failed" in log and "127.0.0.1" in log



def test_stls_discards_pipelined_commands(pop_server, mailbox):
    """RFC 2595 / CVE-2011-0411: a USER sent in the same packet as STLS must not be
    answered inside TLS."""
    address, _ = mailbox
    raw = socket.create_connection((HOST, pop_server.ports["pop3"]), timeout=10)
    f = raw.makefile("rb")
    assert f.readline().startswith(b"+OK")
    raw.sendall(b"STLS\r\nUSER " + address.encode() + b"\r\n")
    assert f.readline().startswith(b"+OK Begin TLS")
    tls = pop_server.ssl_context().wrap_socket(raw, server_hostname="localhost")
    tf = tls.makefile("rb")
    tls.sendall(b"PASS " + PASSWORD.encode() + b"\r\n")
    assert tf.readline().startswith(b"-ERR")  # USER was thrown away: "USER first"
    tls.sendall(b"QUIT\r\n")
    assert tf.readline().startswith(b"+OK")
    tls.close()


def test_dot_line_at_16k_boundary_and_large_message_byte_identical(pop_server, mailbox):
    """Twisted ended the message at a '.' line on a 16 KiB chunk boundary and sent the rest as
    fake replies (docs/design/pop3.md). Lines starting with '.' are everywhere here, including
    exactly at offsets 16384 and 65536 (our chunk size)."""
    address, md = mailbox
    dotted, big = dotted_messages()
    put(md, dotted)
    put(md, big)
    p = login(pop_server, address)
    assert retr_bytes(p, 1) == dotted
    assert retr_bytes(p, 2) == big
    assert p.noop().startswith(b"+OK")  # the stream ended where it should
    p.quit()


def test_message_delivered_through_smtp_is_retrieved_byte_identical(pop_server, mailbox):
    """The whole path: SMTP (MX port) -> queue -> Maildir -> POP3 RETR, and UIDL = file key."""
    import smtplib

    address, md = mailbox
    body = b"".join(b"line %d\r\n" % i for i in range(2000)) + b".dot line\r\n"
    msg = (b"From: sender@example.net\r\nTo: " + address.encode() +
           b"\r\nSubject: via smtp\r\nMessage-ID: <via-smtp@example.net>\r\n\r\n" + body)
    with smtplib.SMTP(HOST, pop_server.ports["mx"], timeout=30) as smtp:
        smtp.sendmail("sender@example.net", [address], msg)
    (path,) = pop_server.wait_for_messages(address, 1, timeout=30)
    with open(path, "rb") as f:
        stored = f.read()
    assert stored.endswith(body)
    p = login(pop_server, address)
    assert retr_bytes(p, 1) == stored
    key = os.path.basename(path).split(":")[0]
    assert p.uidl(1).split()[2].decode() == key
    p.quit()



"""POP3 against the real server (`twistd -n mailsuite`) with poplib and raw sockets."""
from __future__ import annotations

import base64
import os
import poplib
import shutil
import socket
import time

import pytest

from mailsuite.mailbox.store import MailStore
from tests.harness import HOST, MailServer

PASSWORD = "secret-pw-1"
USERS = ["alice@example.org", "bob@example.org"]


@pytest.fixture(scope="module")
def pop_server(tmp_path_factory):
    # Each test empties alice's INBOX first, so tests do not depend on each other.
    """One server for the module (starting one per test would cost seconds each)."""
    base = str(tmp_path_factory.mktemp("pop3"))
    s = MailServer(base, extra={"limits": {"auth_failure_delay": 0.3, "max_auth_failures": 3}})
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


def test_maildrop_in_use(pop_server, mailbox):
    address, _ = mailbox
    first = login(pop_server, address)
    second = poplib.POP3_SSL(HOST, pop_server.ports["pop3s"], context=pop_server.ssl_context(),
                             timeout=15)
    second.user(address)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_(PASSWORD)
    first.quit()
    second.user(address)
    assert second.pass_(PASSWORD).startswith(b"+OK")
    second.quit()


# -- the maildrop --------------------------------------------------------------------------------
def test_stat_list_uidl_top_and_uidl_stability(pop_server, mailbox):
    address, md = mailbox
    keys = [put(md, message(f"m{i}", b"line1\r\nline2\r\nline3\r\n")) for i in range(3)]
    p = login(pop_server, address)
    sizes = [len(message(f"m{i}", b"line1\r\nline2\r\nline3\r\n")) for i in range(3)]
    assert p.stat() == (3, sum(sizes))
    assert p.list()[1] == [f"{i + 1} {s}".encode() for i, s in enumerate(sizes)]
    uidls = [line.split()[1].decode() for line in p.uidl()[1]]
    assert uidls == keys  # the Maildir key, the same identity IMAP sees
    assert p.uidl(2).split()[2].decode() == keys[1]
    _, top, _ = p.top(2, 1)
    assert top[-2:] == [b"", b"line1"] and b"Subject: m1" in top
    p.quit()
    # Flag changes (an IMAP client reading the message) do not change the UIDL.
    store = MailStore(os.path.join(pop_server.data_dir, "mail"))
    inbox = store.account(address).folder("INBOX")
    for info in inbox.sync():
        inbox.add_flags(info.uid, ["\\Seen", "$Forwarded"])
    assert all(":2," in n for n in os.listdir(os.path.join(md, "cur")))
    p = login(pop_server, address, implicit=True)
    assert [line.split()[1].decode() for line in p.uidl()[1]] == keys
    p.quit()


def test_dot_line_at_16k_boundary_and_large_message_byte_identical(pop_server, mailbox):
    """TWISTED-NOTES §5: Twisted ended the message at a '.' line on a 16 KiB chunk boundary
    and sent the rest as fake replies. Lines starting with '.' are everywhere here, including
    exactly at offsets 16384 and 65536 (our chunk size)."""
    address, md = mailbox
    head = b"From: a@example.net\r\nSubject: dots\r\n\r\n"

    def pad_to(data: bytes, offset: int) -> bytes:
        """Append 100-octet lines (poplib limits lines to 2048) so the next line starts at
        exactly `offset`."""
        while offset - len(data) > 200:
            data += b"x" * 98 + b"\r\n"
        return data + b"w" * (offset - len(data) - 2) + b"\r\n"

    dotted = pad_to(head, 16384)
    assert len(dotted) == 16384
    dotted += b".\r\n+OK injected\r\n..\r\n.x\r\n"
    dotted = pad_to(dotted, 65536) + b".\r\n" + b"tail\r\n"
    big = head + b"".join(b".%07d " % i + b"z" * 60 + b"\r\n" for i in range(30000))
    assert len(big) > 2_000_000
    put(md, dotted)
    put(md, big)
    p = login(pop_server, address)
    assert retr_bytes(p, 1) == dotted
    assert retr_bytes(p, 2) == big
    assert p.noop().startswith(b"+OK")  # the stream ended where it should
    p.quit()


def test_dele_quit_removes_and_dropped_connection_removes_nothing(pop_server, mailbox):
    address, md = mailbox
    keys = [put(md, message(f"d{i}")) for i in range(3)]
    p = login(pop_server, address)
    p.dele(1)
    with pytest.raises(poplib.error_proto):
        p.retr(1)  # deleted in this session
    assert p.stat()[0] == 2
    p.file.close()
    p.sock.close()  # drop without QUIT
    deadline = time.monotonic() + 10
    while True:  # the server releases the maildrop lock when it sees the connection close
        try:
            p = login(pop_server, address)
            break
        except poplib.error_proto as e:
            assert b"IN-USE" in e.args[0] and time.monotonic() < deadline
            time.sleep(0.1)
    assert p.stat()[0] == 3
    p.dele(1)
    p.rset()
    p.dele(2)
    p.retr(3)
    assert p.quit().startswith(b"+OK")
    remaining = os.listdir(os.path.join(md, "cur"))
    assert sorted(n.split(":")[0] for n in remaining) == sorted([keys[0], keys[2]])
    # RETR'd messages are marked \Seen at QUIT, like Dovecot does.
    assert any(n.startswith(keys[2]) and n.endswith(":2,S") for n in remaining)
    p = login(pop_server, address)
    assert [line.split()[1].decode() for line in p.uidl()[1]] == [keys[0], keys[2]]
    p.quit()


def test_bad_commands_get_err_and_the_session_goes_on(pop_server, mailbox):
    address, md = mailbox
    put(md, message("x"))
    p = login(pop_server, address)
    for bad in ["RETR abc", "RETR 0", "RETR 99", "TOP 1 x", "DELE 7",
                "FOO", "STLS", "USER x", "\x01\x02"]:
        with pytest.raises(poplib.error_proto):
            p._shortcmd(bad)
    assert p.stat() == (1, len(message("x")))
    # The tenth error closes the connection: a client that only sends garbage goes away.
    with pytest.raises(poplib.error_proto, match="Too many errors"):
        p._shortcmd("LIST -1")
    with pytest.raises((poplib.error_proto, OSError)):
        p.noop()


def test_pipelined_commands_answered_in_order(pop_server, mailbox):
    address, md = mailbox
    put(md, message("a"))
    put(md, message("bb"))
    p = login(pop_server, address)
    p.sock.sendall(b"STAT\r\nRETR 1\r\nLIST 2\r\nUIDL 1\r\nNOOP\r\n")
    assert p._getresp().startswith(b"+OK 2 ")
    assert p._getresp().startswith(b"+OK")
    lines = []
    while (line := p._getline()[0]) != b".":
        lines.append(line)
    assert b"Subject: a" in lines
    assert p._getresp() == b"+OK 2 %d" % len(message("bb"))
    assert p._getresp().startswith(b"+OK 1 ")
    assert p._getresp() == b"+OK"
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


def test_idle_client_is_disconnected_after_pop3_timeout(make_server):
    """[limits] pop3_timeout: an idle session gets -ERR and is closed (RFC 1939 §3
    autologout timer; no UPDATE state, so nothing is removed)."""
    s = make_server(extra={"limits": {"pop3_timeout": 2}}, listeners=["pop3"])
    raw = socket.create_connection((HOST, s.ports["pop3"]), timeout=20)
    f = raw.makefile("rb")
    assert f.readline().startswith(b"+OK")
    raw.sendall(b"CAPA\r\n")
    while f.readline() not in (b".\r\n", b""):
        pass
    t = time.monotonic()
    assert f.readline().startswith(b"-ERR")  # the timeout notice
    assert f.readline() == b""  # then the connection is closed
    assert 1.5 <= time.monotonic() - t < 15
    raw.close()


def test_connections_per_ip_are_limited(make_server):
    s: MailServer = make_server(listeners=["pop3", "pop3s"],
                                extra={"limits": {"max_connections_per_ip": 2}})
    first = poplib.POP3(HOST, s.ports["pop3"], timeout=10)
    second = poplib.POP3(HOST, s.ports["pop3"], timeout=10)
    extra = socket.create_connection((HOST, s.ports["pop3"]), timeout=10)
    assert extra.recv(512).startswith(b"-ERR [SYS/TEMP]")
    extra.close()
    # Limits are per listener: the implicit-TLS port counts its own connections.
    tls = poplib.POP3_SSL(HOST, s.ports["pop3s"], context=s.ssl_context(), timeout=10)
    assert tls.getwelcome().startswith(b"+OK")
    first.quit()
    time.sleep(0.3)
    again = poplib.POP3(HOST, s.ports["pop3"], timeout=10)  # QUIT gave the slot back
    assert again.getwelcome().startswith(b"+OK")
    for client in (again, second, tls):
        client.quit()

"""The real server (`twistd -n mailsuite`) on MX and submission ports, driven by smtplib.

Only the SMTP listeners are enabled, so these tests do not depend on IMAP/POP3 being present.
"""
from __future__ import annotations

import os
import smtplib
import socket
import uuid

import pytest

from tests.harness import HOST, MailServer, free_port
from tests.polling import wait_until

SMTP_LISTENERS = ["mx", "submission", "submissions"]
PASSWORD = "secret-pw-1"


@pytest.fixture(scope="module")
def smtp_server(tmp_path_factory):
    """One server for the module (start-up and user creation cost seconds on a busy machine);
    each test finds its own message by a unique token, so tests do not see each other's mail.

    Remote delivery goes to a closed port, so remote recipients stay in the queue (deferred)
    instead of bouncing on NXDOMAIN: we can look at them with `mailsuite queue list`.
    """
    dead = free_port()
    s = MailServer(str(tmp_path_factory.mktemp("smtp")), listeners=SMTP_LISTENERS,
                   extra={"courier": {"relay": f"{HOST}:{dead}", "relay_tls": "none"}})
    s.start()
    try:
        s.add_user("alice@example.org")
        s.add_user("bob@example.org")
        yield s
    finally:
        s.stop()


def token() -> str:
    return uuid.uuid4().hex


def stored_message(server: MailServer, address: str, marker: str) -> bytes | None:
    """The message in `address`'s Maildir containing `marker`, if it is there now."""
    for path in server.messages(address):
        with open(path, "rb") as f:
            data = f.read()
        if marker.encode() in data:
            return data
    return None


def find_message(server: MailServer, address: str, marker: str, timeout: float = 15.0) -> bytes:
    """The stored message for `address` containing `marker`, waiting for its delivery."""
    return wait_until(lambda: stored_message(server, address, marker), timeout,
                      message=f"a message with {marker} for {address}")


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def headers_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0]


def submit(server, **kwargs) -> smtplib.SMTP:
    c = smtplib.SMTP(HOST, server.ports["submission"], local_hostname="laptop.example")
    c.starttls(context=server.ssl_context())
    c.login("alice@example.org", PASSWORD)
    return c


def test_mx_delivers_to_local_user(smtp_server):
    t = token()
    body = (f"Subject: {t}\r\nFrom: x@remote.example\r\n\r\nline one\r\n.leading dot\r\n"
            ).encode()
    with smtplib.SMTP(HOST, smtp_server.ports["mx"], local_hostname="mta.remote.example") as c:
        c.sendmail("x@remote.example", ["alice@example.org"], body)
    data = find_message(smtp_server, "alice@example.org", t)
    assert data is not None
    head = headers_of(data)
    assert b"Return-Path: <x@remote.example>\r\n" in head
    assert b"Received: from mta.remote.example (localhost [127.0.0.1])\r\n\tby mx.test.example" \
        in head
    assert b"with ESMTP id " in head and b"for <alice@example.org>;" in head
    # Dot-unstuffed, CRLF everywhere, nothing else changed.
    assert data.endswith(b"\r\n\r\nline one\r\n.leading dot\r\n")
    assert b"\n" not in data.replace(b"\r\n", b"")


def test_mx_plus_tag_and_case_insensitive(smtp_server):
    t = token()
    msg = f"Subject: {t}\r\n\r\nb\r\n".encode()
    with smtplib.SMTP(HOST, smtp_server.ports["mx"]) as c:
        c.sendmail("x@remote.example", ["ALICE+News@Example.ORG"], msg)
        c.sendmail("x@remote.example", ["Bob@example.org"], msg)
    assert find_message(smtp_server, "alice@example.org", t) is not None
    assert find_message(smtp_server, "bob@example.org", t) is not None


def test_mx_null_sender_and_8bit_body(smtp_server):
    t = token()
    body = f"Subject: {t}\r\n\r\nGrüße aus Köln\r\n".encode("utf-8")
    with smtplib.SMTP(HOST, smtp_server.ports["mx"]) as c:
        c.sendmail("<>", ["alice@example.org"], body, mail_options=["BODY=8BITMIME"])
    data = find_message(smtp_server, "alice@example.org", t)
    assert data.endswith("Grüße aus Köln\r\n".encode("utf-8"))
    assert b"Return-Path: <>" in data


def test_mx_smtputf8_sender(smtp_server):
    t = token()
    with smtplib.SMTP(HOST, smtp_server.ports["mx"]) as c:
        c.sendmail("jörg@remote.example", ["alice@example.org"],
                   f"Subject: {t}\r\n\r\nb\r\n".encode(), mail_options=["SMTPUTF8"])
    data = find_message(smtp_server, "alice@example.org", t)
    assert "Return-Path: <jörg@remote.example>".encode() in data


def test_mx_unknown_user_is_550_511(smtp_server):
    with smtplib.SMTP(HOST, smtp_server.ports["mx"]) as c:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            c.sendmail("x@remote.example", ["nobody@example.org"], b"Subject: a\r\n\r\nb\r\n")
    code, text = e.value.recipients["nobody@example.org"]
    assert code == 550 and text.startswith(b"5.1.1")


def test_mx_relay_denied_is_554_571(smtp_server):
    with smtplib.SMTP(HOST, smtp_server.ports["mx"]) as c:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            c.sendmail("alice@example.org", ["victim@elsewhere.example"], b"S: a\r\n\r\nb\r\n")
    code, text = e.value.recipients["victim@elsewhere.example"]
    assert code == 554 and text.startswith(b"5.7.1")
    assert "TO:<victim@elsewhere.example> from 127.0.0.1: 554 5.7.1 Relay" \
        in smtp_server.log_text()


def test_mx_partial_recipients_delivers_to_the_valid_ones(smtp_server):
    t = token()
    with smtplib.SMTP(HOST, smtp_server.ports["mx"]) as c:
        refused = c.sendmail("x@remote.example", ["alice@example.org", "nobody@example.org"],
                             f"Subject: {t}\r\n\r\nb\r\n".encode())
    assert set(refused) == {"nobody@example.org"}
    assert find_message(smtp_server, "alice@example.org", t) is not None


def test_submission_starttls_auth_adds_headers(smtp_server):
    t = token()
    with submit(smtp_server) as c:
        c.sendmail("alice@example.org", ["bob@example.org"], f"Subject: {t}\r\n\r\nhi\r\n".encode())
    head = headers_of(find_message(smtp_server, "bob@example.org", t))
    assert b"with ESMTPSA id " in head
    assert b"\r\nMessage-ID: <" in head and b"@mx.test.example>" in head
    assert b"\r\nDate: " in head


def test_submission_keeps_existing_message_id_and_date(smtp_server):
    t = token()
    msg = (f"Subject: {t}\r\nMessage-ID: <own@laptop>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000"
           f"\r\n\r\nb\r\n").encode()
    with submit(smtp_server) as c:
        c.sendmail("alice@example.org", ["bob@example.org"], msg)
    data = find_message(smtp_server, "bob@example.org", t)
    assert data.count(b"Message-ID:") == 1 and data.count(b"\r\nDate:") == 1


def test_submission_implicit_tls_465(smtp_server):
    t = token()
    with smtplib.SMTP_SSL(HOST, smtp_server.ports["submissions"],
                          context=smtp_server.ssl_context()) as c:
        c.ehlo()
        assert "auth" in c.esmtp_features and "starttls" not in c.esmtp_features
        c.login("bob@example.org", PASSWORD)
        c.sendmail("bob@example.org", ["alice@example.org"], f"Subject: {t}\r\n\r\nb\r\n".encode())
    assert b"with ESMTPSA id" in find_message(smtp_server, "alice@example.org", t)


def test_submission_requires_auth(smtp_server):
    with smtplib.SMTP(HOST, smtp_server.ports["submission"]) as c:
        c.starttls(context=smtp_server.ssl_context())
        c.ehlo()
        code, text = c.mail("alice@example.org")
        assert (code, text[:5]) == (530, b"5.7.0")


def test_submission_wrong_password_is_535(smtp_server):
    with smtplib.SMTP(HOST, smtp_server.ports["submission"]) as c:
        c.starttls(context=smtp_server.ssl_context())
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            c.login("alice@example.org", "wrong")
        assert e.value.smtp_code == 535 and e.value.smtp_error.startswith(b"5.7.8")
    log = smtp_server.log_text()
    assert "authentication failed for 'alice@example.org' from 127.0.0.1" in log


def test_submission_sender_not_owned_is_553(smtp_server):
    with submit(smtp_server) as c:
        code, text = c.mail("bob@example.org")
        assert (code, text[:5]) == (553, b"5.7.1")
        c.rset()
        code, _ = c.mail("alice+lists@example.org")  # +tag of one's own address is fine
        assert code == 250


def test_submission_alias_sender_allowed(smtp_server):
    t = token()
    with submit(smtp_server) as c:
        # Alice's sender addresses as they were are now remembered (directory.md, "Lookup
        # cache"); an address given to her a moment later must not be refused from memory.
        c.sendmail("alice@example.org", ["bob@example.org"], b"Subject: before\r\n\r\nb\r\n")
        smtp_server.admin("alias", "add", "info@example.org", "alice@example.org")
        c.sendmail("info@example.org", ["bob@example.org"], f"Subject: {t}\r\n\r\nb\r\n".encode())
    assert find_message(smtp_server, "bob@example.org", t) is not None


def test_submission_remote_recipient_is_queued(smtp_server):
    with submit(smtp_server) as c:
        c.sendmail("alice@example.org", ["friend@far-away.example"], b"Subject: r\r\n\r\nb\r\n")
    def queue_listing() -> str:
        out = smtp_server.admin("queue", "list").stdout
        return out if "friend@far-away.example" in out else ""

    listing = wait_until(queue_listing, timeout=10, interval=0.2,
                         message="the remote recipient in `mailsuite queue list`")
    assert "alice@example.org" in listing


def test_disconnect_mid_data_leaves_nothing(smtp_server):
    t = token()
    sock = socket.create_connection((HOST, smtp_server.ports["mx"]), timeout=5)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"220")
    sock.sendall(b"EHLO c\r\nMAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\n"
                 b"DATA\r\n")
    replies = []
    while len(replies) < 4:
        line = f.readline()
        if line[3:4] == b" ":
            replies.append(line[:3])
    assert replies == [b"250", b"250", b"250", b"354"]
    sock.sendall(f"Subject: {t}\r\n\r\n".encode() + b"x" * 5000 + b"\r\n")
    f.close()  # the makefile() object holds the descriptor open too
    sock.close()
    wait_until(lambda: "disconnected during DATA" in smtp_server.log_text(), timeout=10,
               message="the server noticing the disconnect")
    assert stored_message(smtp_server, "alice@example.org", t) is None
    for root, _, files in os.walk(os.path.join(smtp_server.data_dir, "queue")):
        for name in files:
            assert t.encode() not in read(os.path.join(root, name))


def test_accepted_message_is_logged_with_queue_id(smtp_server):
    t = token()
    with smtplib.SMTP(HOST, smtp_server.ports["mx"]) as c:
        c.sendmail(f"{t}@remote.example", ["alice@example.org"], b"Subject: a\r\n\r\nb\r\n")
    find_message(smtp_server, "alice@example.org", t)
    lines = [l for l in smtp_server.log_text().splitlines()
             if "mailsuite.smtp.server" in l and f"from=<{t}@remote.example>" in l]
    assert len(lines) == 1
    assert "accepted " in lines[0] and "to=<alice@example.org>" in lines[0]
    assert "client=127.0.0.1" in lines[0] and "size=" in lines[0]

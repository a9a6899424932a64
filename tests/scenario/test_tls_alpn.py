"""ALPN on every TLS listener (RFC 7301; docs/design/limits.md, "TLS"): a mail client that
offers ALPN protocols is served without ALPN, on implicit TLS and after STARTTLS, and a client
offering only web protocols (a browser led to a mail port: the ALPACA cross-protocol attack)
never completes the handshake."""
from __future__ import annotations

import imaplib
import poplib
import smtplib
import socket
import ssl

import pytest

from tests.harness import HOST, MailServer

USER, PASSWORD = "alice@example.org", "secret-pw-1"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = MailServer(str(tmp_path_factory.mktemp("alpn")),
                   listeners=["imap", "imaps", "pop3s", "submission", "submissions"])
    s.add_user(USER, PASSWORD)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def context(server: MailServer, offered: list[str]) -> ssl.SSLContext:
    ctx = server.ssl_context()
    ctx.set_alpn_protocols(offered)
    return ctx


MAIL_OFFER = ["imap", "pop3", "smtp", "h2"]  # what a client library may offer, a web id among them


def test_implicit_tls_serves_a_client_that_offers_alpn(server):
    with imaplib.IMAP4_SSL(HOST, server.ports["imaps"],
                           ssl_context=context(server, MAIL_OFFER)) as c:
        assert c.sock.selected_alpn_protocol() is None
        assert c.login(USER, PASSWORD)[0] == "OK"
        c.logout()
    p = poplib.POP3_SSL(HOST, server.ports["pop3s"], context=context(server, MAIL_OFFER))
    try:
        assert p.user(USER).startswith(b"+OK") and p.pass_(PASSWORD).startswith(b"+OK")
    finally:
        p.quit()
    with smtplib.SMTP_SSL(HOST, server.ports["submissions"],
                          context=context(server, MAIL_OFFER)) as c:
        assert c.login(USER, PASSWORD)[0] == 235


def test_starttls_serves_a_client_that_offers_alpn(server):
    with imaplib.IMAP4(HOST, server.ports["imap"]) as c:
        c.starttls(ssl_context=context(server, MAIL_OFFER))
        assert c.login(USER, PASSWORD)[0] == "OK"
        c.logout()
    with smtplib.SMTP(HOST, server.ports["submission"]) as c:
        c.starttls(context=context(server, MAIL_OFFER))
        assert c.login(USER, PASSWORD)[0] == 235


@pytest.mark.parametrize("listener", ["imaps", "pop3s", "submissions"])
def test_a_client_offering_only_web_protocols_is_refused(server, listener):
    ctx = context(server, ["h2", "http/1.1"])
    with socket.create_connection((HOST, server.ports[listener]), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            with ctx.wrap_socket(raw) as tls:
                tls.recv(1)  # TLS 1.3: the server's verdict arrives after the client's Finished
    # ...and the listener goes on serving mail clients.
    with socket.create_connection((HOST, server.ports[listener]), timeout=10) as raw:
        with context(server, MAIL_OFFER).wrap_socket(raw) as tls:
            assert tls.recv(4)

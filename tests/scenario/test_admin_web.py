"""The admin dashboard of the real server over HTTPS (docs/design/admin-web.md): TLS only, login
with an account of `mailsuite admin`, a form POST with its CSRF token, and the change seen by
the other protocols at once."""
from __future__ import annotations

import http.client
import imaplib
import ssl

import pytest

from tests.dashboard import ADMIN_PASSWORD, AdminClient, add_admin, notice


@pytest.fixture
def admin_server(server):
    add_admin(server)
    return server


def test_login_and_a_form_post_with_csrf(admin_server):
    web = AdminClient(admin_server)
    answer = web.get("/overview")
    assert (answer.status, answer.headers["Location"]) == (302, "/login")
    assert web.login(password="wrong").status == 401
    answer = web.login()
    assert answer.status == 303
    cookie = answer.headers.get_all("Set-Cookie")[0]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert web.get("/overview").status == 200
    # A form POST: a user created on the dashboard logs in over IMAP right away.
    refused = web.request("POST", "/users/add", {"address": "carol@example.org",
                                                 "password": "carol-pw-1"})
    assert refused.status == 403
    answer = web.post("/users/add", {"address": "carol@example.org", "password": "carol-pw-1"})
    assert (answer.status, answer.headers["Location"]) == (303, "/users?domain=example.org")
    assert notice(web.get("/users").body) == "added user carol@example.org"
    context = ssl.create_default_context(cafile=admin_server.cafile)
    context.check_hostname = False
    with imaplib.IMAP4_SSL(admin_server.host, admin_server.ports["imaps"],
                           ssl_context=context) as imap:
        assert imap.login("carol@example.org", "carol-pw-1")[0] == "OK"
    # Logout ends the session on the server.
    assert web.post("/logout").status == 303
    assert web.get("/overview").status == 302


def test_the_admin_listener_speaks_tls_only(admin_server):
    conn = http.client.HTTPConnection(admin_server.host, admin_server.ports["admin"], timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        conn.request("GET", "/login")
        conn.getresponse()
    conn.close()


def test_a_password_changed_with_the_cli_ends_open_sessions(admin_server):
    web = AdminClient(admin_server)
    assert web.login().status == 303
    code = admin_server.admin("admin", "passwd", "root", "--password-stdin",
                              input="admin-pw-2\n").returncode
    assert code == 0
    assert web.get("/overview").status == 302
    assert web.login(password=ADMIN_PASSWORD).status == 401
    assert web.login(password="admin-pw-2").status == 303


def test_a_browsers_alpn_offer_gets_http_1_1(admin_server):
    # Browsers offer h2 and http/1.1; the handshake must not fail on the h2 we do not speak.
    import socket

    context = ssl.create_default_context(cafile=admin_server.cafile)
    context.check_hostname = False
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection((admin_server.host, admin_server.ports["admin"]), 10) as raw:
        with context.wrap_socket(raw) as tls:
            assert tls.selected_alpn_protocol() == "http/1.1"

"""The login cache across processes, and TLS session resumption, on real servers.

Two mailsuite processes share one SQLite directory: after each has remembered a login,
`mailsuite user passwd` (a third process) takes effect at the next login on both
(docs/design/directory.md, "Login cache"). A second TLS connection resumes the first one's
session, on IMAPS and after STARTTLS, with Python's ssl client (docs/design/limits.md, "TLS
session resumption").
"""
from __future__ import annotations

import imaplib
import socket
import ssl

import pytest

from tests.harness import HOST, MailServer

USER = "alice@example.org"
OLD, NEW = "old-secret-1", "new-secret-2"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    base = tmp_path_factory.mktemp("cache")
    first = MailServer(str(base / "one"), listeners=["imap", "imaps", "pop3s"])
    first.add_user(USER, OLD)
    first.start()
    try:
        # Another instance on the same directory, with the same certificate, as behind a
        # load balancer.
        tls = {"cert": first.cafile, "key": first.cafile.replace("cert.pem", "key.pem")}
        second = MailServer(str(base / "two"), listeners=["imaps"],
                            extra={"database": {"url": first.database_url}, "tls": tls})
        second.start()
        try:
            yield first, second
        finally:
            second.stop()
    finally:
        first.stop()


def imaps_login(server: MailServer, password: str, ctx: ssl.SSLContext) -> str:
    with imaplib.IMAP4_SSL(HOST, server.ports["imaps"], ssl_context=ctx) as c:
        try:
            typ, _ = c.login(USER, password)
        except imaplib.IMAP4.error as e:
            return f"NO {e}"
        c.logout()
        return typ


def test_passwd_from_the_cli_takes_effect_at_once_in_every_instance(servers):
    first, second = servers
    ctx = first.ssl_context()  # the certificate both use
    for _ in range(2):  # the second login of each is answered from its cache
        assert imaps_login(first, OLD, ctx) == "OK"
        assert imaps_login(second, OLD, ctx) == "OK"
    first.admin("user", "passwd", USER, "--password-stdin", input=NEW + "\n")
    assert imaps_login(first, OLD, ctx).startswith("NO")
    assert imaps_login(second, OLD, ctx).startswith("NO")
    assert imaps_login(first, NEW, ctx) == "OK"
    assert imaps_login(second, NEW, ctx) == "OK"
    first.admin("user", "disable", USER)
    assert imaps_login(first, NEW, ctx).startswith("NO")
    assert imaps_login(second, NEW, ctx).startswith("NO")
    first.admin("user", "enable", USER)
    assert imaps_login(second, NEW, ctx) == "OK"


def _client_context(server: MailServer, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = server.ssl_context()
    ctx.minimum_version = ctx.maximum_version = version
    return ctx


def _imaps_session(server: MailServer, ctx: ssl.SSLContext,
                   session: ssl.SSLSession | None) -> tuple[ssl.SSLSession, bool]:
    raw = socket.create_connection((HOST, server.ports["imaps"]), timeout=10)
    with ctx.wrap_socket(raw, session=session) as tls:
        greeting = tls.recv(4096)  # a TLS 1.3 ticket comes after the handshake: read first
        assert greeting.startswith(b"* OK"), greeting
        tls.sendall(b"a LOGOUT\r\n")
        _read_until(tls, b"a OK")
        return tls.session, tls.session_reused


def _starttls_session(server: MailServer, ctx: ssl.SSLContext,
                      session: ssl.SSLSession | None) -> tuple[ssl.SSLSession, bool]:
    raw = socket.create_connection((HOST, server.ports["imap"]), timeout=10)
    try:
        _read_until(raw, b"\r\n")
        raw.sendall(b"s STARTTLS\r\n")
        _read_until(raw, b"s OK")
        tls = ctx.wrap_socket(raw, session=session)
        tls.sendall(b"c CAPABILITY\r\n")
        _read_until(tls, b"c OK")
        tls.sendall(b"a LOGOUT\r\n")
        _read_until(tls, b"a OK")
        return tls.session, tls.session_reused
    finally:
        raw.close()


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    return data


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["tls1.2", "tls1.3"])
@pytest.mark.parametrize("connect", [_imaps_session, _starttls_session],
                         ids=["imaps", "starttls"])
def test_a_second_connection_resumes_the_session(servers, connect, version):
    first, _ = servers
    ctx = _client_context(first, version)
    session, reused = connect(first, ctx, None)
    assert not reused
    assert session is not None
    _, reused = connect(first, ctx, session)
    assert reused


def test_pop3s_resumes_too(servers):
    first, _ = servers
    ctx = _client_context(first, ssl.TLSVersion.TLSv1_3)
    raw = socket.create_connection((HOST, first.ports["pop3s"]), timeout=10)
    with ctx.wrap_socket(raw) as tls:
        _read_until(tls, b"+OK")
        tls.sendall(b"QUIT\r\n")
        _read_until(tls, b"+OK")
        session = tls.session
    raw = socket.create_connection((HOST, first.ports["pop3s"]), timeout=10)
    with ctx.wrap_socket(raw, session=session) as tls:
        _read_until(tls, b"+OK")
        assert tls.session_reused


def test_sessions_of_one_process_do_not_resume_on_another(servers):
    """Each process has its own cache and ticket keys: a full handshake, not an error."""
    first, second = servers
    ctx = _client_context(first, ssl.TLSVersion.TLSv1_3)
    session, _ = _imaps_session(first, ctx, None)
    _, reused = _imaps_session(second, ctx, session)
    assert not reused

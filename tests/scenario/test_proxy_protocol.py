"""PROXY protocol listeners of the real server, without HAProxy: raw clients send the header
themselves (docs/design/limits.md, "Behind a proxy"). tests/interop/test_haproxy.py runs the
same behind a real HAProxy."""
from __future__ import annotations

import imaplib
import smtplib
import socket
import struct
import uuid

import pytest

from tests.harness import HOST, MailServer
from tests.polling import wait_until

UNTRUSTED = "127.0.0.5"  # another loopback address: not in trusted_proxies


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    s = MailServer(str(tmp_path_factory.mktemp("proxied")), listeners=["mx", "imaps", "pop3"],
                   extra={"listen": {"proxy_protocol": ["mx", "imaps", "pop3"],
                                     "trusted_proxies": [f"{HOST}/32"]}})
    s.start()
    try:
        s.add_user("alice@example.org")
        yield s
    finally:
        s.stop()


def v1(client: str, port: int) -> bytes:
    return f"PROXY TCP4 {client} {HOST} 40000 {port}\r\n".encode()


V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00]) + struct.pack("!H", 0)


class ProxiedSMTP(smtplib.SMTP):
    """smtplib that opens the connection with `header`, as a proxy would."""

    def __init__(self, header: bytes, *args, **kwargs):
        self.header = header
        super().__init__(*args, **kwargs)

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, timeout)
        sock.sendall(self.header)
        return sock


class ProxiedIMAP4_SSL(imaplib.IMAP4_SSL):
    """The header goes out in the clear, then TLS (HAProxy's send-proxy in TCP mode)."""

    def __init__(self, header: bytes, *args, **kwargs):
        self.header = header
        super().__init__(*args, **kwargs)

    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout)
        sock.sendall(self.header)
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


def send_through(server: MailServer, header: bytes) -> str:
    marker = uuid.uuid4().hex
    with ProxiedSMTP(header, HOST, server.ports["mx"], timeout=30,
                     local_hostname="client.example") as smtp:
        smtp.sendmail("carol@remote.example", ["alice@example.org"],
                      f"Subject: {marker}\r\n\r\nbody\r\n")
    return marker


def received_of(server: MailServer, marker: str) -> str:
    def stored() -> str | None:
        for path in server.messages("alice@example.org"):
            with open(path, "rb") as f:
                data = f.read()
            if marker.encode() in data:
                return data.split(b"\r\n\r\n")[0].decode()
        return None

    header = wait_until(stored, 30, message=f"the message {marker}")
    return next(line for line in header.replace("\r\n ", " ").replace("\r\n\t", " ")
                .split("\r\n") if line.startswith("Received:"))


def test_the_declared_client_is_the_one_recorded(proxied):
    marker = send_through(proxied, v1("192.0.2.7", proxied.ports["mx"]))
    received = received_of(proxied, marker)
    assert "[192.0.2.7]" in received and HOST not in received, received
    wait_until(lambda: "client=192.0.2.7" in proxied.log_text(), 10,
               message="the queued line with the declared client")


def test_a_local_header_keeps_the_proxys_address(proxied):
    marker = send_through(proxied, V2_LOCAL)
    assert f"[{HOST}]" in received_of(proxied, marker)


def test_a_header_from_an_untrusted_address_is_refused(proxied):
    with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError)):
        ProxiedSMTP(v1("192.0.2.7", proxied.ports["mx"]), HOST, proxied.ports["mx"],
                    timeout=30, source_address=(UNTRUSTED, 0))
    wait_until(lambda: f"refused a connection from {UNTRUSTED}: not in [listen] "
               "trusted_proxies" in proxied.log_text(), 10, message="the refusal logged")


def test_a_trusted_peer_without_a_header_is_closed(proxied):
    with socket.create_connection((HOST, proxied.ports["mx"]), timeout=30) as sock:
        sock.sendall(b"EHLO client.example\r\n")
        try:
            assert sock.recv(1024) == b""  # no greeting: closed
        except ConnectionResetError:
            pass  # aborted: also closed
    wait_until(lambda: "no PROXY protocol signature" in proxied.log_text(), 10,
               message="the bad header logged")


def test_imaps_reads_the_header_beneath_tls_and_logs_the_client(proxied):
    ctx = proxied.ssl_context()
    imap = ProxiedIMAP4_SSL(v1("192.0.2.9", proxied.ports["imaps"]), HOST,
                            proxied.ports["imaps"], ssl_context=ctx, timeout=30)
    try:
        imap.login("alice@example.org", "secret-pw-1")
        assert imap.select("INBOX")[0] == "OK"
    finally:
        imap.logout()
    wait_until(lambda: "alice@example.org logged in from 192.0.2.9" in proxied.log_text(), 10,
               message="the login line with the declared client")


def test_pop3_logs_the_declared_client(proxied):
    port = proxied.ports["pop3"]
    with socket.create_connection((HOST, port), timeout=30) as sock:
        sock.sendall(v1("192.0.2.11", port))
        assert sock.recv(1024).startswith(b"+OK")
        sock.sendall(b"QUIT\r\n")
        assert sock.recv(1024).startswith(b"+OK")
    wait_until(lambda: "pop3 connection from 192.0.2.11" in proxied.log_text(), 10,
               message="the connection line with the declared client")

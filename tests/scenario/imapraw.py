"""A raw IMAP connection to the real server (TLS or plain), for the conversations the client
libraries hide. Shared by the IMAP scenario tests."""
from __future__ import annotations

import socket

from tests.imapwire import ResponseReader

PASSWORD = "secret-pw-1"


class Raw(ResponseReader):
    """A raw IMAP connection (TLS by default); logs in as `login_as` unless it is None."""

    def __init__(self, srv, tls: bool = True, login_as: str | None = "alice@example.org",
                 source: str | None = None, timeout: float = 10):
        sock = socket.create_connection(("127.0.0.1", srv.ports["imaps" if tls else "imap"]),
                                        timeout=timeout,
                                        source_address=(source, 0) if source else None)
        self.sock = srv.ssl_context().wrap_socket(sock) if tls else sock
        self.buf = b""
        self.greeting = self.line()
        if login_as:
            self.cmd(b"L LOGIN " + login_as.encode() + b" " + PASSWORD.encode())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            d = self.sock.recv(65536)
            if not d:
                raise ConnectionError(f"closed; pending {self.buf[:200]!r}")
            self.buf += d
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            d = self.sock.recv(65536)
            if not d:
                raise ConnectionError("closed")
            self.buf += d
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def tagged(lines: list[bytes]) -> bytes:
    return lines[-1]


def admitted(srv, tls: bool = True) -> Raw | None:
    """A new connection if the server greets it with OK; None (and closed) if it says BYE."""
    try:
        r = Raw(srv, tls=tls, login_as=None)
    except (ConnectionError, OSError):
        return None
    if r.greeting.startswith(b"* OK"):
        return r
    r.close()
    return None


# -- attack scenarios: the server's memory, and whether other clients are still served ----------


def serve_normal_client(srv, user: str = "bob@example.org", source: str = "127.0.0.1") -> bool:
    """A well-behaved client: log in over TLS, APPEND, FETCH it back, LOGOUT. True if all OK."""
    try:
        r = Raw(srv, login_as=None, source=source)
        try:
            login = r.cmd(b"L LOGIN " + user.encode() + b" " + PASSWORD.encode())
            if not tagged(login).startswith(b"L OK"):
                return False
            msg = b"Subject: normal\r\n\r\nstill served\r\n"
            if not tagged(r.cmd(b"A APPEND INBOX {%d+}\r\n" % len(msg) + msg)).startswith(b"A OK"):
                return False
            if not tagged(r.cmd(b"S SELECT INBOX")).startswith(b"S OK"):
                return False
            resp = r.cmd(b"F FETCH * BODY.PEEK[]")
            if not tagged(resp).startswith(b"F OK") or b"still served" not in b"".join(resp):
                return False
            return tagged(r.cmd(b"Z LOGOUT")).startswith(b"Z OK")
        finally:
            r.close()
    except (OSError, ConnectionError):
        return False


def read_until_closed(sock, limit: int = 1 << 20) -> bytes:
    """What the server writes until it closes the connection (socket timeout = failure)."""
    out = b""
    while len(out) < limit:
        d = sock.recv(65536)
        if not d:
            return out
        out += d
    raise AssertionError(f"the server kept writing: {out[:200]!r}")

"""The imap-ext extensions against the real server with imaplib over implicit TLS: BINARY,
MULTIAPPEND, CATENATE, LIST-STATUS, STATUS=SIZE and COMPRESS=DEFLATE (docs/design/imap.md,
"BINARY" and the sections after it). One server per module."""
from __future__ import annotations

import base64
import imaplib
import zlib

import pytest

from tests.harness import MailServer
from tests.scenario.imapraw import PASSWORD

imaplib.Commands.setdefault("COMPRESS", ("AUTH", "SELECTED"))  # RFC 4978; imaplib lacks it


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = MailServer(str(tmp_path_factory.mktemp("imapext")), listeners=["imaps"])
    s.start()
    s.add_user("alice@example.org", PASSWORD)
    yield s
    s.stop()


class DeflateIMAP(imaplib.IMAP4_SSL):
    """imaplib with COMPRESS=DEFLATE (RFC 4978): raw deflate both ways after the tagged OK."""

    zin = zout = None
    zbuf = b""

    def compress(self) -> None:
        typ, data = self._simple_command("COMPRESS", "DEFLATE")
        assert typ == "OK", data
        self.zin = zlib.decompressobj(-15)
        self.zout = zlib.compressobj(6, zlib.DEFLATED, -15)

    def send(self, data: bytes) -> None:
        if self.zout is not None:
            data = self.zout.compress(data) + self.zout.flush(zlib.Z_SYNC_FLUSH)
        super().send(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise imaplib.IMAP4.abort("connection closed")
        self.zbuf += self.zin.decompress(chunk)

    def read(self, size: int) -> bytes:
        if self.zin is None:
            return super().read(size)
        while len(self.zbuf) < size:
            self._fill()
        out, self.zbuf = self.zbuf[:size], self.zbuf[size:]
        return out

    def readline(self) -> bytes:
        if self.zin is None:
            return super().readline()
        while b"\n" not in self.zbuf:
            self._fill()
        line, _, self.zbuf = self.zbuf.partition(b"\n")
        return line + b"\n"


def connect(srv, cls=imaplib.IMAP4_SSL) -> imaplib.IMAP4_SSL:
    c = cls("127.0.0.1", srv.ports["imaps"], ssl_context=srv.ssl_context())
    c.login("alice@example.org", PASSWORD)
    return c


def message(subject: str, body: bytes = b"body\r\n", headers: bytes = b"") -> bytes:
    return (b"From: a@example.org\r\nSubject: " + subject.encode() + b"\r\n" + headers + b"\r\n"
            + body)


def _append_lit(*messages: bytes) -> str:
    # LITERAL+ literals inline: imaplib sends one synchronizing literal per command at most.
    return " ".join("{%d+}\r\n" % len(m) + m.decode() for m in messages)


def test_binary_fetch(srv):
    c = connect(srv)
    assert "BINARY" in c.capabilities
    payload = "caf\u00e9 \u2713 binary\r\n".encode()
    msg = message("bin", base64.encodebytes(payload).replace(b"\n", b"\r\n"),
                  b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n")
    c.create("Bin")
    assert c.append("Bin", None, None, msg)[0] == "OK"
    c.select("Bin")
    typ, data = c.fetch("1", "(BINARY.SIZE[1] BINARY.PEEK[1])")
    assert typ == "OK"
    assert b"BINARY.SIZE[1] %d" % len(payload) in data[0][0]
    assert data[0][1] == payload
    c.logout()


def test_multiappend_and_catenate(srv):
    c = connect(srv)
    assert {"MULTIAPPEND", "CATENATE"} <= set(c.capabilities)
    c.create("Multi")
    typ, data = c._simple_command("APPEND", "Multi", _append_lit(message("one"), message("two")))
    assert typ == "OK"
    c.select("Multi")
    typ, data = c.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    subjects = [d[1] for d in data if isinstance(d, tuple)]
    assert subjects == [b"Subject: one\r\n\r\n", b"Subject: two\r\n\r\n"]
    typ, data = c._simple_command(
        "APPEND", "Multi", 'CATENATE (URL "/Multi/;UID=2/;SECTION=HEADER" TEXT '
        + _append_lit(b"catenated body\r\n") + ")")
    assert typ == "OK", data
    typ, data = c.fetch("3", "(BODY.PEEK[])")
    assert data[0][1] == message("two", b"catenated body\r\n")
    typ, data = c._simple_command("APPEND", "Multi", 'CATENATE (URL "/Multi/;UID=99")')
    assert typ == "NO"
    c.logout()


def test_list_status_and_status_size(srv):
    c = connect(srv)
    assert {"LIST-STATUS", "STATUS=SIZE"} <= set(c.capabilities)
    c.create("Sized")
    msg = message("sized")
    c.append("Sized", None, None, msg)
    typ, data = c.status("Sized", "(SIZE MESSAGES)")
    assert typ == "OK" and data == [b'"Sized" (SIZE %d MESSAGES 1)' % len(msg)]
    typ, data = c._simple_command("LIST", '""', '"Sized"', "RETURN", "(STATUS (MESSAGES SIZE))")
    assert typ == "OK"
    assert c.untagged_responses.pop("STATUS") == [b'"Sized" (MESSAGES 1 SIZE %d)' % len(msg)]
    c.logout()


def test_compress_deflate_over_tls(srv):
    c = connect(srv, DeflateIMAP)
    assert "COMPRESS=DEFLATE" in c.capabilities
    c.compress()
    big = message("big", b"".join(b"line %05d of a compressible body\r\n" % i for i in range(3000)))
    assert c.append("INBOX", None, None, big)[0] == "OK"
    typ, data = c.select("INBOX")
    assert typ == "OK"
    typ, data = c.search(None, "SUBJECT", "big")
    n = data[0].split()[-1]
    typ, data = c.fetch(n, "(BODY.PEEK[])")
    assert data[0][1] == big
    typ, data = c._simple_command("COMPRESS", "DEFLATE")
    assert typ == "NO" and b"COMPRESSIONACTIVE" in data[0]
    c.logout()

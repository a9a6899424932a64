"""IMAP4rev1 against the real server (`twistd -n mailsuite`) with imaplib, imapclient and raw
sockets. One server per module; each test uses its own folders so tests stay independent.

Regression tests for the Twisted IMAP4Server defects of TWISTED-NOTES §4.4 are marked `#N`.
"""
from __future__ import annotations

import email.utils
import imaplib
import os
import re
import smtplib
import socket
import ssl
import time

import pytest
from imapclient import IMAPClient

from tests.harness import MailServer

PASSWORD = "secret-pw-1"
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


def login(srv, user="alice@example.org") -> imaplib.IMAP4_SSL:
    m = imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=srv.ssl_context())
    m.login(user, PASSWORD)
    return m


def client(srv, user="alice@example.org") -> IMAPClient:
    c = IMAPClient("127.0.0.1", port=srv.ports["imaps"], ssl=True, ssl_context=srv.ssl_context())
    c.login(user, PASSWORD)
    return c


def deliver(srv, rcpt: str, data: bytes, sender: str = "sender@remote.example") -> None:
    """Through the MX port and the queue, as real mail arrives."""
    before = len(srv.messages(rcpt))
    with smtplib.SMTP("127.0.0.1", srv.ports["mx"]) as c:
        c.sendmail(sender, [rcpt], data)
    assert len(srv.wait_for_messages(rcpt, before + 1)) == before + 1


def simple(subject: str = "hello", body: str = "body text\r\n", extra: str = "") -> bytes:
    return (f"From: Sender <sender@remote.example>\r\nTo: alice@example.org\r\n"
            f"Subject: {subject}\r\nDate: Mon, 02 Feb 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@remote.example>\r\n{extra}\r\n{body}").encode()


class Raw:
    """A raw IMAP connection (TLS), for checks the client libraries hide."""

    def __init__(self, srv, tls: bool = True, login_as: str | None = "alice@example.org"):
        sock = socket.create_connection(("127.0.0.1", srv.ports["imaps" if tls else "imap"]), timeout=10)
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

    def response(self, tag: bytes) -> list[bytes]:
        """Lines up to and including the tagged one; literals are inlined."""
        lines = []
        while True:
            line = self.line()
            while True:
                m = re.search(rb"\{(\d+)\}$", line)
                if not m:
                    break
                line += b"\r\n" + self.read_exact(int(m.group(1))) + self.line()
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def cmd(self, line: bytes) -> list[bytes]:
        tag = line.split(b" ", 1)[0]
        self.send(line + b"\r\n")
        out = self.response(tag)
        return out

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def tagged(lines: list[bytes]) -> bytes:
    return lines[-1]


# -- capability, TLS, login ----------------------------------------------------------------------

def test_capabilities_and_logindisabled_before_tls(srv):
    r = Raw(srv, tls=False, login_as=None)
    caps = r.cmd(b"a CAPABILITY")[0]
    for c in (b"IMAP4rev1", b"LITERAL+", b"IDLE", b"UIDPLUS", b"MOVE", b"SPECIAL-USE", b"NAMESPACE",
              b"ID", b"ENABLE", b"UNSELECT", b"CHILDREN", b"STARTTLS", b"LOGINDISABLED"):
        assert c in caps.split(), c
    assert b"AUTH=PLAIN" not in caps
    assert tagged(r.cmd(b"b LOGIN alice@example.org " + PASSWORD.encode())).startswith(b"b NO")
    assert tagged(r.cmd(b"c AUTHENTICATE PLAIN")).startswith(b"c NO")
    r.close()


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
    """#9: `a STARTTLS\\r\\nb LOGIN ...` in one packet must not run b inside TLS."""
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


def test_authenticate_plain_with_continuation_and_sasl_ir(srv):
    m = imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=srv.ssl_context())
    typ, _ = m.authenticate("PLAIN", lambda _: b"\0alice@example.org\0" + PASSWORD.encode())
    assert typ == "OK"
    m.logout()
    import base64

    r = Raw(srv, login_as=None)
    ir = base64.b64encode(b"\0bob@example.org\0" + PASSWORD.encode())
    assert tagged(r.cmd(b"a AUTHENTICATE PLAIN " + ir)).startswith(b"a OK")
    r.close()
    r = Raw(srv, login_as=None)
    r.send(b"a AUTHENTICATE PLAIN\r\n")
    assert r.line().startswith(b"+")
    r.send(b"*\r\n")
    assert r.response(b"a")[-1].startswith(b"a BAD")
    r.close()


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


def test_first_login_creates_special_folders_with_attributes(srv):
    m = login(srv, "carol@example.org")
    typ, data = m.list()
    lines = {re.search(rb'"([^"]*)"$', d).group(1): d for d in data}
    for name, attr in ((b"Sent", b"\\Sent"), (b"Drafts", b"\\Drafts"), (b"Trash", b"\\Trash"),
                       (b"Junk", b"\\Junk"), (b"Archive", b"\\Archive")):
        assert attr in lines[name], lines[name]
    assert b"INBOX" in lines
    m.logout()


def test_namespace_id_enable(srv):
    r = Raw(srv)
    assert r.cmd(b"a NAMESPACE")[0] == b'* NAMESPACE (("" "/")) NIL NIL'
    resp = r.cmd(b'b ID ("name" "Thunderbird" "version" "153")')
    assert resp[0].startswith(b"* ID (") and tagged(resp).startswith(b"b OK")
    resp = r.cmd(b"c ENABLE CONDSTORE")
    assert resp[0] == b"* ENABLED" and tagged(resp).startswith(b"c OK")
    r.close()


# -- folders ------------------------------------------------------------------------------------

def test_list_extended_as_thunderbird_sends_it_and_children(srv):
    c = client(srv)
    c.create_folder("Projects/2026")
    r = Raw(srv)
    resp = r.cmd(b'a LIST (SUBSCRIBED) "" "*" RETURN (SPECIAL-USE)')
    assert tagged(resp).startswith(b"a OK")
    sent = [line for line in resp if line.endswith(b'"Sent"')]
    assert sent and b"\\Sent" in sent[0] and b"\\Subscribed" in sent[0]
    resp = r.cmd(b'b LIST "" "%"')
    projects = [line for line in resp if line.endswith(b'"Projects"')][0]
    assert b"\\HasChildren" in projects
    resp = r.cmd(b'c LIST "" "Projects/%"')
    assert any(line.endswith(b'"Projects/2026"') and b"\\HasNoChildren" in line for line in resp)
    resp = r.cmd(b'd LIST "" ""')
    assert resp[0] == b'* LIST (\\Noselect) "/" ""'
    resp = r.cmd(b'e LIST "" "INBOX"')
    assert resp[0].endswith(b'"INBOX"')
    r.close()
    c.logout()


def test_subscribed_but_missing_folder_is_not_selectable(srv):
    """THUNDERBIRD.md: a deleted-but-subscribed folder must not look selectable."""
    c = client(srv)
    c.create_folder("Ghost")
    c.subscribe_folder("Ghost")
    path = srv.maildir("alice@example.org", "Ghost")
    import shutil

    shutil.rmtree(path)  # gone behind our back (another tool), still in `subscriptions`
    r = Raw(srv)
    resp = r.cmd(b'a LIST (SUBSCRIBED) "" "*" RETURN (SPECIAL-USE)')
    ghost = [line for line in resp if line.endswith(b'"Ghost"')]
    assert ghost and b"\\NonExistent" in ghost[0]
    resp = r.cmd(b'b LSUB "" "*"')
    ghost = [line for line in resp if line.endswith(b'"Ghost"')]
    assert ghost and b"\\Noselect" in ghost[0]
    resp = r.cmd(b'c LIST "" "*"')
    assert not [line for line in resp if line.endswith(b'"Ghost"')]
    r.close()
    c.logout()


def test_create_delete_rename_and_case_preserved(srv):
    """#12: names keep their case (Twisted's MemoryAccount upper-cased them)."""
    c = client(srv)
    c.create_folder("Mixed Case")
    c.create_folder("Ünïcode")
    names = [f[2] for f in c.list_folders()]
    assert "Mixed Case" in names and "Ünïcode" in names
    c.rename_folder("Mixed Case", "Renamed/Child")
    names = [f[2] for f in c.list_folders()]
    assert "Renamed/Child" in names and "Mixed Case" not in names
    c.delete_folder("Renamed/Child")
    assert "Renamed/Child" not in [f[2] for f in c.list_folders()]
    r = Raw(srv)
    assert tagged(r.cmd(b'a CREATE "Sent"')).startswith(b"a NO")
    assert tagged(r.cmd(b'b DELETE "NoSuchFolder"')).startswith(b"b NO")
    assert tagged(r.cmd(b'c DELETE INBOX')).startswith(b"c NO")
    r.close()
    c.logout()


@pytest.mark.parametrize("name", [b'"../escape"', b'"a/../../escape"', b'".hidden"', b'"x\\\\y"',
                                  b'"/abs"', b'"foo/"/', b'{6}\r\nab\x01cd\x7f'])
def test_path_escaping_mailbox_names_are_refused(srv, name):
    r = Raw(srv)
    mail_dir = os.path.join(srv.data_dir, "mail")
    before = set(os.listdir(os.path.dirname(srv.maildir("alice@example.org"))))
    before_root = set(os.listdir(mail_dir))
    if name.startswith(b"{"):
        r.send(b"a CREATE " + name.split(b"\r\n")[0] + b"\r\n")
        assert r.line().startswith(b"+")
        r.send(name.split(b"\r\n")[1] + b"\r\n")
        resp = r.response(b"a")
    else:
        resp = r.cmd(b"a CREATE " + name)
    assert tagged(resp).startswith((b"a NO", b"a BAD")), resp
    if not name.startswith(b"{"):
        assert tagged(r.cmd(b"b RENAME Junk " + name)).startswith((b"b NO", b"b BAD"))
        resp = r.cmd(b"c APPEND " + name + b" {4+}\r\nx\r\n\r\n")
        assert tagged(resp).startswith((b"c NO", b"c BAD")), resp
        assert tagged(r.cmd(b"d SELECT " + name)).startswith((b"d NO", b"d BAD"))
    assert set(os.listdir(os.path.dirname(srv.maildir("alice@example.org")))) == before
    assert set(os.listdir(mail_dir)) == before_root
    assert tagged(r.cmd(b"b NOOP")).startswith(b"b OK")  # the session goes on
    r.close()


def test_status(srv):
    c = client(srv)
    c.create_folder("StatusBox")
    c.append("StatusBox", simple("one"), flags=[b"\\Seen"])
    c.append("StatusBox", simple("two"))
    st = c.folder_status("StatusBox", [b"MESSAGES", b"UNSEEN", b"UIDNEXT", b"UIDVALIDITY", b"RECENT"])
    assert st[b"MESSAGES"] == 2 and st[b"UNSEEN"] == 1 and st[b"UIDNEXT"] == 3
    assert st[b"UIDVALIDITY"] > 0
    r = Raw(srv)
    assert tagged(r.cmd(b'a STATUS "Nope" (MESSAGES)')).startswith(b"a NO")
    assert tagged(r.cmd(b'b STATUS "StatusBox" (BOGUS)')).startswith(b"b BAD")
    r.close()
    c.logout()


# -- APPEND -------------------------------------------------------------------------------------

def test_append_variants_literal_plus_and_appenduid(srv):
    r = Raw(srv)
    r.cmd(b"x CREATE AppendBox")
    msg = simple("append")
    # #4: no flag list, no date; LITERAL+ (RFC 7888) needs no continuation.
    resp = r.cmd(b"a APPEND AppendBox {%d+}\r\n" % len(msg) + msg)
    m = re.match(rb"a OK \[APPENDUID (\d+) (\d+)\]", tagged(resp))
    assert m, resp
    uid1 = int(m.group(2))
    resp = r.cmd(b'b APPEND AppendBox (\\Seen $Label1) "17-Jul-1996 02:44:25 -0700" {%d+}\r\n'
                 % len(msg) + msg)
    uid2 = int(re.match(rb"b OK \[APPENDUID \d+ (\d+)\]", tagged(resp)).group(1))
    assert uid2 == uid1 + 1
    # Synchronizing literal: wait for "+" first.
    r.send(b"c APPEND AppendBox () {%d}\r\n" % len(msg))
    assert r.line().startswith(b"+")
    r.send(msg + b"\r\n")
    assert tagged(r.response(b"c")).startswith(b"c OK [APPENDUID")
    r.cmd(b"d SELECT AppendBox")
    resp = r.cmd(b"e UID FETCH %d (FLAGS INTERNALDATE RFC822.SIZE)" % uid2)
    assert b"\\Seen" in resp[0] and b"$Label1" in resp[0]
    assert b'"17-Jul-1996 09:44:25 +0000"' in resp[0]
    assert b"RFC822.SIZE %d" % len(msg) in resp[0]
    r.close()


def test_append_to_missing_folder_gives_trycreate(srv):
    """#3: [TRYCREATE] (Twisted sent BAD Server error)."""
    c = login(srv)
    typ, data = c.append("DoesNotExist", None, None, simple())
    assert typ == "NO" and b"[TRYCREATE]" in data[0]
    c.logout()


def test_append_to_other_folder_sends_no_exists(srv):
    """#2: APPEND to Sent while INBOX is selected must not send Sent's EXISTS."""
    r = Raw(srv, login_as="bob@example.org")
    r.cmd(b"a SELECT INBOX")
    msg = simple("sent copy")
    for i in range(2):
        resp = r.cmd(b"b%d APPEND Sent (\\Seen) {%d+}\r\n" % (i, len(msg)) + msg)
        assert not [line for line in resp if line.endswith(b"EXISTS")], resp
    r.close()


def test_append_over_the_limit_is_refused_before_reading(srv):
    r = Raw(srv)
    folder = srv.maildir("alice@example.org")
    before = srv.messages("alice@example.org")
    r.send(b"a APPEND INBOX {%d}\r\n" % (MAX_SIZE + 1))
    line = r.line()
    assert line.startswith(b"a NO [TOOBIG]") or line.startswith(b"a NO [LIMIT]"), line
    # Non-synchronizing: the client sends it anyway; the server skips it and goes on.
    big = b"x" * (MAX_SIZE + 10)
    resp = r.cmd(b"b APPEND INBOX {%d+}\r\n" % len(big) + big)
    assert tagged(resp).startswith(b"b NO [TOOBIG]")
    assert tagged(r.cmd(b"c NOOP")).startswith(b"c OK")
    assert srv.messages("alice@example.org") == before
    assert os.listdir(os.path.join(folder, "tmp")) == []
    r.close()


def test_dropped_connection_mid_append_leaves_no_file(srv):
    r = Raw(srv)
    before = srv.messages("alice@example.org")
    r.send(b"a APPEND INBOX {5000+}\r\n" + b"Subject: partial\r\n\r\n" + b"y" * 1000)
    time.sleep(0.3)
    r.close()
    time.sleep(0.5)
    assert srv.messages("alice@example.org") == before
    assert os.listdir(os.path.join(srv.maildir("alice@example.org"), "tmp")) == []


# -- SELECT / FETCH -----------------------------------------------------------------------------

def test_select_and_examine_responses(srv):
    c = client(srv)
    c.create_folder("SelBox")
    c.append("SelBox", simple("a"), flags=[b"\\Seen"])
    c.append("SelBox", simple("b"))
    r = Raw(srv)
    resp = r.cmd(b"a SELECT SelBox")
    text = b"\n".join(resp)
    assert b"* 2 EXISTS" in text and re.search(rb"\* \d+ RECENT", text)
    assert b"* FLAGS (" in text and b"[PERMANENTFLAGS (" in text and b"\\*)" in text
    assert b"[UNSEEN 2]" in text and b"[UIDVALIDITY " in text and b"[UIDNEXT 3]" in text
    assert tagged(resp).startswith(b"a OK [READ-WRITE]")
    resp = r.cmd(b"b EXAMINE SelBox")
    assert tagged(resp).startswith(b"b OK [READ-ONLY]")
    assert tagged(r.cmd(b"c STORE 1 +FLAGS (\\Flagged)")).startswith(b"c NO")
    # A body fetch in EXAMINE does not set \Seen.
    r.cmd(b"d FETCH 2 BODY[]")
    resp = r.cmd(b"e FETCH 2 FLAGS")
    assert b"\\Seen" not in resp[0]
    assert tagged(r.cmd(b"f SELECT NoSuchBox")).startswith(b"f NO")
    assert tagged(r.cmd(b"g FETCH 1 FLAGS")).startswith(b"g BAD")  # failed SELECT deselects
    r.close()
    c.logout()


def test_partial_fetch_in_chunks_reassembles_byte_identical(srv):
    """#1: Thunderbird fetches messages over 15 KB in 10240-byte chunks."""
    body = b"".join(b"line %06d %s\r\n" % (i, b"abcdefghij" * 6) for i in range(2100))
    msg = simple("partial", body=body.decode())
    assert len(msg) > 150_000
    c = client(srv)
    c.create_folder("PartialBox")
    c.append("PartialBox", msg)
    c.logout()
    r = Raw(srv)
    r.cmd(b"s SELECT PartialBox")
    got = b""
    offset = 0
    i = 0
    while True:
        tag = b"p%d" % i
        r.send(tag + b" UID FETCH 1 (UID BODY.PEEK[]<%d.10240>)\r\n" % offset)
        line = r.line()
        m = re.search(rb"BODY\[\]<(\d+)> \{(\d+)\}$", line)
        assert m, line
        assert int(m.group(1)) == offset  # the origin only, not <o.n>
        n = int(m.group(2))
        got += r.read_exact(n)
        rest = r.response(tag)
        assert tagged(rest).startswith(tag + b" OK")
        offset += n
        i += 1
        if n < 10240:
            break
    assert got == msg
    resp = r.cmd(b"z FETCH 1 BODY.PEEK[]<%d.100>" % (len(msg) + 5))
    assert b'BODY[]<%d> ""' % (len(msg) + 5) in resp[0]
    r.close()


def test_header_fetch_keeps_raw_8bit_bytes_duplicates_and_order(srv):
    """#5: raw UTF-8/8-bit headers, duplicate Received, original case and order."""
    header = (b"Received: from a by b; Mon, 02 Feb 2026 10:00:00 +0000\r\n"
              b"Received: from c by d; Mon, 02 Feb 2026 09:00:00 +0000\r\n"
              b"From: J\xc3\xbcrgen <j@example.org>\r\n"
              b"Subject: Gr\xc3\xbc\xc3\x9fe \xe9 latin1\r\n"
              b"Message-ID: <8bit@example.org>\r\n"
              b"X-Folded: one\r\n two\r\n")
    msg = header + b"\r\nbody\r\n"
    c = client(srv)
    c.create_folder("EightBit")
    c.append("EightBit", msg)
    c.logout()
    r = Raw(srv)
    r.cmd(b"s SELECT EightBit")
    resp = r.cmd(b"a FETCH 1 (BODY.PEEK[HEADER])")
    assert header + b"\r\n" in resp[0]
    resp = r.cmd(b"b FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT RECEIVED X-FOLDED)])")
    expected = (b"Received: from a by b; Mon, 02 Feb 2026 10:00:00 +0000\r\n"
                b"Received: from c by d; Mon, 02 Feb 2026 09:00:00 +0000\r\n"
                b"Subject: Gr\xc3\xbc\xc3\x9fe \xe9 latin1\r\nX-Folded: one\r\n two\r\n\r\n")
    assert b"{%d}\r\n" % len(expected) + expected in resp[0]
    resp = r.cmd(b"c FETCH 1 (BODY.PEEK[HEADER.FIELDS.NOT (RECEIVED SUBJECT FROM X-FOLDED)])")
    assert b"Message-ID: <8bit@example.org>\r\n\r\n" in resp[0] and b"Received" not in resp[0]
    resp = r.cmd(b"d FETCH 1 (ENVELOPE)")
    assert tagged(resp).startswith(b"d OK") and b"J\xc3\xbcrgen" in resp[0]
    assert tagged(r.cmd(b"e NOOP")).startswith(b"e OK")  # the connection survived
    r.close()


NESTED = (b"From: a@example.org\r\nTo: b@example.org\r\nSubject: =?UTF-8?B?w5xiZXI=?=\r\n"
          b"MIME-Version: 1.0\r\n"
          b'Content-Type: multipart/mixed; boundary="Outer-Boundary"\r\n\r\n'
          b"preamble\r\n"
          b"--Outer-Boundary\r\n"
          b'Content-Type: multipart/alternative; boundary="inner"\r\n\r\n'
          b"--inner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nplain text\r\n"
          b"--inner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>html</p>\r\n"
          b"--inner--\r\n"
          b"--Outer-Boundary\r\n"
          b"Content-Type: message/rfc822\r\n\r\n"
          b"From: inner@example.org\r\nSubject: inner\r\n"
          b'Content-Type: multipart/mixed; boundary="deep"\r\n\r\n'
          b"--deep\r\nContent-Type: text/plain\r\n\r\ndeep one\r\n"
          b"--deep\r\nContent-Type: application/octet-stream; name=\"a;b.bin\"\r\n"
          b"Content-Transfer-Encoding: base64\r\n"
          b"Content-Disposition: attachment; filename=\"a;b.bin\"\r\n\r\nAAEC\r\n"
          b"--deep--\r\n"
          b"--Outer-Boundary\r\n"
          b"Content-Type: text/plain;\r\n\r\nweird params\r\n"
          b"--Outer-Boundary--\r\nepilogue\r\n")


def test_bodystructure_and_sections_of_nested_multipart(srv):
    """#6: case-preserved boundary, trailing ';', quoted ';' in values, message/rfc822."""
    c = client(srv)
    c.create_folder("Nested")
    c.append("Nested", NESTED)
    c.select_folder("Nested")
    data = c.fetch([1], ["BODYSTRUCTURE", "BODY", "ENVELOPE"])
    bs = data[1][b"BODYSTRUCTURE"]
    assert bs.is_multipart
    parts, subtype = bs[0], bs[1]
    assert subtype == b"mixed" or subtype == b"MIXED"
    assert len(parts) == 3
    assert parts[0][1].upper() == b"ALTERNATIVE"
    assert parts[1][0].upper() == b"MESSAGE" and parts[1][1].upper() == b"RFC822"
    r = Raw(srv)
    r.cmd(b"s SELECT Nested")
    resp = r.cmd(b"a FETCH 1 BODYSTRUCTURE")[0]
    assert b'"BOUNDARY" "Outer-Boundary"' in resp
    assert b'"NAME" "a;b.bin"' in resp
    sections = {
        b"1.1": b"plain text",
        b"1.2": b"<p>html</p>",
        b"2.HEADER": b"From: inner@example.org\r\nSubject: inner\r\n"
                     b'Content-Type: multipart/mixed; boundary="deep"\r\n\r\n',
        b"2.1": b"deep one",
        b"2.2": b"AAEC",
        b"2.2.MIME": b'Content-Type: application/octet-stream; name="a;b.bin"\r\n'
                     b"Content-Transfer-Encoding: base64\r\n"
                     b'Content-Disposition: attachment; filename="a;b.bin"\r\n\r\n',
        b"3": b"weird params",
        b"1.1.MIME": b"Content-Type: text/plain; charset=utf-8\r\n\r\n",
    }
    for i, (sec, want) in enumerate(sections.items()):
        resp = r.cmd(b"f%d FETCH 1 (BODY.PEEK[%s])" % (i, sec))
        m = re.search(rb"BODY\[" + re.escape(sec) + rb"\] \{(\d+)\}\r\n", resp[0])
        assert m, resp
        got = resp[0][m.end():m.end() + int(m.group(1))]
        assert got == want, (sec, got)
    resp = r.cmd(b"g FETCH 1 (BODY.PEEK[2.TEXT])")
    assert b"--deep\r\nContent-Type: text/plain" in resp[0]
    resp = r.cmd(b"h FETCH 1 (BODY.PEEK[9])")
    assert tagged(resp).startswith(b"h OK")
    r.close()
    c.logout()


def test_fetch_macros_rfc822_items_and_seen(srv):
    c = client(srv)
    c.create_folder("Macros")
    msg = simple("macro")
    c.append("Macros", msg)
    c.select_folder("Macros")
    d = c.fetch([1], ["ALL"])[1]
    assert b"ENVELOPE" in d and b"RFC822.SIZE" in d and b"INTERNALDATE" in d and b"FLAGS" in d
    assert d[b"ENVELOPE"].subject == b"macro"
    d = c.fetch([1], ["FULL"])[1]
    assert b"BODY" in d
    d = c.fetch([1], ["RFC822.HEADER", "RFC822.SIZE"])[1]
    assert d[b"RFC822.HEADER"] == msg.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert b"\\Seen" not in c.get_flags([1])[1]
    d = c.fetch([1], ["RFC822.TEXT"])[1]
    assert d[b"RFC822.TEXT"] == b"body text\r\n"
    assert b"\\Seen" in c.get_flags([1])[1]
    c.remove_flags([1], [b"\\Seen"])
    d = c.fetch([1], ["RFC822"])[1]
    assert d[b"RFC822"] == msg
    assert b"\\Seen" in c.get_flags([1])[1]
    c.logout()


def test_store_flags_keywords_and_silent(srv):
    c = client(srv)
    c.create_folder("Flags")
    c.append("Flags", simple("f"))
    c.select_folder("Flags")
    assert set(c.add_flags([1], [b"\\Flagged", b"$Forwarded"])[1]) >= {b"\\Flagged", b"$Forwarded"}
    assert b"\\Flagged" not in c.remove_flags([1], [b"\\Flagged"])[1]
    assert set(c.set_flags([1], [b"\\Answered", b"$Junk"])[1]) == {b"\\Answered", b"$Junk"}
    r = Raw(srv)
    r.cmd(b"s SELECT Flags")
    resp = r.cmd(b"a STORE 1 +FLAGS.SILENT (\\Draft)")
    assert resp == [b"a OK STORE completed"]
    resp = r.cmd(b"b UID STORE 1 -FLAGS (\\Draft)")
    assert b"UID 1" in resp[0] and b"\\Draft" not in resp[0]
    assert tagged(r.cmd(b"c STORE 1 +FLAGS (\\Bogus)")).startswith(b"c BAD")
    assert tagged(r.cmd(b"d STORE 5 +FLAGS (\\Seen)")).startswith(b"d BAD")
    r.close()
    c.logout()
    names = os.listdir(os.path.join(srv.maildir("alice@example.org", "Flags"), "cur"))
    assert names[0].endswith(":2,Ra") or ":2,R" in names[0]


# -- SEARCH -------------------------------------------------------------------------------------

def _search_box(srv):
    c = client(srv)
    if not c.folder_exists("SearchBox"):
        c.create_folder("SearchBox")
        c.append("SearchBox", simple("first apple", body="The quick brown fox\r\n"),
                 flags=[b"\\Seen"], msg_time=__import__("datetime").datetime(2025, 1, 10, 12, 0))
        c.append("SearchBox", simple("second =?UTF-8?Q?Gr=C3=BC=C3=9Fe?=", body="lazy dog\r\n",
                                     extra="Cc: carol@example.org\r\n"),
                 flags=[b"\\Flagged"])
        big = simple("third", body="x" * 5000 + "\r\n").replace(
            b"Date: Mon, 02 Feb 2026", b"Date: Sun, 01 Mar 2026")
        c.append("SearchBox", big, flags=[b"\\Deleted", b"$Label1"])
        c.append("SearchBox", simple("fourth", body="Größe im Text\r\n",
                                     extra="Content-Type: text/plain; charset=utf-8\r\n"
                                           "Content-Transfer-Encoding: quoted-printable\r\n")
                 .replace(b"Gr\xc3\xb6\xc3\x9fe im Text", b"Gr=C3=B6=C3=9Fe im Text"))
    c.select_folder("SearchBox")
    return c


@pytest.mark.parametrize("criteria,expected", [
    ("ALL", [1, 2, 3, 4]),
    ("SEEN", [1]), ("UNSEEN", [2, 3, 4]), ("FLAGGED", [2]), ("DELETED", [3]), ("UNDELETED", [1, 2, 4]),
    ("KEYWORD $Label1", [3]), ("UNKEYWORD $Label1", [1, 2, 4]),
    ("FROM sender@remote", [1, 2, 3, 4]), ("SUBJECT apple", [1]), ("SUBJECT APPLE", [1]),
    ("TO alice", [1, 2, 3, 4]), ("CC carol", [2]), ("BODY fox", [1]), ("TEXT lazy", [2]),
    ("TEXT second", [2]), ("HEADER Message-ID <third@remote.example>", [3]),
    ("LARGER 3000", [3]), ("SMALLER 3000", [1, 2, 4]),
    ("SENTSINCE 1-Mar-2026", [3]), ("SENTBEFORE 1-Mar-2026", [1, 2, 4]), ("SENTON 2-Feb-2026", [1, 2, 4]),
    ("BEFORE 1-Jan-2026", [1]), ("SINCE 1-Jan-2026", [2, 3, 4]), ("ON 10-Jan-2025", [1]),
    ("OR SEEN FLAGGED", [1, 2]), ("NOT SEEN", [2, 3, 4]), ("NOT (OR SEEN FLAGGED)", [3, 4]),
    ("(SEEN) (SUBJECT apple)", [1]), ("2:3", [2, 3]), ("UID 1,4", [1, 4]), ("1:* NOT 2", [1, 3, 4]),
    ("OR (SUBJECT first) (OR BODY dog LARGER 4000)", [1, 2, 3]),
    ("UNFLAGGED", [1, 3, 4]), ("ANSWERED", []), ("UNANSWERED", [1, 2, 3, 4]), ("DRAFT", []),
    ("UNDRAFT", [1, 2, 3, 4]), ("OLD", [1, 2, 3, 4]), ("NEW", []), ("RECENT", []),
    ("HEADER X-Absent \"\"", []), ("HEADER Cc \"\"", [2]), ("*", [4]), ("UID *", [4]),
])
def test_search_keys(srv, criteria, expected):
    c = _search_box(srv)
    assert sorted(c.search(criteria)) == expected
    c.logout()


def test_search_header_message_id_and_uid_search(srv):
    """#7: Thunderbird finds its saved copies with UID SEARCH HEADER Message-ID."""
    m = login(srv)
    _search_box(srv).logout()
    m.select("SearchBox")
    typ, data = m.uid("SEARCH", None, "HEADER", "Message-ID", "<fourth@remote.example>")
    assert typ == "OK" and data[0].split() == [b"4"]
    m.logout()


def test_search_charset_utf8_with_literal(srv):
    """#8: CHARSET UTF-8 SUBJECT {n} gets a continuation and matches decoded words."""
    _search_box(srv).logout()
    r = Raw(srv)
    r.cmd(b"s SELECT SearchBox")
    term = "grüße".encode()
    r.send(b"a SEARCH CHARSET UTF-8 SUBJECT {%d}\r\n" % len(term))
    assert r.line().startswith(b"+")
    r.send(term + b"\r\n")
    resp = r.response(b"a")
    assert resp[0] == b"* SEARCH 2", resp
    term = "größe".encode()
    resp = r.cmd(b"b UID SEARCH CHARSET UTF-8 BODY {%d+}\r\n" % len(term) + term)
    assert resp[0] == b"* SEARCH 4", resp
    assert tagged(r.cmd(b"c SEARCH CHARSET KOI8-Q ALL")).startswith(b"c NO [BADCHARSET")
    assert tagged(r.cmd(b"d SEARCH FROBNICATE")).startswith(b"d BAD")
    r.close()


# -- COPY / MOVE / EXPUNGE ----------------------------------------------------------------------

def test_copy_move_copyuid_and_trycreate(srv):
    c = client(srv)
    for name in ("CopySrc", "CopyDst"):
        c.create_folder(name)
    for i in range(3):
        c.append("CopySrc", simple(f"c{i}"), flags=[b"\\Flagged"])
    r = Raw(srv)
    r.cmd(b"s SELECT CopySrc")
    resp = r.cmd(b"a UID COPY 1:2 CopyDst")
    assert re.match(rb"a OK \[COPYUID \d+ 1:2 1:2\]", tagged(resp)), resp
    resp = r.cmd(b"b COPY 1 Missing")
    assert tagged(resp).startswith(b"b NO [TRYCREATE]")  # #3
    resp = r.cmd(b"c MOVE 2:3 CopyDst")
    assert re.match(rb"\* OK \[COPYUID \d+ 2:3 3:4\]", resp[0]), resp
    assert resp[1:3] == [b"* 3 EXPUNGE", b"* 2 EXPUNGE"]
    resp = r.cmd(b"d UID MOVE 1 Missing")
    assert tagged(resp).startswith(b"d NO [TRYCREATE]")
    r.close()
    c.select_folder("CopyDst")
    assert len(c.search("ALL")) == 4 and len(c.search("FLAGGED")) == 4
    c.logout()


def test_expunge_numbers_shift_correctly_and_uid_expunge(srv):
    c = client(srv)
    c.create_folder("Expunge")
    for i in range(6):
        c.append("Expunge", simple(f"e{i}"))
    r = Raw(srv)
    r.cmd(b"s SELECT Expunge")
    r.cmd(b"a STORE 2:3,5 +FLAGS.SILENT (\\Deleted)")
    resp = r.cmd(b"b EXPUNGE")
    # Descending order keeps each number valid when it is sent (TWISTED-NOTES §4.2).
    assert resp[:3] == [b"* 5 EXPUNGE", b"* 3 EXPUNGE", b"* 2 EXPUNGE"], resp
    resp = r.cmd(b"c FETCH 1:* UID")
    assert [int(re.search(rb"UID (\d+)", line).group(1)) for line in resp[:-1]] == [1, 4, 6]
    r.cmd(b"d UID STORE 4,6 +FLAGS.SILENT (\\Deleted)")
    resp = r.cmd(b"e UID EXPUNGE 6")
    assert resp[0] == b"* 3 EXPUNGE" and tagged(resp).startswith(b"e OK")
    resp = r.cmd(b"f UID SEARCH DELETED")
    assert resp[0] == b"* SEARCH 4"
    assert tagged(r.cmd(b"f2 CHECK")).startswith(b"f2 OK")
    resp = r.cmd(b"g CLOSE")
    assert tagged(resp).startswith(b"g OK") and not resp[:-1]
    resp = r.cmd(b"h STATUS Expunge (MESSAGES)")
    assert b"MESSAGES 1" in resp[0]
    r.cmd(b"i SELECT Expunge")
    assert tagged(r.cmd(b"j UNSELECT")).startswith(b"j OK")
    assert tagged(r.cmd(b"k FETCH 1 UID")).startswith(b"k BAD")
    r.close()
    c.logout()


# -- sessions, IDLE, pipelining, bad input -------------------------------------------------------

def test_idle_sees_delivery_within_two_seconds(srv):
    r = Raw(srv, login_as="bob@example.org")
    resp = r.cmd(b"s SELECT INBOX")
    exists = int([line for line in resp if line.endswith(b"EXISTS")][0].split()[1])
    r.send(b"i IDLE\r\n")
    assert r.line().startswith(b"+")
    t = time.monotonic()
    deliver(srv, "bob@example.org", simple("idle"))
    delivered = time.monotonic()
    r.sock.settimeout(5)
    line = r.line()
    assert line == b"* %d EXISTS" % (exists + 1), line
    assert time.monotonic() - delivered < 2.0, time.monotonic() - t
    r.send(b"DONE\r\n")
    assert tagged(r.response(b"i")).startswith(b"i OK")
    # Only DONE ends IDLE (Twisted accepted any line).
    r.send(b"j IDLE\r\n")
    assert r.line().startswith(b"+")
    r.send(b"k NOOP\r\n")
    assert tagged(r.response(b"j")).startswith(b"j BAD")
    assert tagged(r.cmd(b"l NOOP")).startswith(b"l OK")
    r.close()


def test_two_sessions_see_each_others_changes(srv):
    c = client(srv)
    c.create_folder("Shared")
    for i in range(3):
        c.append("Shared", simple(f"s{i}"))
    c.logout()
    a, b = Raw(srv), Raw(srv)
    a.cmd(b"s SELECT Shared")
    b.cmd(b"s SELECT Shared")
    a.cmd(b"a STORE 2 +FLAGS (\\Flagged)")
    resp = b.cmd(b"b NOOP")
    assert any(re.match(rb"\* 2 FETCH \(.*FLAGS \(\\Flagged\)", line) for line in resp), resp
    a.cmd(b"c STORE 1 +FLAGS.SILENT (\\Deleted)")
    a.cmd(b"d EXPUNGE")
    msg = simple("new one")
    a.cmd(b"e APPEND Shared {%d+}\r\n" % len(msg) + msg)
    resp = b.cmd(b"f NOOP")
    assert b"* 1 EXPUNGE" in resp and b"* 3 EXISTS" in resp, resp
    assert resp.index(b"* 1 EXPUNGE") < resp.index(b"* 3 EXISTS")
    # No EXPUNGE during a non-UID FETCH (RFC 3501 §7.4.1), but after it.
    a.cmd(b"g STORE 1 +FLAGS.SILENT (\\Deleted)")
    a.cmd(b"h EXPUNGE")
    resp = b.cmd(b"i FETCH 1:3 UID")
    assert not [line for line in resp if line.endswith(b"EXPUNGE")]
    resp = b.cmd(b"j NOOP")
    assert b"* 1 EXPUNGE" in resp
    a.close()
    b.close()


def test_pipelined_commands_answer_in_order(srv):
    """#10 (#9282): SELECT/STATUS/APPEND/FETCH pipelined must answer in command order."""
    r = Raw(srv)
    msg = simple("pipe")
    batch = (b"p1 SELECT INBOX\r\np2 STATUS Sent (MESSAGES)\r\n"
             b"p3 APPEND Drafts {%d+}\r\n" % len(msg) + msg + b"\r\n"
             b"p4 NOOP\r\np5 LIST \"\" \"*\"\r\np6 FETCH 1:* (FLAGS)\r\np7 EXAMINE INBOX\r\n")
    r.send(batch)
    tags = []
    while len(tags) < 7:
        line = r.line()
        m = re.match(rb"(p\d) ", line)
        if m:
            tags.append(m.group(1))
    assert tags == [b"p1", b"p2", b"p3", b"p4", b"p5", b"p6", b"p7"]
    r.close()


def test_malformed_commands_get_bad_and_session_continues(srv):
    r = Raw(srv)
    for i, line in enumerate([b"x", b"a1 FROB", b'a2 SELECT "unterminated', b"a3 FETCH", b"a4 FETCH 1:x FLAGS",
                              b"a5 LIST ((", b"a6 UID FROB 1", b"* NOOP", b"a8 FETCH 1 (BODY[HEADER.FIELDS])",
                              b"a9 APPEND INBOX (\\Seen) notaliteral", b"b1 STORE 1 FLAGS"]):
        tag = line.split(b" ")[0]
        r.send(line + b"\r\n")
        got = r.line()
        while got.startswith(b"* ") and tag != b"*":
            got = r.line()
        assert b" BAD " in got or got.startswith(b"* BAD") or b" NO " in got, (line, got)
    assert tagged(r.cmd(b"z NOOP")).startswith(b"z OK")
    r.close()
    assert "imap: BAD command from 127.0.0.1" in srv.log_text()


def test_long_lines_accepted_up_to_64k_and_refused_beyond(srv):
    """#11: a 20 KB UID set is legal (Twisted dropped lines over 16 KB)."""
    r = Raw(srv)
    r.cmd(b"s SELECT INBOX")
    uids = b",".join(b"%d" % i for i in range(1, 18000, 2))
    assert len(uids) > 16384
    assert tagged(r.cmd(b"a UID FETCH " + uids + b" (FLAGS)")).startswith(b"a OK")
    resp = r.cmd(b"b NOOP " + b"x" * 70000)
    assert tagged(resp).startswith(b"b BAD")
    assert tagged(r.cmd(b"c NOOP")).startswith(b"c OK")
    r.close()


def test_mailbox_in_modified_utf7_and_timeouts_config(srv):
    c = client(srv)
    c.create_folder("Entwürfe")
    r = Raw(srv)
    resp = r.cmd(b'a LIST "" "Entw*"')
    assert resp[0].endswith(b'"Entw&APw-rfe"'), resp
    assert tagged(r.cmd(b'b SELECT "Entw&APw-rfe"')).startswith(b"b OK")
    r.close()
    c.logout()


def test_fetch_flags_does_not_open_message_files(srv):
    """FETCH FLAGS/UID/RFC822.SIZE/INTERNALDATE come from the index, not from the files: with
    the file emptied behind the server's back, RFC822.SIZE still reports the indexed size."""
    c = client(srv)
    c.create_folder("IndexOnly")
    msg = simple("index")
    c.append("IndexOnly", msg)
    c.select_folder("IndexOnly")
    cur = os.path.join(srv.maildir("alice@example.org", "IndexOnly"), "cur")
    for n in os.listdir(cur):
        open(os.path.join(cur, n), "wb").close()
    d = c.fetch([1], ["UID", "FLAGS", "RFC822.SIZE", "INTERNALDATE"])
    assert d[1][b"RFC822.SIZE"] == len(msg)
    c.logout()


def test_selected_folder_deleted_by_another_session(srv):
    c = client(srv)
    c.create_folder("Doomed")
    c.append("Doomed", simple("doomed"))
    r = Raw(srv)
    r.cmd(b"s SELECT Doomed")
    c.delete_folder("Doomed")
    c.logout()
    resp = []
    r.send(b"a NOOP\r\n")
    with pytest.raises(ConnectionError):
        while True:
            resp.append(r.line())
    assert resp and resp[0].startswith(b"* BYE"), resp
    r.close()


def test_command_pipelined_after_done_waits_for_idle_to_end(srv):
    r = Raw(srv)
    r.cmd(b"s SELECT INBOX")
    r.send(b"i IDLE\r\n")
    assert r.line().startswith(b"+")
    time.sleep(0.2)
    r.send(b"DONE\r\nn NOOP\r\nc CAPABILITY\r\n")
    lines = r.response(b"c")
    tags = [line.split(b" ")[0] for line in lines if not line.startswith(b"*")]
    assert tags == [b"i", b"n", b"c"], lines
    r.close()


def test_empty_mailbox_star_ranges_and_plain_authzid(srv):
    c = client(srv)
    c.create_folder("Empty")
    c.logout()
    r = Raw(srv)
    r.cmd(b"s SELECT Empty")
    assert r.cmd(b"a FETCH 1:* FLAGS") == [b"a OK FETCH completed"]
    assert r.cmd(b"b UID FETCH 1:* FLAGS") == [b"b OK FETCH completed"]
    assert tagged(r.cmd(b"c FETCH 1 FLAGS")).startswith(b"c BAD")
    assert r.cmd(b"d SEARCH ALL")[0] == b"* SEARCH"
    r.close()
    import base64

    r = Raw(srv, login_as=None)
    ir = base64.b64encode(b"bob@example.org\0alice@example.org\0" + PASSWORD.encode())
    assert tagged(r.cmd(b"a AUTHENTICATE PLAIN " + ir)).startswith(b"a NO")
    r.close()

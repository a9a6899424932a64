"""The command sequence Thunderbird sends (docs/design/imap.md, "What Thunderbird sends"),
over three parallel connections, with mail arriving through SMTP while one connection idles."""
from __future__ import annotations

import base64
import re
import smtplib
import time

from tests.harness import MailServer
from tests.scenario.imapraw import PASSWORD, Raw, tagged

HEADER_FIELDS = (b"From To Cc Bcc Subject Date Message-ID Priority X-Priority References Newsgroups "
                 b"In-Reply-To Content-Type Reply-To Received")


def _tb_login(server: MailServer) -> Raw:
    r = Raw(server, tls=False, login_as=None)
    assert b"STARTTLS" in r.greeting
    assert tagged(r.cmd(b"1 STARTTLS")).startswith(b"1 OK")
    r.sock = server.ssl_context().wrap_socket(r.sock)
    caps = r.cmd(b"2 CAPABILITY")[0]
    assert b"AUTH=PLAIN" in caps
    r.send(b"3 AUTHENTICATE PLAIN\r\n")
    assert r.line().startswith(b"+")
    r.send(base64.b64encode(b"\0alice@example.org\0" + PASSWORD.encode()) + b"\r\n")
    assert tagged(r.response(b"3")).startswith(b"3 OK")
    return r


def test_thunderbird_session(make_server):
    server: MailServer = make_server(listeners=["mx", "imap"])
    server.add_user("alice@example.org", PASSWORD)
    body = "".join(f"line {i} of a message larger than Thunderbird's chunk threshold\r\n"
                   for i in range(600))
    with smtplib.SMTP("127.0.0.1", server.ports["mx"]) as s:
        for i in range(3):
            s.sendmail("friend@remote.example", ["alice@example.org"],
                       (f"From: Friend <friend@remote.example>\r\nTo: alice@example.org\r\n"
                        f"Subject: message {i}\r\nMessage-ID: <m{i}@remote.example>\r\n"
                        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}").encode())
    assert len(server.wait_for_messages("alice@example.org", 3)) == 3

    main = _tb_login(server)
    assert main.cmd(b"4 NAMESPACE")[0].startswith(b"* NAMESPACE")
    assert tagged(main.cmd(b'5 ID ("name" "Thunderbird" "version" "153.0")')).startswith(b"5 OK")
    resp = main.cmd(b'6 LIST (SUBSCRIBED) "" "*" RETURN (SPECIAL-USE)')
    uses = {re.search(rb'"([^"]+)"$', line).group(1): line for line in resp[:-1]}
    for name, attr in ((b"Sent", b"\\Sent"), (b"Drafts", b"\\Drafts"), (b"Trash", b"\\Trash")):
        assert attr in uses[name]
    assert main.cmd(b'7 LIST "" "INBOX"')[0].endswith(b'"INBOX"')
    resp = main.cmd(b"8 SELECT INBOX")
    assert b"* 3 EXISTS" in resp
    resp = main.cmd(b"9 UID FETCH 1:* (FLAGS)")
    assert len(resp) == 4
    resp = main.cmd(b"10 UID FETCH 1:3 (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS (" + HEADER_FIELDS + b")])")
    assert len(resp) == 4 and all(b"Subject: message" in line for line in resp[:-1])
    sizes = [int(re.search(rb"RFC822.SIZE (\d+)", line).group(1)) for line in resp[:-1]]
    # Offline sync: the first message in 10240-byte chunks, as fetch_by_chunks does.
    data, offset = b"", 0
    while offset < sizes[0]:
        resp = main.cmd(b"c%d UID FETCH 1 (UID RFC822.SIZE BODY.PEEK[]<%d.10240>)" % (offset, offset))
        m = re.search(rb"BODY\[\]<%d> \{(\d+)\}\r\n" % offset, resp[0])
        assert m, resp[0][:200]
        data += resp[0][m.end():m.end() + int(m.group(1))]
        offset += int(m.group(1))
    assert data == open(server.messages("alice@example.org")[0], "rb").read()
    assert tagged(main.cmd(b"11 UID STORE 1 +Flags (\\Seen)")).startswith(b"11 OK")

    # Second connection: the Sent copy via LITERAL+, found again by Message-ID.
    second = _tb_login(server)
    sent = b"From: alice@example.org\r\nTo: friend@remote.example\r\nSubject: reply\r\n" \
           b"Message-ID: <reply1@example.org>\r\n\r\nthanks\r\n"
    resp = second.cmd(b'20 APPEND "Sent" (\\Seen) {%d+}\r\n' % len(sent) + sent)
    assert tagged(resp).startswith(b"20 OK [APPENDUID")
    second.cmd(b'21 SELECT "Sent"')
    resp = second.cmd(b"22 UID SEARCH HEADER Message-ID <reply1@example.org>")
    assert resp[0] == b"* SEARCH 1"
    resp = second.cmd(b"23 UID STORE 1 +FLAGS ($Forwarded)")
    assert b"$Forwarded" in resp[0]

    # Third connection idles on INBOX; new mail shows up while the first sees the \Seen flag.
    third = _tb_login(server)
    third.cmd(b"30 SELECT INBOX")
    third.send(b"31 IDLE\r\n")
    assert third.line().startswith(b"+")
    with smtplib.SMTP("127.0.0.1", server.ports["mx"]) as s:
        s.sendmail("friend@remote.example", ["alice@example.org"], b"Subject: late\r\n\r\nlate\r\n")
    t = time.monotonic()
    third.sock.settimeout(5)
    assert third.line() == b"* 4 EXISTS"
    assert time.monotonic() - t < 3
    third.send(b"DONE\r\n")
    assert tagged(third.response(b"31")).startswith(b"31 OK")
    resp = main.cmd(b"12 NOOP")
    assert b"* 4 EXISTS" in resp
    for conn, tag in ((main, b"13"), (second, b"24"), (third, b"32")):
        resp = conn.cmd(tag + b" LOGOUT")
        assert resp[0].startswith(b"* BYE") and tagged(resp).startswith(tag + b" OK")
        conn.close()

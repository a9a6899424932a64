"""Outbound delivery end to end: a real mailsuite process, a real DNS server on loopback, and a
scripted SMTP sink standing in for the remote MTAs (tests/dnsserver.py, SinkServer below).

The sink decides by recipient local part: `reject*` -> 550 5.1.1, `later*` -> 451 to RCPT the
first time then 250, `dlater*` -> 451 after DATA the first time then 250, anything else 250.
Retries are shortened to 1 s. Every wait polls with a deadline (tests/polling.py).
"""
from __future__ import annotations

import email
import email.policy
import os
import re
import smtplib
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field

import pytest

from mailsuite.queue.spool import Spool
from tests.dnsserver import DNSServer
from tests.harness import MailServer, free_port
from tests.polling import wait_until

PASSWORD = "secret-pw-1"


# -- the scripted sink ---------------------------------------------------------------------------

@dataclass
class SinkMessage:
    sender: str
    recipients: list[str]
    data: bytes  # dot-unstuffed, as the receiver would store it
    wire: bytes  # exactly what came after the 354, terminator included
    mail_command: str


@dataclass
class SinkState:
    messages: list[SinkMessage] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)  # RCPT address -> times asked
    connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class SinkServer:
    """A tiny threaded SMTP server on loopback with scripted replies (no TLS)."""

    def __init__(self, port: int | None = None, extensions: tuple[str, ...] = (
            "PIPELINING", "SIZE 50000000", "8BITMIME", "ENHANCEDSTATUSCODES")):
        self.state = SinkState()
        state = self.state
        exts = extensions

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                with state.lock:
                    state.connections += 1
                out = self.wfile
                out.write(b"220 sink.test ESMTP scripted sink\r\n")
                sender, rcpts = "", []
                while True:
                    line = self.rfile.readline(4096)
                    if not line:
                        return
                    cmd = line.decode("utf-8", "replace").rstrip("\r\n")
                    with state.lock:
                        state.commands.append(cmd)
                    verb = cmd[:4].upper()
                    if verb == "EHLO":
                        lines = ["sink.test"] + list(exts)
                        out.write("".join(f"250{'-' if i < len(lines) - 1 else ' '}{l}\r\n"
                                          for i, l in enumerate(lines)).encode())
                    elif verb == "HELO":
                        out.write(b"250 sink.test\r\n")
                    elif verb == "MAIL":
                        m = re.match(r"MAIL FROM:<([^>]*)>", cmd, re.I)
                        sender, rcpts, mail_cmd = (m.group(1) if m else ""), [], cmd
                        out.write(b"250 2.1.0 ok\r\n")
                    elif verb == "RCPT":
                        m = re.match(r"RCPT TO:<([^>]*)>", cmd, re.I)
                        addr = m.group(1) if m else ""
                        with state.lock:
                            state.seen[addr] = state.seen.get(addr, 0) + 1
                            times = state.seen[addr]
                        local = addr.partition("@")[0]
                        if local.startswith("reject"):
                            out.write(b"550 5.1.1 <" + addr.encode() + b">: no such user here\r\n")
                        elif local.startswith("later") and times == 1:
                            out.write(b"451 4.2.0 greylisted, try again later\r\n")
                        else:
                            rcpts.append(addr)
                            out.write(b"250 2.1.5 ok\r\n")
                    elif verb == "DATA":
                        if not rcpts:
                            out.write(b"503 5.5.1 no valid recipients\r\n")
                            continue
                        out.write(b"354 go ahead\r\n")
                        wire, data = [], []
                        while True:
                            l = self.rfile.readline(1 << 20)
                            if not l:
                                return
                            wire.append(l)
                            if l == b".\r\n":
                                break
                            data.append(l[1:] if l.startswith(b".") else l)
                        key = "DATA " + ",".join(rcpts)
                        with state.lock:
                            state.seen[key] = state.seen.get(key, 0) + 1
                            first = state.seen[key] == 1
                        if first and any(r.startswith("dlater") for r in rcpts):
                            out.write(b"451 4.3.0 queue file write error, try again\r\n")
                            continue
                        with state.lock:
                            state.messages.append(SinkMessage(sender, rcpts, b"".join(data),
                                                              b"".join(wire), mail_cmd))
                        out.write(b"250 2.0.0 queued as sink\r\n")
                    elif verb == "RSET":
                        sender, rcpts = "", []
                        out.write(b"250 2.0.0 ok\r\n")
                    elif verb == "NOOP":
                        out.write(b"250 2.0.0 ok\r\n")
                    elif verb == "QUIT":
                        out.write(b"221 2.0.0 bye\r\n")
                        return
                    else:
                        out.write(b"502 5.5.2 not implemented\r\n")

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = Server(("127.0.0.1", port or 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "SinkServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait(self, predicate, timeout: float = 20.0) -> list[SinkMessage]:
        def found() -> list[SinkMessage]:
            with self.state.lock:
                return [m for m in self.state.messages if predicate(m)]
        return poll(found, timeout, interval=0.05) or []

    def for_recipient(self, address: str, timeout: float = 20.0) -> list[SinkMessage]:
        return self.wait(lambda m: address in m.recipients, timeout)


# -- helpers -------------------------------------------------------------------------------------

def zone(domain: str, mx_address: str = "127.0.0.1") -> list[tuple[str, str, str]]:
    return [(domain, "MX", f"10 mx.{domain}"), (f"mx.{domain}", "A", mx_address)]


def submit(server: MailServer, sender: str, recipients: list[str], message: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as s:
        s.starttls(context=server.ssl_context())
        s.login(sender, PASSWORD)
        s.sendmail(sender, recipients, message)


def make_message(sender: str, to: str, subject: str, body: str = "Hello.\r\n") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{time.time_ns()}@test>\r\nDate: Sat, 28 Nov 2026 01:00:00 +0000\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}"
            ).encode()


def read_message(path: str) -> email.message.EmailMessage:
    with open(path, "rb") as f:
        return email.message_from_binary_file(f, policy=email.policy.default)


def dsn_fields(message: email.message.EmailMessage) -> tuple[list, list]:
    """(per-message fields, per-recipient field blocks) of a multipart/report DSN."""
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    status_part = next(p for p in message.walk()
                       if p.get_content_type() == "message/delivery-status")
    blocks = status_part.get_payload()
    return blocks[0], blocks[1:]


def wait_for_dsn(server: MailServer, address: str, subject_word: str, timeout: float = 20.0,
                 action: str = "failed") -> email.message.EmailMessage | None:
    """The first DSN in `address`'s INBOX that mentions `subject_word` and reports `action`."""
    def find() -> email.message.EmailMessage | None:
        for path in server.messages(address):
            message = read_message(path)
            if message.get_content_type() == "multipart/report" and \
                    subject_word in str(message["Subject"]) + str(message.get_payload(0)) and \
                    all(b["Action"] == action for b in dsn_fields(message)[1]):
                return message
        return None
    return poll(find, timeout)


def queue_is_empty(server: MailServer, timeout: float = 20.0) -> bool:
    return bool(poll(lambda: not queue_envelopes(server), timeout))


def queue_envelopes(server: MailServer) -> list:
    return Spool(os.path.join(server.data_dir, "queue")).entries()


def poll(condition, timeout: float, interval: float = 0.1):
    """wait_until, but None instead of an AssertionError at the deadline (for callers that
    assert on the value with a message of their own)."""
    try:
        return wait_until(condition, timeout=timeout, interval=interval)
    except AssertionError:
        return None


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One mailsuite (a.test) whose remote deliveries go to the sink on every MX."""
    base = str(tmp_path_factory.mktemp("outbound"))
    with SinkServer() as sink:
        zones = {d: zone(d) for d in ("a.test", "sink.test", "other.test")}
        zones["dead.test"] = zone("dead.test", "127.0.0.2")  # nobody listens there
        zones["nullmx.test"] = [("nullmx.test", "MX", "0 .")]
        with DNSServer(zones, servfail=["broken.test"]) as dns:
            server = MailServer(os.path.join(base, "a"), hostname="mx.a.test",
                                listeners=["mx", "submission"], extra={
                "courier": {"nameservers": [dns.nameserver], "mx_port": sink.port,
                            "connect_timeout": 2, "command_timeout": 10},
                "queue": {"retry_schedule": [1], "max_age": 6, "delay_warning": 2,
                          "scan_interval": 1.0},
            })
            server.start()
            try:
                server.add_user("alice@a.test")
                yield server, sink, dns
            finally:
                server.stop()


# -- tests ---------------------------------------------------------------------------------------

def test_delivers_to_the_mx_of_the_domain(world):
    server, sink, _ = world
    submit(server, "alice@a.test", ["bob@sink.test"],
           make_message("alice@a.test", "bob@sink.test", "plain delivery"))
    [got] = sink.for_recipient("bob@sink.test")
    assert got.sender == "alice@a.test"
    assert b"Subject: plain delivery" in got.data
    assert got.data.startswith(b"Received: ")
    assert "SIZE=" in got.mail_command  # the sink offers SIZE (RFC 1870)
    assert queue_is_empty(server)
    # The mail log's transaction line: queue_id=... domain=... relay=host[address]:port tls=...
    assert re.search(r"queue_id=\w+ domain=sink\.test relay=mx\.sink\.test\[127\.0\.0\.1\]:\d+ "
                     r"tls=no", server.log_text())


def test_rejected_recipient_bounces_with_dsn(world):
    server, sink, _ = world
    submit(server, "alice@a.test", ["reject-1@sink.test"],
           make_message("alice@a.test", "reject-1@sink.test", "to be rejected"))
    dsn = wait_for_dsn(server, "alice@a.test", "reject-1@sink.test")
    assert dsn is not None, server.log_text()[-3000:]
    assert dsn["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.a.test"
    assert dsn["Auto-Submitted"] == "auto-replied"
    per_message, [rcpt] = dsn_fields(dsn)
    assert per_message["Reporting-MTA"] == "dns; mx.a.test"
    assert rcpt["Final-Recipient"] == "rfc822; reject-1@sink.test"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.1.1"
    assert rcpt["Remote-MTA"] == "dns; mx.sink.test"
    assert rcpt["Diagnostic-Code"].startswith("smtp; 550 5.1.1 <reject-1@sink.test>")
    headers = next(p for p in dsn.walk() if p.get_content_type() == "text/rfc822-headers")
    assert b"Subject: to be rejected" in headers.get_payload(decode=True)
    assert dsn["Return-Path"] == "<>"  # the DSN itself came from <> (RFC 3464 §2)
    assert queue_is_empty(server)


def test_tempfail_then_delivered_on_retry(world):
    server, sink, _ = world
    submit(server, "alice@a.test", ["later-1@sink.test"],
           make_message("alice@a.test", "later-1@sink.test", "greylisted"))
    got = sink.for_recipient("later-1@sink.test", timeout=20)
    assert len(got) == 1, server.log_text()[-3000:]
    assert sink.state.seen["later-1@sink.test"] == 2  # 451 once, 250 on the retry
    assert queue_is_empty(server)


def test_tempfail_after_data_then_delivered_once(world):
    server, sink, _ = world
    submit(server, "alice@a.test", ["dlater-1@sink.test", "dlater-2@sink.test"],
           make_message("alice@a.test", "dlater-1@sink.test", "451 after data"))
    got = sink.for_recipient("dlater-1@sink.test", timeout=20)
    assert len(got) == 1 and got[0].recipients == ["dlater-1@sink.test", "dlater-2@sink.test"]
    assert sink.state.seen["DATA dlater-1@sink.test,dlater-2@sink.test"] == 2
    assert queue_is_empty(server)


def test_partial_acceptance_delivers_accepted_once_and_bounces_the_rest(world):
    server, sink, _ = world
    rcpts = ["ok-p1@sink.test", "reject-p2@sink.test", "ok-p3@sink.test"]
    submit(server, "alice@a.test", rcpts,
           make_message("alice@a.test", ", ".join(rcpts), "partial acceptance"))
    [got] = sink.wait(lambda m: "ok-p1@sink.test" in m.recipients)
    assert got.recipients == ["ok-p1@sink.test", "ok-p3@sink.test"]  # one transaction
    dsn = wait_for_dsn(server, "alice@a.test", "reject-p2@sink.test")
    assert dsn is not None
    _, blocks = dsn_fields(dsn)
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; reject-p2@sink.test"]
    assert queue_is_empty(server)  # the entry is gone: no retry can come after this
    assert len(sink.wait(lambda m: "ok-p1@sink.test" in m.recipients)) == 1


def test_dot_stuffing_is_byte_exact(world):
    """Lines of "." at the very start of the body, at 16 KiB boundaries (where Twisted's client
    forgets to stuff: docs/design/courier.md), and "." lines that look like an end of data."""
    server, sink, _ = world
    header = make_message("alice@a.test", "dots@sink.test", "dots", body="")
    # Put "." lines at many positions so that some fall on every chunk boundary whatever the
    # length of the headers added in transit (Received, DKIM-Signature).
    chunks = [header + b".\r\n"]
    size = len(chunks[0])
    i = 0
    while size < 70000:
        piece = b"." * (i % 3 + 1) + b"\r\n" if i % 7 == 0 else b"y" * (i % 90) + b"\r\n"
        chunks.append(piece)
        size += len(piece)
        i += 1
    chunks.append(b".\r\nlast line\r\n.")  # also: no final CRLF after a lone "."
    message = b"".join(chunks)
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as s:
        s.starttls(context=server.ssl_context())
        s.login("alice@a.test", PASSWORD)
        s.sendmail("alice@a.test", ["dots@sink.test"], message)
    [got] = sink.for_recipient("dots@sink.test")
    # What arrived is the original message (smtplib adds the final CRLF) after our Received.
    received_end = got.data.index(b"From: alice@a.test")
    assert got.data[received_end:] == message + b"\r\n"
    assert got.wire.count(b"\r\n.\r\n") == 1 and got.wire.endswith(b"\r\n.\r\n")


def test_null_mx_bounces_at_once(world):
    server, sink, _ = world
    submit(server, "alice@a.test", ["someone@nullmx.test"],
           make_message("alice@a.test", "someone@nullmx.test", "null mx"))
    dsn = wait_for_dsn(server, "alice@a.test", "someone@nullmx.test", timeout=10)
    assert dsn is not None, server.log_text()[-3000:]
    _, [rcpt] = dsn_fields(dsn)
    assert rcpt["Status"] == "5.1.10"
    assert rcpt["Action"] == "failed"


def test_nonexistent_domain_bounces(world):
    server, _, _ = world
    submit(server, "alice@a.test", ["someone@nxdomain.test"],
           make_message("alice@a.test", "someone@nxdomain.test", "nxdomain"))
    dsn = wait_for_dsn(server, "alice@a.test", "someone@nxdomain.test", timeout=10)
    assert dsn is not None
    _, [rcpt] = dsn_fields(dsn)
    assert rcpt["Status"] == "5.1.2"


def test_unreachable_is_deferred_then_bounced_after_max_age(world):
    server, sink, _ = world
    start = time.monotonic()
    submit(server, "alice@a.test", ["someone@dead.test"],
           make_message("alice@a.test", "someone@dead.test", "unreachable"))
    # Deferred first: the entry stays queued with the connection error recorded.
    wait_until(lambda: any(r.address == "someone@dead.test" and r.attempts >= 1
                           and r.state == "pending"
                           for e in queue_envelopes(server) for r in e.recipients),
               timeout=10, message="a deferred attempt to someone@dead.test")
    listing = server.admin("queue", "list").stdout
    assert "someone@dead.test" in listing, listing
    # A delay warning first (delay_warning = 2 s here), then the bounce at max_age (6 s).
    warning = wait_for_dsn(server, "alice@a.test", "someone@dead.test", timeout=20,
                           action="delayed")
    assert warning is not None, server.log_text()[-3000:]
    assert "Delayed" in warning["Subject"]
    _, [block] = dsn_fields(warning)
    assert block["Status"].startswith("4.4.") and block["Will-Retry-Until"]
    dsn = wait_for_dsn(server, "alice@a.test", "someone@dead.test", timeout=20)
    assert dsn is not None, server.log_text()[-3000:]
    assert time.monotonic() - start >= 5  # max_age is 6 s in this configuration
    _, [rcpt] = dsn_fields(dsn)
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"].startswith("4.4.")  # the last error: no answer from the host
    assert queue_is_empty(server)


def test_dns_servfail_defers(world):
    server, sink, _ = world
    submit(server, "alice@a.test", ["someone@broken.test"],
           make_message("alice@a.test", "someone@broken.test", "servfail"))
    wait_until(lambda: any(r.address == "someone@broken.test" and "4.4.3" in r.last_error
                           for e in queue_envelopes(server) for r in e.recipients),
               timeout=10, message="a 4.4.3 deferral for someone@broken.test")
    listing = server.admin("queue", "list").stdout
    assert "someone@broken.test" in listing and "4.4.3" in listing, listing


def test_connection_is_reused_for_queued_messages(world):
    server, sink, _ = world
    before = sink.state.connections
    for i in range(3):
        submit(server, "alice@a.test", [f"reuse{i}@other.test"],
               make_message("alice@a.test", f"reuse{i}@other.test", f"reuse {i}"))
        sink.for_recipient(f"reuse{i}@other.test")
    assert sink.state.connections - before == 1
    assert "reused=yes" in server.log_text()


def test_no_bounce_for_a_bounce(world):
    """A message from <> that cannot be delivered is dropped with a log line, never bounced
    (RFC 5321 §6.1): here a DSN-like message forwarded by an alias to a refusing host."""
    server, sink, _ = world
    server.admin("alias", "add", "fwd@a.test", "reject-fwd@sink.test")
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as s:
        s.sendmail("", ["fwd@a.test"], make_message("MAILER-DAEMON@elsewhere.test",
                                                    "fwd@a.test", "bounce of a bounce"))
    # The queue is empty, so a DSN (queued before its entry is removed) would be delivered by now.
    assert queue_is_empty(server)
    assert sink.state.seen.get("reject-fwd@sink.test") == 1
    assert wait_for_dsn(server, "alice@a.test", "reject-fwd@sink.test", timeout=0) is None
    assert "no bounce" in server.log_text()
    assert re.search(r"queue_id=\w+ status=dsn-skipped action=failed "
                     r'detail="no bounce for the null sender <>"', server.log_text())


def test_dkim_signed_message_verifies(world):
    """A domain with keys (Ed25519 and RSA) signs; dkimpy verifies both against the test DNS."""
    import dkim

    server, sink, dns = world
    server.add_user("carol@signed.test")
    out = server.admin("dkim", "generate", "signed.test", "--selector", "t1").stdout
    records = re.findall(r'^(\S+)\. IN TXT ((?:"[^"]*" ?)+)$', out, re.M)
    assert [name for name, _ in records] == ["t1-ed._domainkey.signed.test",
                                            "t1-rsa._domainkey.signed.test"]
    base = {d: zone(d) for d in ("a.test", "sink.test", "other.test")}
    base["dead.test"] = zone("dead.test", "127.0.0.2")
    base["nullmx.test"] = [("nullmx.test", "MX", "0 .")]
    base["dkim"] = [(name, "TXT", "".join(re.findall(r'"([^"]*)"', value)))
                    for name, value in records]
    dns.update(base, servfail=["broken.test"])
    key_path = os.path.join(server.data_dir, "dkim", "signed.test", "t1-rsa.private")
    assert os.stat(key_path).st_mode & 0o777 == 0o600

    submit(server, "carol@signed.test", ["dkim@sink.test"],
           make_message("Carol <carol@signed.test>", "dkim@sink.test", "signed mail",
                        body="Body with a trailing space \r\nand tabs\t\r\n"))
    [got] = sink.for_recipient("dkim@sink.test")
    signatures = re.findall(rb"(?im)^DKIM-Signature:.*?\bd=([^;]+);.*?\bs=([^;]+);",
                            got.data.replace(b"\r\n\t", b" ").replace(b"\r\n ", b" "))
    assert sorted(s for _, s in signatures) == [b"t1-ed", b"t1-rsa"]
    assert b"c=relaxed/relaxed" in got.data.replace(b"\r\n\t", b"").replace(b"\r\n ", b"")
    assert dkim.verify(got.data, dnsfunc=dns.dnsfunc)  # the first signature, as dkim.verify does
    for index in range(2):  # and each of them
        assert dkim.DKIM(got.data).verify(idx=index, dnsfunc=dns.dnsfunc), got.data[:2000]
    # Tampering breaks it: the signatures cover the body and From.
    tampered = got.data.replace(b"Body with", b"Body wiht")
    assert not dkim.verify(tampered, dnsfunc=dns.dnsfunc)


def test_nul_and_bare_line_ends_in_the_spool_are_never_relayed_raw(world):
    """A spool entry written by an older version (before DATA refused or normalised them),
    with a NUL and a bare-LF "." line that a lax receiver would take as end of data: the
    courier relays it with the NUL removed and CRLF line ends, and logs what it changed."""
    from mailsuite.queue.spool import QueueEntry, Recipient, new_queue_id

    server, sink, _ = world
    spool = Spool(os.path.join(server.data_dir, "queue"))
    entry = QueueEntry(new_queue_id(), "alice@a.test",
                       [Recipient("smuggle@sink.test", "smuggle@sink.test", False)], time.time())
    spool.store(entry, b"From: alice@a.test\r\nSubject: old spool\r\n\r\nbefore\0after\n.\n"
                       b"MAIL FROM:<evil@sink.test>\r\nend\r\n")
    spool.kick()
    [got] = sink.for_recipient("smuggle@sink.test")
    assert b"\0" not in got.wire
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", got.wire) is None
    assert got.wire.endswith(b"\r\nend\r\n.\r\n") and got.wire.count(b"\r\n.\r\n") == 1
    assert b"beforeafter\r\n..\r\nMAIL FROM:<evil@sink.test>\r\n" in got.wire
    wait_until(lambda: f"queue_id={entry.id} status=normalised" in server.log_text(),
               timeout=10, message="the normalised line")
    [line] = [text for text in server.log_text().splitlines()
              if f"queue_id={entry.id} status=normalised" in text]
    assert 'detail="1 NUL byte removed, 2 bare CR/LF made CRLF"' in line

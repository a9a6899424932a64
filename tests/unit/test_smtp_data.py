"""DATA: what is queued (Received:, submission headers, metadata), queue failures, disconnects,
SMTPUTF8. In memory, with the fake queue remembering every message."""
from __future__ import annotations

from twisted.internet import defer
from twisted.names import dns

from tests.unit.smtpkit import HOSTNAME, World

LIMITS = {"max_recipients": 3, "max_message_size": 20000}


def send_one(c, sender: bytes, rcpt: bytes, body: bytes) -> list[bytes]:
    c.send(b"MAIL FROM:<" + sender + b">\r\nRCPT TO:<" + rcpt + b">\r\nDATA\r\n")
    assert [c.code() for _ in range(3)] == [250, 250, 354]
    c.send(body + b".\r\n")
    return c.reply()


def test_queue_failure_is_temporary_451_not_550():
    # Stock ESMTP answered every failing eomReceived with a permanent 550.
    world = World(limits=LIMITS, latency=0.05)
    c = world.connect("mx")
    c.ehlo()
    lines = send_one(c, b"x@remote.example", b"alice@example.org",
                     b"Subject: FAIL-THE-QUEUE\r\n\r\nbody\r\n")
    assert lines[0].startswith(b"451 4.3.0")
    # The session goes on: the next transaction works.
    assert send_one(c, b"x@remote.example", b"alice@example.org", b"ok\r\n")[0][:3] == b"250"
    assert len(world.queue.messages) == 1


def test_received_header_is_well_formed():
    # Stock ESMTP's default receivedHeader raised TypeError (every DATA got 550).
    world = World(limits=LIMITS)
    c = world.connect("mx")
    c.ehlo("client.example")
    send_one(c, b"x@remote.example", b"alice@example.org", b"Subject: hi\r\n\r\nbody\r\n")
    (entry,) = world.queue.messages
    first = entry.data.split(b"\r\n\r\n", 1)[0]
    assert first.startswith(b"Received: from client.example (localhost [127.0.0.1])\r\n\tby "
                            + HOSTNAME.encode() + b" (mailsuite) with ESMTP id ")
    assert b"\tfor <alice@example.org>; " in first
    assert entry.data.endswith(b"\r\n\r\nbody\r\n")
    assert entry.meta == {"client_ip": "127.0.0.1", "helo": "client.example",
                          "auth_user": None, "protocol": "ESMTP", "listener": "mx",
                          "message_id": "", "tls": ""}


def test_received_header_names_the_client_from_reverse_dns():
    class Resolver:
        def lookupPointer(self, name, timeout=None):
            assert name == "5.113.0.203.in-addr.arpa"
            record = dns.RRHeader(name=name, type=dns.PTR,
                                  payload=dns.Record_PTR("client.remote.example"))
            return defer.succeed(([record], [], []))

    world = World(limits=LIMITS)
    factory = world.factories["mx"]
    factory.resolver = Resolver()
    c = world.connect("mx", ip="203.0.113.5")
    c.ehlo("helo.example")
    send_one(c, b"x@remote.example", b"alice@example.org", b"Subject: hi\r\n\r\nbody\r\n")
    assert world.queue.messages[0].data.startswith(
        b"Received: from helo.example (client.remote.example [203.0.113.5])\r\n")


def test_several_recipients_are_not_named_in_received():
    world = World(limits=LIMITS)
    c = world.connect("mx")
    c.ehlo()
    c.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
           b"DATA\r\nhi\r\n.\r\n")
    assert [c.code() for _ in range(5)] == [250, 250, 250, 354, 250]
    header = world.queue.messages[0].data.split(b"\r\n\thi", 1)[0]
    assert b"for <" not in header


def test_submission_adds_message_id_and_date_and_marks_esmtpsa():
    world = World(limits=LIMITS)
    c = world.connect("submission")
    c.ehlo("laptop")
    c.send(b"STARTTLS\r\n")
    assert c.code() == 220
    c.start_tls()
    c.send(b"EHLO laptop\r\nAUTH PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHNlY3JldC1wdy0x\r\n")
    assert [c.code() for _ in range(2)] == [250, 235]
    send_one(c, b"alice@example.org", b"someone@elsewhere.example", b"Subject: hi\r\n\r\nb\r\n")
    send_one(c, b"alice@example.org", b"bob@example.org",
             b"Message-ID: <mine@x>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nb\r\n")
    first, second = world.queue.messages
    assert b"with ESMTPSA id" in first.data
    headers = first.data.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nMessage-ID: <" in headers and b"\r\nDate: " in headers
    assert first.meta["auth_user"] == "alice@example.org"
    assert second.data.count(b"Message-ID:") == 1 and second.data.count(b"Date:") == 1
    # The remote recipient is queued with its route: the courier takes it from there.
    assert first.recipients[0][1].hosted is False


def test_dot_stuffed_lines_are_unstuffed():
    world = World(limits=LIMITS)
    c = world.connect("mx")
    c.ehlo()
    send_one(c, b"x@remote.example", b"alice@example.org", b"Subject: d\r\n\r\n..x\r\n...\r\n")
    assert world.queue.messages[0].data.endswith(b"\r\n\r\n.x\r\n..\r\n")


def test_disconnect_mid_data_queues_nothing():
    world = World(limits=LIMITS)
    c = world.connect("mx")
    c.ehlo()
    c.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert [c.code() for _ in range(3)] == [250, 250, 354]
    c.send(b"Subject: half\r\n\r\nsome of the body\r\n")
    c.disconnect()
    c.wait(1)
    assert world.queue.messages == []


def test_utf8_address_needs_smtputf8():
    world = World(limits=LIMITS)
    c = world.connect("mx")
    lines = c.ehlo()
    assert b"250-SMTPUTF8" in lines
    c.send("MAIL FROM:<jörg@remote.example>\r\n".encode())
    assert c.reply()[0].startswith(b"553 5.6.7")
    c.send("MAIL FROM:<jörg@remote.example> SMTPUTF8\r\n".encode())
    assert c.code() == 250
    c.send("RCPT TO:<alice@example.org>\r\nDATA\r\n".encode())
    assert [c.code() for _ in range(2)] == [250, 354]
    c.send("Subject: grüße\r\n\r\nhi\r\n.\r\n".encode())
    assert c.code() == 250
    (entry,) = world.queue.messages
    assert entry.sender == "jörg@remote.example"


def test_too_many_recipients_is_temporary_452():
    world = World(limits=LIMITS)
    c = world.connect("mx")
    c.ehlo()
    c.send(b"MAIL FROM:<>\r\n" + b"RCPT TO:<alice@example.org>\r\n" * 4)
    codes = [c.reply()[0][:9] for _ in range(5)]
    assert codes == [b"250 2.1.0"] + [b"250 2.1.5"] * 3 + [b"452 4.5.3"]


def test_the_message_date_is_formatdates_text_made_once_per_second(monkeypatch):
    import email.utils

    from mailsuite.smtp import data as data_module

    calls: list[float] = []
    real = email.utils.formatdate

    def counting(timeval=None, localtime=False, usegmt=False):
        calls.append(timeval)
        return real(timeval, localtime, usegmt)

    monkeypatch.setattr(email.utils, "formatdate", counting)
    monkeypatch.setattr(data_module, "_date_cache", [None, ""])
    base = 1_790_000_000
    for when in (base + 0.1, base + 0.9, base + 1.0, base + 1.5, base - 86400.2):
        assert data_module.message_date(when) == real(when, localtime=True)
    assert len(calls) == 3  # one per distinct second


PLAIN_FROM = [b"Alice <alice@example.org>", b"alice@example.org", b"<alice@example.org>",
              b"Alice Smith<a.b+tag@mail-1.example.org>", b"0 <x!#$%&'*+/=?^_`{|}~-@b.example>",
              b"Alice <ALICE@Example.ORG>"]
OTHER_FROM = [b"J. Smith <a@b.example>", b'"Smith, J" <a@b.example>', b"a@b.example (me)",
              b"=?utf-8?q?Al=C3=AFce?= <a@b.example>", b"a@b.example, c@d.example",
              b"team: a@b.example;", b"a..b@c.example", b"a@localhost", b"a@-b.example",
              b"Alice <a@b.example", b"<a@b.example> trailing"]


def test_a_plain_from_is_read_without_the_email_package_as_the_email_package_reads_it(
        monkeypatch):
    from email.headerregistry import HeaderRegistry

    from mailsuite.smtp.headers import header_addresses

    expected = {raw: header_addresses(raw) for raw in PLAIN_FROM + OTHER_FROM}
    assert all(expected[raw] is not None and len(expected[raw]) == 1 for raw in PLAIN_FROM)
    factory = HeaderRegistry.__call__
    parsed: list[str] = []

    def counting(self, name, value):
        parsed.append(value)
        return factory(self, name, value)

    monkeypatch.setattr(HeaderRegistry, "__call__", counting)
    for raw in PLAIN_FROM + OTHER_FROM:
        assert header_addresses(raw) == expected[raw], raw
    assert len(parsed) == len(OTHER_FROM)  # the plain ones never reached the parser

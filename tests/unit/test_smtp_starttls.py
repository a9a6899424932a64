"""STARTTLS (RFC 3207): what was pipelined after it is discarded, and everything learnt before
it is forgotten (RFC 3207 §4.2, CVE-2011-0411)."""
from __future__ import annotations

from tests.unit.smtpkit import FakeTLS, World


def test_starttls_hands_the_context_to_the_transport_and_resets_the_session():
    world = World()
    c = world.connect("submission")
    lines = c.ehlo()
    assert b"250-STARTTLS" in lines and not any(b"AUTH" in l for l in lines)
    c.send(b"STARTTLS\r\n")
    assert c.reply()[0].startswith(b"220 2.0.0")
    assert c.transport.tls_context is FakeTLS.context
    c.send(b"MAIL FROM:<alice@example.org>\r\n")
    assert c.reply()[0].startswith(b"503 5.5.1")  # EHLO again first
    c.send(b"EHLO client.example\r\n")
    lines = c.reply()
    assert b"250-AUTH PLAIN LOGIN" in lines and not any(b"STARTTLS" in l for l in lines)
    c.send(b"STARTTLS\r\n")
    assert c.reply()[0].startswith(b"503 5.5.1")


def test_pipelined_commands_after_starttls_are_discarded():
    world = World()
    c = world.connect("submission")
    c.ehlo()
    c.send(b"STARTTLS\r\nAUTH PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHNlY3JldC1wdy0x\r\n"
           b"MAIL FROM:<alice@example.org>\r\n")
    assert c.code() == 220
    c.nothing_within(1)
    assert world.directory.calls == []  # the injected AUTH never reached the directory


def test_starttls_needs_ehlo_first_and_no_argument():
    c = World().connect("mx")
    c.reply()
    c.send(b"STARTTLS\r\n")
    assert c.reply()[0].startswith(b"503 5.5.1")
    c.send(b"EHLO client.example\r\nSTARTTLS now\r\n")
    c.reply()
    assert c.reply()[0].startswith(b"501 5.5.4")


def test_without_a_certificate_starttls_is_not_available():
    world = World(tls=False)
    c = world.connect("mx")
    c.ehlo()
    c.send(b"STARTTLS\r\n")
    assert c.reply()[0].startswith(b"454 4.7.0")
    assert c.transport.tls_context is None

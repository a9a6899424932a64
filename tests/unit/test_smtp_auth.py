"""SMTP AUTH (RFC 4954): offered only where the policy says, failures held back by the
directory's one LoginThrottle (shared with IMAP and POP3), the connection closed after
max_auth_failures. In memory: the clock proves the delays, nobody sleeps."""
from __future__ import annotations

import base64

from tests.unit.smtpkit import World

LIMITS = {"auth_failure_delay": 0.05, "max_auth_failures": 3}


def plain(user: str, password: str, authzid: str = "") -> bytes:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


def test_implicit_tls_submission_offers_auth_and_no_starttls():
    c = World(limits=LIMITS).connect("submissions")
    lines = c.ehlo()
    assert b"250-AUTH PLAIN LOGIN" in lines and not any(b"STARTTLS" in l for l in lines)


def test_auth_failures_are_delayed_and_close_the_connection():
    world = World(limits=LIMITS)
    c = world.connect("submissions")
    c.ehlo()
    started = world.clock.seconds()
    for n in range(1, 3):
        c.send(b"AUTH PLAIN " + plain("alice@example.org", "wrong") + b"\r\n")
        # The throttle holds the answer back by delay * recent failures: nothing before that.
        c.nothing_within(0.05 * n - 0.01)
        assert c.reply()[0].startswith(b"535 5.7.8")
    c.send(b"AUTH PLAIN " + plain("alice@example.org", "wrong") + b"\r\n")
    assert c.code() == 535
    assert c.reply()[0].startswith(b"421 4.7.0")
    assert c.closed()
    # 0.05 + 0.10 + 0.15 s at least: stock ESMTP answered at once, unthrottled.
    assert world.clock.seconds() - started >= 0.3
    assert world.directory.throttle.failures("127.0.0.1") == 3


def test_failures_go_through_the_directory_with_the_client_address():
    world = World(limits=LIMITS)
    c = world.connect("submissions", ip="198.51.100.7")
    c.ehlo()
    c.send(b"AUTH PLAIN " + plain("bob@example.org", "nope") + b"\r\n")
    assert c.code() == 535
    assert ("authenticate", ("bob@example.org", "198.51.100.7")) in world.directory.calls
    assert world.directory.throttle.failures("198.51.100.7") == 1


def test_throttle_is_per_client_address_across_connections():
    # A guesser that reconnects is slowed down as much as one that stays.
    world = World(limits=LIMITS)
    for _ in range(2):
        c = world.connect("submissions", ip="198.51.100.8")
        c.ehlo()
        c.send(b"AUTH PLAIN " + plain("alice@example.org", "wrong") + b"\r\n")
        assert c.code() == 535
        c.disconnect()
    c = world.connect("submissions", ip="198.51.100.8")
    c.ehlo()
    c.send(b"AUTH PLAIN " + plain("alice@example.org", "wrong") + b"\r\n")
    c.nothing_within(0.14)  # the third failure from this address waits 0.15 s
    assert c.code() == 535
    # Another client is not affected.
    other = world.connect("submissions", ip="198.51.100.9")
    other.ehlo()
    other.send(b"AUTH PLAIN " + plain("alice@example.org", "wrong") + b"\r\n")
    other.nothing_within(0.04)
    assert other.code() == 535


def test_failures_refused_before_the_directory_count_in_its_throttle():
    # An authorization identity other than the user is refused by us; it still counts.
    world = World(limits=LIMITS)
    c = world.connect("submissions")
    c.ehlo()
    c.send(b"AUTH PLAIN " + plain("alice@example.org", "secret-pw-1", "bob@example.org")
           + b"\r\n")
    c.nothing_within(0.04)
    assert c.reply()[0].startswith(b"535 5.7.8")
    assert world.directory.throttle.failures("127.0.0.1") == 1
    assert not any(name == "authenticate" for name, _ in world.directory.calls)


def test_success_resets_the_throttle_and_records_the_user():
    world = World(limits=LIMITS)
    c = world.connect("submissions")
    c.ehlo()
    c.send(b"AUTH PLAIN " + plain("alice@example.org", "wrong") + b"\r\n")
    assert c.code() == 535
    c.send(b"AUTH LOGIN " + base64.b64encode(b"alice@example.org") + b"\r\n")
    assert c.reply()[0] == b"334 UGFzc3dvcmQ6"
    c.send(base64.b64encode(b"secret-pw-1") + b"\r\n")
    assert c.reply()[0].startswith(b"235 2.7.0")
    assert world.directory.throttle.failures("127.0.0.1") == 0
    c.send(b"MAIL FROM:<alice@example.org>\r\n")
    assert c.code() == 250


def test_directory_outage_is_a_temporary_454():
    world = World(limits=LIMITS)
    world.directory.unavailable = True
    c = world.connect("submissions")
    c.ehlo()
    c.send(b"AUTH PLAIN " + plain("alice@example.org", "secret-pw-1") + b"\r\n")
    assert c.reply()[0].startswith(b"454 4.7.0")
    c.send(b"NOOP\r\n")
    assert c.code() == 250


def test_mx_never_offers_nor_accepts_auth():
    world = World(limits=LIMITS)
    c = world.connect("mx")
    lines = c.ehlo()
    assert not any(b"AUTH" in l for l in lines)
    c.send(b"STARTTLS\r\n")
    assert c.code() == 220
    c.start_tls()
    c.send(b"EHLO client.example\r\n")
    assert not any(b"AUTH" in l for l in c.reply())
    c.send(b"AUTH PLAIN " + plain("alice@example.org", "secret-pw-1") + b"\r\n")
    assert c.reply()[0].startswith(b"502 5.5.1")
    assert world.directory.calls == []

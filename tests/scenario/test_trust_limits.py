"""DNSBL, greylisting and rate limits on a real server (docs/design/trust-limits.md): the
refusals come at the right step with the right codes, and the counters are visible in
`mailsuite limits show`. Loopback is exempt from rate limits by default; these servers exempt
nothing, so the test client (127.0.0.1) is counted like any other."""
from __future__ import annotations

import smtplib
import socket

import pytest

from tests.dnsserver import DNSServer
from tests.harness import MailServer
from tests.polling import wait_until
from tests.trustkit import message

RCPT = "alice@example.org"


def mx_session(server: MailServer) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30)
    s.ehlo("client.test")
    return s


def test_listed_client_is_refused_at_rcpt_but_may_reach_postmaster(make_server):
    zones = {"bl": [("1.0.0.127.bl.test", "A", "127.0.0.2"),
                    # A list refusing to answer us (a "public resolver" code) is not a listing.
                    ("1.0.0.127.err.test", "A", "127.255.255.254")]}
    with DNSServer(zones) as dns:
        server = make_server(extra={
            "courier": {"nameservers": [dns.nameserver]},
            "dnsbl": {"sites": ["bl.test=127.0.0.[2..11]*2", "err.test*5"], "threshold": 2,
                      "exempt_networks": []}})
        server.add_user(RCPT)
        server.admin("alias", "add", "postmaster@example.org", RCPT)
        with mx_session(server) as s:
            s.mail("someone@sender.test")
            code, text = s.rcpt(RCPT)
            assert code == 554 and text == b"5.7.1 bl.test lists 127.0.0.1", (code, text)
            code, _ = s.rcpt("postmaster@example.org")
            assert code == 250  # RFC 5321 §4.5.1
            s.data(message("someone@sender.test", "postmaster@example.org"))
        server.wait_for_messages(RCPT)
        assert "err.test" in server.log_text()  # the error answer is logged, not obeyed


def test_greylisting_defers_then_accepts_the_retry_and_remembers_the_network(make_server):
    server = make_server(extra={"greylist": {"enabled": True, "delay": 2},
                                "ratelimit": {"exempt_networks": []}})
    server.add_user(RCPT)
    server.add_user("bob@example.org")
    with mx_session(server) as s:
        s.mail("someone@sender.test")
        code, text = s.rcpt(RCPT)
    assert code == 451 and text.startswith(b"4.7.1"), (code, text)
    assert b"seconds" in text

    def retry() -> bool:
        with mx_session(server) as s:
            s.mail("someone@sender.test")
            return s.rcpt(RCPT)[0] == 250

    wait_until(retry, timeout=20, interval=0.5, message="the retried triplet to pass")
    # The network retried like a real MTA: its other mail passes at once from now on.
    with mx_session(server) as s:
        s.mail("other@elsewhere.test")
        assert s.rcpt("bob@example.org")[0] == 250
    shown = server.admin("limits", "show").stdout
    assert "greylist" in shown.lower()


def test_connection_rate_per_client_gives_421(make_server):
    server = make_server(extra={"ratelimit": {"mx_connections_per_minute": 3,
                                              "exempt_networks": []}})
    # The harness's start-up probe connected too: start the count afresh.
    server.admin("limits", "reset", "mx-conn:127.0.0.1")
    for _ in range(3):
        with mx_session(server) as s:
            s.noop()
    with socket.create_connection(("127.0.0.1", server.ports["mx"]), timeout=10) as sock:
        greeting = sock.makefile("rb").readline()
    assert greeting.startswith(b"421 4.7.0"), greeting
    shown = server.admin("limits", "show").stdout
    assert "127.0.0.1" in shown


def test_recipient_rate_per_client_gives_450(make_server):
    server = make_server(extra={"ratelimit": {"mx_recipients_per_minute": 2,
                                              "exempt_networks": []}})
    server.add_user(RCPT)
    with mx_session(server) as s:
        s.mail("someone@sender.test")
        assert s.rcpt(RCPT)[0] == 250
        assert s.rcpt(RCPT)[0] == 250
        code, text = s.rcpt(RCPT)
    assert code == 450 and text.startswith(b"4.7.1"), (code, text)


def test_submission_messages_per_hour_per_user(make_server):
    """A stolen password cannot send without bound: the third message in the hour is
    deferred (450), whichever connection it comes on."""
    server = make_server(extra={"ratelimit": {"submission_messages_per_hour": 2,
                                              "submission_recipients_per_hour": 100}})
    server.add_user("bob@example.org")
    server.add_user(RCPT)
    for i in range(3):
        with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as s:
            s.starttls(context=server.ssl_context())
            s.login("bob@example.org", "secret-pw-1")
            if i < 2:
                s.sendmail("bob@example.org", [RCPT], message("bob@example.org", RCPT))
            else:
                with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                    s.sendmail("bob@example.org", [RCPT], message("bob@example.org", RCPT))
                assert refused.value.smtp_code == 450
                assert refused.value.smtp_error.startswith(b"4.7.1")
    server.wait_for_messages(RCPT, count=2)
    shown = server.admin("limits", "show").stdout
    assert "bob@example.org" in shown


def test_submission_recipients_per_hour_per_user(make_server):
    server = make_server(extra={"ratelimit": {"submission_recipients_per_hour": 3}})
    server.add_user("bob@example.org")
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as s:
        s.starttls(context=server.ssl_context())
        s.login("bob@example.org", "secret-pw-1")
        s.mail("bob@example.org")
        for i in range(3):
            assert s.rcpt(f"r{i}@remote.test")[0] == 250
        code, text = s.rcpt("r3@remote.test")
    assert code == 450 and text.startswith(b"4.7.1"), (code, text)

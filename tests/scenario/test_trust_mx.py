"""Inbound trust on the MX port, end to end (docs/design/trust.md): a real server asks a loopback
DNS server for SPF, DKIM and DMARC records of test sender domains, refuses or quarantines what
fails, and writes one Authentication-Results header that authres parses back."""
from __future__ import annotations

import imaplib
import os
import smtplib

import pytest

from tests.dnsserver import DNSServer
from tests.harness import MailServer
from tests.trustkit import SenderDomain, auth_results, message, result_of, zones

HOST = "mx.test.example"  # MailServer's default host name: our authserv-id
RCPT = "alice@example.org"

DOMAINS = [
    SenderDomain("pass.test", spf="v=spf1 ip4:127.0.0.0/8 -all", dmarc="v=DMARC1; p=reject"),
    SenderDomain("forged.test", spf="v=spf1 ip4:192.0.2.1 -all", dmarc="v=DMARC1; p=reject"),
    SenderDomain("quar.test", spf="v=spf1 ip4:192.0.2.1 -all", dmarc="v=DMARC1; p=quarantine"),
    SenderDomain("soft.test", spf="v=spf1 ~all"),
    SenderDomain("neutral.test", spf="v=spf1 ?all"),
    SenderDomain("none.test"),
    SenderDomain("perm.test", spf="v=spf1 ip4:not-an-address -all"),
    SenderDomain("temp.test"),  # its TXT queries are never answered (see `silent`)
    SenderDomain("dmarctemp.test", spf="v=spf1 ip4:127.0.0.0/8 -all"),
]
BY_NAME = {d.name: d for d in DOMAINS}
SILENT = ["temp.test", "_dmarc.dmarctemp.test"]


@pytest.fixture(scope="module")
def dns():
    with DNSServer(zones(*DOMAINS), silent=SILENT) as server:
        yield server


def mx_server(make_server, dns, **trust) -> MailServer:
    extra = {"courier": {"nameservers": [dns.nameserver]},
             "trust": {"dns_timeout": 2.0, **trust}}
    server = make_server(extra=extra)
    server.add_user(RCPT)
    return server


def send(server: MailServer, mail_from: str, data: bytes, helo: str = "client.test") -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], local_hostname=helo, timeout=30) as s:
        s.sendmail(mail_from, [RCPT], data)


def delivered(server: MailServer, folder: str = "", count: int = 1) -> list[bytes]:
    paths = server.wait_for_messages(RCPT, count=count, folder=folder, timeout=20)
    out = []
    for path in paths:
        with open(path, "rb") as f:
            out.append(f.read())
    return out


def test_authenticated_mail_has_one_header_of_ours_and_keeps_others(make_server, dns):
    server = mx_server(make_server, dns)
    domain = BY_NAME["pass.test"]
    # Forged results claiming to be ours must go (RFC 8601 §5); another host's stay.
    forged = ("Authentication-Results: mx.test.example; dkim=pass header.d=bank.example\r\n"
              "Authentication-Results: MX.TEST.EXAMPLE;\r\n\tspf=pass smtp.mailfrom=x@bank\r\n"
              "Authentication-Results: other.example; spf=fail smtp.mailfrom=a@b.example\r\n")
    data = domain.sign(message("ceo@pass.test", RCPT, extra_headers=forged))
    send(server, "ceo@pass.test", data)
    [stored] = delivered(server)
    [ours] = auth_results(stored, HOST)
    assert result_of(ours, "spf") == ["pass"]
    assert result_of(ours, "dkim") == ["pass"]
    assert result_of(ours, "dmarc") == ["pass"]
    assert b"header.d=bank.example" not in stored
    assert b"Authentication-Results: other.example; spf=fail" in stored
    assert stored.index(b"Authentication-Results: ") < stored.index(b"Received: ")


def test_forged_from_with_reject_policy_is_refused_after_data(make_server, dns):
    server = mx_server(make_server, dns)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(server, "ceo@forged.test", message("ceo@forged.test", RCPT))
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error.startswith(b"5.7.1")
    assert b"DMARC" in refused.value.smtp_error
    # Refused before the 250: nothing was queued, so nothing can arrive later.
    assert server.messages(RCPT) == []
    assert not [n for n in os.listdir(os.path.join(server.data_dir, "queue"))
                if n.endswith(".json")]
    assert "-> reject" in server.log_text()


def test_quarantine_policy_files_into_junk_with_the_junk_keyword(make_server, dns):
    server = mx_server(make_server, dns)
    send(server, "news@quar.test", message("news@quar.test", RCPT, subject="junk me"))
    [stored] = delivered(server, folder="Junk")
    assert server.messages(RCPT) == []  # not in the INBOX
    [ours] = auth_results(stored, HOST)
    assert result_of(ours, "dmarc") == ["fail"]
    imap = imaplib.IMAP4("127.0.0.1", server.ports["imap"])
    try:
        imap.starttls(ssl_context=server.ssl_context())
        imap.login(RCPT, "secret-pw-1")
        assert imap.select("Junk")[0] == "OK"
        typ, data = imap.fetch("1", "(FLAGS)")
        assert typ == "OK" and b"$Junk" in data[0], data
    finally:
        imap.logout()


def test_reject_policy_can_be_configured_to_quarantine(make_server, dns):
    server = mx_server(make_server, dns, dmarc_reject="quarantine")
    send(server, "ceo@forged.test", message("ceo@forged.test", RCPT))
    delivered(server, folder="Junk")
    assert server.messages(RCPT) == []


@pytest.mark.parametrize("mail_from, expected", [
    ("a@pass.test", "pass"), ("a@forged.test", "fail"), ("a@soft.test", "softfail"),
    ("a@neutral.test", "neutral"), ("a@none.test", "none"), ("a@perm.test", "permerror"),
    ("a@temp.test", "temperror"),
])
def test_every_spf_result_is_recorded(make_server, dns, mail_from, expected):
    """The From: domain (none.test) publishes no DMARC: each message is delivered, with the
    SPF result of its MAIL FROM domain in our header."""
    server = mx_server(make_server, dns)
    send(server, mail_from, message("someone@none.test", RCPT))
    [stored] = delivered(server)
    [ours] = auth_results(stored, HOST)
    assert result_of(ours, "spf") == [expected]
    assert result_of(ours, "dkim") == ["none"]
    assert result_of(ours, "dmarc") == ["none"]


def test_null_sender_is_checked_by_its_helo_name(make_server, dns):
    server = mx_server(make_server, dns)
    send(server, "", message("mailer-daemon@none.test", RCPT), helo="pass.test")
    [stored] = delivered(server)
    [ours] = auth_results(stored, HOST)
    assert result_of(ours, "spf") == ["pass"]
    [spf] = [r for r in ours.results if r.method == "spf"]
    assert any(p.type == "smtp" and p.name == "helo" and p.value == "pass.test"
               for p in spf.properties)


def test_dmarc_dns_timeout_is_a_temporary_failure(make_server, dns):
    server = mx_server(make_server, dns)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(server, "a@dmarctemp.test", message("a@dmarctemp.test", RCPT))
    assert refused.value.smtp_code == 451
    assert refused.value.smtp_error.startswith(b"4.7.0")
    assert server.messages(RCPT) == []


def test_dkim_signature_of_an_altered_message_fails(make_server, dns):
    server = mx_server(make_server, dns)
    data = BY_NAME["none.test"].sign(message("a@none.test", RCPT, body="original\r\n"))
    send(server, "a@none.test", data.replace(b"original", b"altered!"))
    [stored] = delivered(server)
    [ours] = auth_results(stored, HOST)
    assert result_of(ours, "dkim") == ["fail"]


def test_submission_mail_is_not_judged(make_server, dns):
    """Our users' mail gets no Authentication-Results: the checks are for MX."""
    server = mx_server(make_server, dns)
    server.add_user("bob@example.org")
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as s:
        s.starttls(context=server.ssl_context())
        s.login("bob@example.org", "secret-pw-1")
        s.sendmail("bob@example.org", [RCPT], message("bob@example.org", RCPT))
    [stored] = delivered(server)
    assert b"Authentication-Results:" not in stored

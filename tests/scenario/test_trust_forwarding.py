"""Forwarding through an alias to another mailsuite (docs/design/trust.md, "Forwarding"): the
copy leaves with an SRS sender, so SPF passes at the next hop, and with an ARC set that the
next hop validates; bounces come back through the SRS address, forged ones are refused.

The original sender's SPF allows only 127.0.0.2, which the test's client uses; the forwarder
(A) connects to the next hop (B) from 127.0.0.1, allowed only for A's own domain."""
from __future__ import annotations

import os
import re
import smtplib

import pytest

from mailsuite.courier.dkim import generate
from tests.dnsserver import DNSServer
from tests.harness import MailServer, write_toml
from tests.polling import wait_until
from tests.trustkit import SenderDomain, auth_results, message, result_of, zones

ORIGIN = SenderDomain("orig.test", spf="v=spf1 ip4:127.0.0.2 -all",
                      dmarc="v=DMARC1; p=reject; aspf=r")


@pytest.fixture
def pair(tmp_path):
    records = zones(ORIGIN)
    records["net"] = [("b.test", "MX", "10 mx.b.test"), ("mx.b.test", "A", "127.0.0.1"),
                      ("mx.a.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")]
    with DNSServer(records) as dns:
        a = MailServer(os.path.join(tmp_path, "a"), hostname="mx.a.test",
                       listeners=["mx", "submission", "imap"])
        b = MailServer(os.path.join(tmp_path, "b"), hostname="mx.b.test",
                       listeners=["mx", "submission", "imap"])
        a.sections["courier"] = {"nameservers": [dns.nameserver], "mx_port": b.ports["mx"],
                                 "connect_timeout": 5}
        a.sections["queue"] = {"retry_schedule": [1], "delay_warning": 0, "scan_interval": 1.0}
        write_toml(a.config_path, a.sections)
        b.sections["courier"] = {"nameservers": [dns.nameserver]}
        write_toml(b.config_path, b.sections)
        # A seals with a key of its parent domain (a.test), published like a DKIM key.
        [key] = generate(os.path.join(a.data_dir, "dkim"), "a.test", "arc", "rsa")
        records["net"].append(("arc._domainkey.a.test", "TXT", key.txt))
        dns.update(records)
        try:
            a.start()
            b.start()
            a.add_domain("a.test")
            a.admin("alias", "add", "fwd@a.test", "bob@b.test")
            b.add_user("bob@b.test")
            yield a, b
        finally:
            a.stop()
            b.stop()


def send_to(server: MailServer, mail_from: str, rcpt: str, data: bytes,
            source: str = "127.0.0.2") -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], local_hostname="client.orig.test",
                      timeout=30, source_address=(source, 0)) as s:
        s.sendmail(mail_from, [rcpt], data)


def test_forwarded_mail_passes_spf_by_srs_and_arc_at_the_next_hop(pair):
    a, b = pair
    data = ORIGIN.sign(message("carol@orig.test", "fwd@a.test", subject="forward me"))
    send_to(a, "carol@orig.test", "fwd@a.test", data)
    [path] = b.wait_for_messages("bob@b.test", timeout=30)
    with open(path, "rb") as f:
        stored = f.read()
    # B saw an SRS sender of A's, which A's SPF record allows.
    return_path = re.search(rb"^Return-Path: <([^>]*)>", stored, re.M).group(1).decode()
    assert return_path.startswith("SRS0=") and return_path.endswith("@mx.a.test"), return_path
    [at_b] = auth_results(stored, "mx.b.test")
    assert result_of(at_b, "spf") == ["pass"]
    assert result_of(at_b, "arc") == ["pass"]
    assert result_of(at_b, "dkim") == ["pass"]  # carol's signature survived the forward
    assert result_of(at_b, "dmarc") == ["pass"]
    [at_a] = auth_results(stored, "mx.a.test")  # A's results travel along, sealed
    assert result_of(at_a, "spf") == ["pass"]
    assert re.search(rb"^ARC-Seal: i=1;.*", stored, re.M | re.S)
    assert b"d=a.test" in stored

    # A bounce to that address goes back through A to carol's domain: accepted at RCPT.
    with smtplib.SMTP("127.0.0.1", a.ports["mx"], timeout=30) as s:
        s.ehlo("mx.b.test")
        assert s.mail("<>")[0] == 250
        assert s.rcpt(return_path)[0] == 250
        s.rset()


def test_a_forged_srs_address_is_refused(pair):
    a, _ = pair
    with smtplib.SMTP("127.0.0.1", a.ports["mx"], timeout=30) as s:
        s.ehlo("attacker.test")
        s.mail("<>")
        code, text = s.rcpt("SRS0=abcdef=aa=victim.test=someone@mx.a.test")
    assert code == 550 and text.startswith(b"5.7.1"), (code, text)
    wait_until(lambda: "Invalid SRS address" in a.log_text(), timeout=10,
               message="the refusal in the log")


def test_users_own_mail_to_a_forward_keeps_its_sender(pair):
    """Only MX mail is forwarded with SRS: a local user's message to the alias goes out from
    the user's own address (our SPF covers it)."""
    a, b = pair
    a.add_user("dave@a.test")
    with smtplib.SMTP("127.0.0.1", a.ports["submission"], timeout=30) as s:
        s.starttls(context=a.ssl_context())
        s.login("dave@a.test", "secret-pw-1")
        s.sendmail("dave@a.test", ["fwd@a.test"], message("dave@a.test", "fwd@a.test"))
    [path] = b.wait_for_messages("bob@b.test", timeout=30)
    with open(path, "rb") as f:
        assert f.read().startswith(b"Return-Path: <dave@a.test>")

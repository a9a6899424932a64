"""Interop with an independently written MTA: a private Postfix instance on loopback.

mailsuite delivers to Postfix by MX (pf.test -> 127.0.0.1, the test DNS) and Postfix delivers to
mailsuite (transport_maps to mailsuite's MX port); a Postfix 5xx comes back as our DSN.

Postfix runs with its own config_directory/queue_directory under a temporary directory, only on
127.0.0.1 and an unprivileged port, no chroot; it needs root to start (`postfix -c DIR start`).
Install it with:  DEBIAN_FRONTEND=noninteractive apt-get install -y postfix
(preseed `postfix postfix/main_mailer_type select No configuration` so the package does not set
up or start the system instance). Skips with the reason when Postfix is missing or will not run.
"""
from __future__ import annotations

import email
import email.policy
import os
import pwd
import shutil
import smtplib
import tempfile

import pytest

from tests.daemons import PrivatePostfix, postfix_unusable
from tests.dnsserver import DNSServer
from tests.environment import unavailable
from tests.harness import MailServer
from tests.polling import wait_until
from tests.scenario.test_outbound import (dsn_fields, make_message, queue_is_empty, submit,
                                          wait_for_dsn)

pytestmark = pytest.mark.external

class InteropPostfix(PrivatePostfix):
    """Receives pf.test into one Maildir, relays a.test to mailsuite at
    127.0.0.1:`mailsuite_port`."""

    def __init__(self, base: str, mailsuite_port: int):
        pw = pwd.getpwnam("postfix")
        self.vmail = os.path.join(base, "vmail")
        os.makedirs(self.vmail, exist_ok=True)
        os.chown(self.vmail, pw.pw_uid, pw.pw_gid)
        super().__init__(base, {
            "myhostname": "mx.pf.test",
            "mydomain": "pf.test",
            "myorigin": "pf.test",
            "virtual_mailbox_domains": "pf.test",
            "virtual_mailbox_base": self.vmail,
            "virtual_mailbox_maps": "static:mailbox/",  # every pf.test user: one Maildir
            "virtual_uid_maps": f"static:{pw.pw_uid}",
            "virtual_gid_maps": f"static:{pw.pw_gid}",
            "virtual_minimum_uid": "1",
            "transport_maps": f"inline:{{ a.test=smtp:[127.0.0.1]:{mailsuite_port} }}",
            "smtpd_recipient_restrictions": (
                "check_recipient_access inline:{ { refuse@pf.test = 554 5.7.1 refused here } }, "
                "permit_mynetworks, reject_unauth_destination"),
            "smtp_tls_security_level": "may",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
        })

    def messages(self) -> list[str]:
        found = []
        for sub in ("new", "cur"):
            d = os.path.join(self.vmail, "mailbox", sub)
            if os.path.isdir(d):
                found += [os.path.join(d, n) for n in sorted(os.listdir(d))]
        return found

    def wait_for_messages(self, count: int = 1, timeout: float = 20) -> list[str]:
        try:
            wait_until(lambda: len(self.messages()) >= count, timeout=timeout, interval=0.1)
        except AssertionError:
            pass  # the caller asserts on what arrived
        return self.messages()


@pytest.fixture
def postfix_world(tmp_path):
    reason = postfix_unusable()
    if reason:
        unavailable(reason)
    base = tempfile.mkdtemp(prefix="mailsuite-postfix-")  # /tmp/pytest-of-root is 0700
    zones = {"pf.test": [("pf.test", "MX", "10 mx.pf.test"), ("mx.pf.test", "A", "127.0.0.1")]}
    dns = DNSServer(zones).start()
    server = MailServer(os.path.join(tmp_path, "mailsuite"), hostname="mx.a.test",
                        listeners=["mx", "submission"])
    postfix = InteropPostfix(base, server.ports["mx"])
    server.sections["courier"] = {"nameservers": [dns.nameserver], "mx_port": postfix.port,
                                  "connect_timeout": 5}
    server.sections["queue"] = {"retry_schedule": [1], "delay_warning": 0}
    from tests.harness import write_toml

    write_toml(server.config_path, server.sections)
    try:
        try:
            postfix.start()
        except RuntimeError as e:
            unavailable(f"Postfix would not start here: {str(e)[:500]}")
        server.start()
        server.add_user("alice@a.test")
        yield server, postfix
    finally:
        server.stop()
        postfix.stop()
        dns.stop()
        shutil.rmtree(base, ignore_errors=True)


def read(path: str) -> email.message.EmailMessage:
    with open(path, "rb") as f:
        return email.message_from_binary_file(f, policy=email.policy.default)


def test_mailsuite_and_postfix_deliver_to_each_other(postfix_world):
    server, postfix = postfix_world

    # mailsuite -> Postfix (by MX, opportunistic STARTTLS: Postfix offers none here).
    body = ".starts with a dot\r\n\r\nUmlaut: \xfc\r\n".encode("latin-1")
    submit(server, "alice@a.test", ["bob@pf.test"],
           make_message("alice@a.test", "bob@pf.test", "to postfix").replace(
               b"Hello.\r\n", body))
    [got] = postfix.wait_for_messages(1)
    message = read(got)
    assert message["Subject"] == "to postfix"
    assert message["Return-Path"] == "<alice@a.test>"
    with open(got, "rb") as f:
        raw = f.read()
    assert b"\n.starts with a dot\n" in raw and b"Umlaut: \xfc" in raw  # Postfix stores LF
    assert message.get_all("Received")[0].startswith("from mx.a.test")  # Postfix's trace
    assert "status=sent (delivered to maildir)" in postfix.log_text()
    assert queue_is_empty(server)

    # Postfix -> mailsuite: inject into Postfix, which relays a.test to mailsuite's MX port.
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=30) as s:
        s.sendmail("carol@pf.test", ["alice@a.test"],
                   make_message("carol@pf.test", "alice@a.test", "from postfix"))
    arrived = server.wait_for_messages("alice@a.test", timeout=30)
    assert arrived, postfix.log_text()[-3000:]
    message = read(arrived[0])
    assert message["Subject"] == "from postfix"
    assert message["Return-Path"] == "<carol@pf.test>"
    assert "mx.pf.test" in message.get_all("Received")[0]

    # A Postfix refusal (554 5.7.1 at RCPT) comes back to alice as our DSN.
    submit(server, "alice@a.test", ["refuse@pf.test"],
           make_message("alice@a.test", "refuse@pf.test", "refused by postfix"))
    dsn = wait_for_dsn(server, "alice@a.test", "refuse@pf.test", timeout=20)
    assert dsn is not None, server.log_text()[-3000:]
    _, [rcpt] = dsn_fields(dsn)
    assert rcpt["Status"] == "5.7.1"
    assert rcpt["Remote-MTA"] == "dns; mx.pf.test"
    assert "refused here" in rcpt["Diagnostic-Code"]

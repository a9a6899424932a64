"""Two mailsuite servers (a.test and b.test) on loopback deliver to each other by MX, found through
a real DNS server serving the test zones; opportunistic STARTTLS between them (self-signed
certificates, so unverifiable: delivery must still happen, encrypted)."""
from __future__ import annotations

import email
import email.policy
import os
import re

from tests.dnsserver import DNSServer
from tests.harness import MailServer, write_toml
from tests.integration.test_outbound import make_message, queue_is_empty, submit


def read(path: str) -> email.message.EmailMessage:
    with open(path, "rb") as f:
        return email.message_from_binary_file(f, policy=email.policy.default)


def test_a_and_b_deliver_to_each_other(tmp_path):
    zones = {d: [(d, "MX", f"10 mx.{d}"), (f"mx.{d}", "A", "127.0.0.1")]
             for d in ("a.test", "b.test")}
    with DNSServer(zones) as dns:
        queue = {"retry_schedule": [1], "delay_warning": 0, "scan_interval": 1.0}
        a = MailServer(os.path.join(tmp_path, "a"), hostname="mx.a.test",
                       listeners=["mx", "submission"])
        b = MailServer(os.path.join(tmp_path, "b"), hostname="mx.b.test",
                       listeners=["mx", "submission"])
        # Each one's MX port is the other's listener: all of loopback is one "internet" here.
        for me, peer in ((a, b), (b, a)):
            me.sections["courier"] = {"nameservers": [dns.nameserver],
                                      "mx_port": peer.ports["mx"], "connect_timeout": 5}
            me.sections["queue"] = dict(queue)
            write_toml(me.config_path, me.sections)
        try:
            a.start()
            b.start()
            a.add_user("user@a.test")
            b.add_user("user@b.test")

            submit(a, "user@a.test", ["user@b.test"],
                   make_message("user@a.test", "user@b.test", "from a to b"))
            [arrived] = b.wait_for_messages("user@b.test", timeout=20)
            message = read(arrived)
            assert message["Subject"] == "from a to b"
            assert message["Return-Path"] == "<user@a.test>"
            received = message.get_all("Received")
            # b's Received header names a as the client and says TLS was used (ESMTPS).
            assert "mx.a.test" in received[0] and "ESMTPS" in received[0], received

            submit(b, "user@b.test", ["user@a.test"],
                   make_message("user@b.test", "user@a.test", "and back"))
            [back] = a.wait_for_messages("user@a.test", timeout=20)
            assert read(back)["Subject"] == "and back"
            assert queue_is_empty(a) and queue_is_empty(b)
            # The courier's connection log line says where it went and that TLS was used.
            assert re.search(r"connected to mx\.b\.test\[127\.0\.0\.1\]:\d+ tls=yes TLSv1\.[23]",
                             a.log_text()), a.log_text()[-3000:]
            assert re.search(r"connected to mx\.a\.test\[127\.0\.0\.1\]:\d+ tls=yes",
                             b.log_text())
        finally:
            a.stop()
            b.stop()

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
from tests.polling import wait_until
from tests.scenario.test_outbound import make_message, queue_is_empty, submit


def read(path: str) -> email.message.EmailMessage:
    with open(path, "rb") as f:
        return email.message_from_binary_file(f, policy=email.policy.default)


def queue_text(server: MailServer) -> str:
    """All queue envelopes (JSON) as one string: cheaper than `mailsuite queue list` in a loop."""
    directory = os.path.join(server.data_dir, "queue")
    text = ""
    for name in os.listdir(directory):
        if name.endswith(".json") and not name.startswith("."):
            try:
                with open(os.path.join(directory, name)) as f:
                    text += f.read()
            except FileNotFoundError:
                pass
    return text


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


def test_smarthost_with_starttls_and_auth(tmp_path):
    """Everything remote goes to the smarthost (here: another mailsuite's submission port, with
    its certificate verified against relay_cafile, and AUTH). A wrong password defers."""
    relay = MailServer(os.path.join(tmp_path, "relay"), hostname="localhost",
                       listeners=["mx", "submission", "submissions"])
    relay.start()
    sender = MailServer(os.path.join(tmp_path, "sender"), hostname="mx.a.test",
                        listeners=["mx", "submission"])
    try:
        relay.add_user("alice@a.test", "relay-pw-1")  # her account at the provider
        relay.add_user("carol@c.test")
        sender.sections["courier"] = {
            "relay": f"localhost:{relay.ports['submission']}", "relay_tls": "starttls",
            "relay_username": "alice@a.test", "relay_password": "relay-pw-1",
            "relay_cafile": relay.cafile,
            # No DNS at all: a smarthost needs none (the test server would not answer anyway).
            "nameservers": ["127.0.0.1:9"]}
        sender.sections["queue"] = {"retry_schedule": [1], "delay_warning": 0}
        write_toml(sender.config_path, sender.sections)
        sender.start()
        sender.add_user("alice@a.test")
        submit(sender, "alice@a.test", ["carol@c.test"],
               make_message("alice@a.test", "carol@c.test", "via the smarthost"))
        [arrived] = relay.wait_for_messages("carol@c.test", timeout=20)
        message = read(arrived)
        assert message["Subject"] == "via the smarthost"
        assert "ESMTPSA" in message.get_all("Received")[0]  # TLS and AUTH at the relay
        assert re.search(r"connected to localhost\[localhost\]:\d+ tls=yes \S+ \S+ auth=yes",
                         sender.log_text()), sender.log_text()[-2000:]
        assert queue_is_empty(sender)

        # Wrong password: deferred (never bounced: it is our configuration that is wrong).
        sender.stop()
        sender.sections["courier"]["relay_password"] = "wrong"
        write_toml(sender.config_path, sender.sections)
        sender.start()
        submit(sender, "alice@a.test", ["carol@c.test"],
               make_message("alice@a.test", "carol@c.test", "wrong password"))
        wait_until(lambda: "4.7.0" in queue_text(sender), timeout=15, interval=0.1,
                   message="a 4.7.0 deferral in the queue")
        assert "carol@c.test" in queue_text(sender) and "4.7.0" in queue_text(sender)
        assert "bounced" not in queue_text(sender)
        assert len(relay.messages("carol@c.test")) == 1

        # Implicit TLS (port 465 style, relay_tls = "tls"), right password: the deferred
        # message and a new one both arrive.
        sender.stop()
        sender.sections["courier"].update(relay=f"localhost:{relay.ports['submissions']}",
                                          relay_tls="tls", relay_password="relay-pw-1")
        write_toml(sender.config_path, sender.sections)
        sender.start()
        submit(sender, "alice@a.test", ["carol@c.test"],
               make_message("alice@a.test", "carol@c.test", "implicit tls"))
        arrived = relay.wait_for_messages("carol@c.test", count=3, timeout=20)
        assert sorted(read(p)["Subject"] for p in arrived) == [
            "implicit tls", "via the smarthost", "wrong password"]
        assert queue_is_empty(sender)
    finally:
        sender.stop()
        relay.stop()

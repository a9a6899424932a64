"""Message events end to end: the real server records what happens to a local message and to
one a remote MX defers (the scripted sink of test_outbound.py, a loopback DNS server), and the
real `mailsuite trace` shows it by Message-ID and by address; the statistics table counts it.
"""
from __future__ import annotations

import os
import re
import smtplib
import time

import pytest
from sqlalchemy import select

from mailsuite.directory.models import StatBucket
from mailsuite.maillog import quote
from tests.dnsserver import DNSServer
from tests.harness import MailServer
from tests.polling import wait_until
from tests.scenario.test_outbound import SinkServer, zone

PASSWORD = "secret-pw-1"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("trace"))
    with SinkServer() as sink:
        with DNSServer({"far.test": zone("far.test")}) as dns:
            server = MailServer(os.path.join(base, "a"), hostname="mx.a.test",
                                listeners=["mx", "submission"], extra={
                "courier": {"nameservers": [dns.nameserver], "mx_port": sink.port,
                            "connect_timeout": 2, "command_timeout": 10},
                "queue": {"retry_schedule": [3600], "scan_interval": 1.0},
                "events": {"flush_interval": 0.2},
            })
            server.start()
            try:
                server.add_user("alice@a.test")
                server.add_user("bob@a.test")
                yield server, sink
            finally:
                server.stop()


def message(sender: str, to: str, message_id: str) -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: traced\r\nMessage-ID: {message_id}\r\n"
            f"Date: Sat, 28 Nov 2026 01:00:00 +0000\r\n\r\nHello.\r\n").encode()


def trace(server: MailServer, *args: str) -> str:
    result = server.admin("trace", *args, check=False)
    assert result.returncode in (0, 1), result.stderr
    return result.stdout


def test_trace_shows_reception_local_delivery_and_a_remote_deferral(world):
    server, sink = world
    message_id = f"<{time.time_ns()}@a.test>"
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as s:
        s.starttls(context=server.ssl_context())
        s.login("alice@a.test", PASSWORD)
        s.sendmail("alice@a.test", ["bob@a.test", "later-x@far.test"],
                   message("alice@a.test", "bob@a.test, later-x@far.test", message_id))

    def ours() -> str | None:  # the module's other test may have delivered to bob before
        for path in server.messages("bob@a.test"):
            with open(path, "rb") as f:
                if message_id.encode() in f.read():
                    return path
        return None

    stored = wait_until(ours, timeout=30, message="the message in bob's Maildir")

    # The sink answers 451 to the first RCPT of later-*: a deferral with the remote's answer.
    out = wait_until(lambda: (lambda t: t if " deferred " in t else None)(
        trace(server, message_id)), timeout=30, message="no deferral in the trace")
    lines = out.splitlines()
    assert lines[0].endswith(f"message-id={message_id} from=<alice@a.test>"), out
    received = next(line for line in lines if " received " in line)
    assert "client=127.0.0.1" in received and "listener=submission" in received
    assert re.search(r'tls="TLSv1\.[23] \S+"', received), received
    assert "auth=alice@a.test" in received and "nrcpt=2" in received
    sent = next(line for line in lines if " sent " in line)
    assert "to=<bob@a.test> relay=local" in sent and f"maildir={quote(stored)}" in sent, (sent, stored)
    transaction = next(line for line in lines if " transaction " in line)
    assert re.search(r"relay=mx\.far\.test\[127\.0\.0\.1\]:\d+ tls=no", transaction)
    deferred = next(line for line in lines if " deferred " in line)
    assert "to=<later-x@far.test> relay=mx.far.test" in deferred
    assert 'answer="451 4.2.0 greylisted, try again later"' in deferred
    kinds = [line.split()[2] for line in lines[1:]]
    assert kinds.index("received") < kinds.index("sent") < kinds.index("deferred")

    # By address: the same message, found through the recipient the remote deferred.
    by_address = trace(server, "later-x@far.test", "--since", "1h")
    assert by_address.splitlines()[0] == lines[0]
    assert " deferred " in by_address


def test_statistics_count_what_was_received_delivered_and_refused(world):
    server, _ = world
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as s:
        s.ehlo("peer.example")
        s.mail("x@peer.example")
        code, _ = s.rcpt("nobody@a.test")
        assert code == 550
        s.rcpt("bob@a.test")
        s.data(message("x@peer.example", "bob@a.test", f"<{time.time_ns()}@peer.example>"))

    def totals() -> dict | None:
        store = server.directory()
        try:
            with store.unit() as s:
                rows = s.execute(select(StatBucket.metric, StatBucket.label, StatBucket.value)
                                 .where(StatBucket.resolution == "hour")).all()
        finally:
            store.close()
        found: dict = {}
        for metric, label, value in rows:
            found[(metric, label)] = found.get((metric, label), 0) + value
        wanted = [("received", "mx"), ("rejected", "unknown_user"), ("delivered", "sent/local")]
        return found if all(k in found for k in wanted) else None

    found = wait_until(totals, timeout=30, message="statistics not written")
    assert found[("rejected", "unknown_user")] >= 1
    assert found[("received", "mx")] >= 1 and found[("received_bytes", "mx")] > 0
    assert found[("delivered", "sent/local")] >= 1

"""RFC 3464 notifications built by the courier, parsed back with the email package."""
from __future__ import annotations

import email
import email.policy

from mailsuite.courier.dsn import build_dsn, recipient_status
from mailsuite.queue.spool import QueueEntry, Recipient

# Original headers with raw ISO-8859-1 bytes (no RFC 2047 encoding), as badly behaved clients
# send them: Twisted's bounce module crashes on exactly this (docs/design/courier.md).
HEADERS = (b"Received: from x by y\r\nFrom: J\xfcrgen <j@a.test>\r\nTo: b@remote.test\r\n"
           b"Subject: Gr\xfc\xdfe\r\nMessage-ID: <m1@a.test>\r\n\r\n")


def entry(*recipients: Recipient, sender: str = "j@a.test") -> QueueEntry:
    return QueueEntry(id="6b0a2b6a8430b2f3f6188", sender=sender, recipients=list(recipients),
                      created=1_790_000_000.0)


def parse(data: bytes) -> email.message.EmailMessage:
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF everywhere, as the spool requires
    return email.message_from_bytes(data, policy=email.policy.default)


def test_failed_dsn_structure_and_fields():
    r1 = Recipient(address="b@remote.test", original="b@remote.test", local=False,
                   state="bounced", last_error="550 5.1.1 <b@remote.test>: user unknown",
                   remote_mta="mx.remote.test")
    r2 = Recipient(address="carol@a.test", original="info@a.test", local=True, state="bounced",
                   last_error="552 5.2.2 mailbox full")
    data = build_dsn(entry(r1, r2), [r1, r2], "failed", HEADERS, "mx.a.test")
    msg = parse(data)
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.a.test"
    assert msg["To"].addresses[0].addr_spec == "j@a.test"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert "b@remote.test" in parts[0].get_content() and "user unknown" in parts[0].get_content()
    per_message, first, second = parts[1].get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.a.test"
    assert per_message["Arrival-Date"]
    assert first["Final-Recipient"] == "rfc822; b@remote.test"
    assert first["Original-Recipient"] is None  # same as final: not repeated
    assert first["Action"] == "failed" and first["Status"] == "5.1.1"
    assert first["Remote-MTA"] == "dns; mx.remote.test"
    assert first["Diagnostic-Code"] == "smtp; 550 5.1.1 <b@remote.test>: user unknown"
    assert first["Last-Attempt-Date"]
    assert second["Original-Recipient"] == "rfc822; info@a.test"
    assert second["Status"] == "5.2.2" and second["Remote-MTA"] is None
    # The original headers, byte for byte (8-bit included).
    assert parts[2].get_payload(decode=True) == HEADERS[:-2]
    assert msg.defects == [] and all(not p.defects for p in parts)


def test_delayed_dsn_and_status_derivation():
    r = Recipient(address="b@remote.test", original="b@remote.test", local=False,
                  last_error="4.4.1 cannot connect to mx.remote.test[192.0.2.1]:25: refused")
    msg = parse(build_dsn(entry(r), [r], "delayed", HEADERS, "mx.a.test",
                          retry_until=1_790_400_000.0))
    assert "Delayed" in msg["Subject"]
    _, block = msg.get_payload()[1].get_payload()
    assert block["Action"] == "delayed" and block["Status"] == "4.4.1"
    assert block["Diagnostic-Code"].startswith("X-mailsuite; 4.4.1 cannot connect")
    assert block["Will-Retry-Until"]
    assert "keeps trying" in msg.get_payload()[0].get_content()


def test_status_from_replies_without_enhanced_codes():
    def status(text, action="failed"):
        return recipient_status(Recipient(address="x@y", original="x@y", local=False,
                                          last_error=text), action).status
    assert status("550 no such user") == "5.0.0"
    assert status("451 try later") == "4.0.0"
    assert status("554 5.4.6 mail loop") == "5.4.6"
    assert status("5.1.10 null MX") == "5.1.10"
    assert status("") == "5.0.0"
    assert status("550 5.7.1 spam", action="delayed") == "4.7.1"


def test_headers_without_blank_line_and_long_diagnostics_fold():
    r = Recipient(address="b@remote.test", original="b@remote.test", local=False,
                  last_error="550 5.7.1 " + "very long explanation " * 20, remote_mta="mx.r")
    data = build_dsn(entry(r), [r], "failed", b"Subject: x\nFrom: y", "mx.a.test")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998  # RFC 5322 §2.1.1
    msg = parse(data)
    _, block = msg.get_payload()[1].get_payload()
    assert block["Diagnostic-Code"].startswith("smtp; 550 5.7.1 very long")
    assert msg.get_payload()[2].get_payload(decode=True) == b"Subject: x\r\nFrom: y\r\n"

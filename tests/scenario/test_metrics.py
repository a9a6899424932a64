"""The metrics listener of the real server (docs/design/metrics.md): scraped with urllib after a
message through the MX port and a login over IMAP, its counters have moved."""
from __future__ import annotations

import imaplib
import smtplib
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import HOST
from tests.polling import wait_until

PASSWORD = "secret-pw-1"


def scrape(server) -> dict[tuple[str, frozenset], float]:
    """Every sample of GET /metrics: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://{HOST}:{server.ports['metrics']}/metrics",
                                timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = answer.read().decode("utf-8")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_counters_move_with_mail_and_logins(server):
    before = scrape(server)
    with smtplib.SMTP(HOST, server.ports["mx"], timeout=30) as smtp:
        smtp.ehlo("client.example")
        smtp.sendmail("carol@remote.example", ["alice@example.org"],
                      b"From: carol@remote.example\r\nTo: alice@example.org\r\n"
                      b"Subject: metrics\r\n\r\nCounted.\r\n")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            smtp.sendmail("carol@remote.example", ["dan@elsewhere.example"], b"Subject: x\r\n\r\n")
    server.wait_for_messages("alice@example.org")
    imap = imaplib.IMAP4(HOST, server.ports["imap"], timeout=30)
    imap.starttls(server.ssl_context())
    imap.login("alice@example.org", PASSWORD)
    imap.select("INBOX")
    imap.logout()

    def moved() -> dict | None:
        now = scrape(server)
        delivered = sample(now, "mailsuite_deliveries_total", kind="local", status="sent")
        return now if delivered > sample(before, "mailsuite_deliveries_total", kind="local",
                                         status="sent") else None

    after = wait_until(moved, timeout=30, interval=0.2, message="a local delivery counted")
    accepted = "mailsuite_messages_accepted_total"
    assert sample(after, accepted, origin="smtp", tls="no") == \
        sample(before, accepted, origin="smtp", tls="no") + 1
    assert sample(after, "mailsuite_messages_accepted_bytes_total", origin="smtp") > 0
    assert sample(after, "mailsuite_smtp_replies_total", listener="mx", code_class="5xx",
                  reason="relay_denied") == 1
    assert sample(after, "mailsuite_connections_total", listener="mx") >= 1
    assert sample(after, "mailsuite_auth_total", protocol="imap", outcome="success") == 1
    assert sample(after, "mailsuite_sessions_total", listener="imap") == 1
    assert sample(after, "mailsuite_imap_command_duration_seconds_count", command="SELECT") == 1
    assert sample(after, "mailsuite_maildir_writes_total", source="delivery") >= 1
    assert sample(after, "mailsuite_delivery_delay_seconds_count", kind="local",
                  status="sent") >= 1
    assert sample(after, "mailsuite_pool_jobs_total", pool="io") > 0
    assert ("mailsuite_queue_entries", frozenset()) in after
    assert sample(after, "mailsuite_login_cache_misses_total") >= 1


def test_only_get_metrics_is_served(server):
    base = f"http://{HOST}:{server.ports['metrics']}"
    for path in ("/", "/metrics/x", "/favicon.ico"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + path, timeout=10)
        assert e.value.code == 404, path
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(base + "/metrics", data=b"x"), timeout=10)
    assert e.value.code == 405

"""DMARC and TLS reports between two mailsuite servers (a.test, b.test) over a loopback DNS zone
(docs/design/reports.md): b.test asks for DMARC reports (rua=mailto:reports@b.test), both ask
for TLS reports. B sends mail to A, so A evaluates DMARC for b.test and B notes its TLS session
to a.test; then `mailsuite reports send` on each queues the day's reports, the queues deliver
them, and each side's reports address reads what the other sent."""
from __future__ import annotations

import os
import re
from datetime import datetime, timezone

from tests.dnsserver import DNSServer
from tests.harness import MailServer, write_toml
from tests.polling import wait_until
from tests.scenario.test_outbound import make_message, queue_is_empty, submit


def zones() -> dict:
    records = {}
    for d in ("a.test", "b.test"):
        records[d] = [(d, "MX", f"10 mx.{d}"), (f"mx.{d}", "A", "127.0.0.1"),
                      (d, "TXT", "v=spf1 ip4:127.0.0.1 -all"),
                      (f"_smtp._tls.{d}", "TXT", f"v=TLSRPTv1; rua=mailto:reports@{d}")]
    records["b.test"].append(("_dmarc.b.test", "TXT",
                              "v=DMARC1; p=reject; rua=mailto:reports@b.test"))
    return records


def admin_output(server: MailServer, *args: str) -> str:
    return server.admin(*args).stdout


def test_reports_travel_between_two_servers(tmp_path):
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    with DNSServer(zones()) as dns:
        a = MailServer(os.path.join(tmp_path, "a"), hostname="mx.a.test",
                       listeners=["mx", "submission"])
        b = MailServer(os.path.join(tmp_path, "b"), hostname="mx.b.test",
                       listeners=["mx", "submission"])
        for me, peer, domain in ((a, b, "a.test"), (b, a, "b.test")):
            me.sections["courier"] = {"nameservers": [dns.nameserver],
                                      "mx_port": peer.ports["mx"], "connect_timeout": 5}
            me.sections["queue"] = {"retry_schedule": [1], "delay_warning": 0,
                                    "scan_interval": 1.0}
            me.sections["reports"] = {"address": f"reports@{domain}",
                                      "sender": f"reports@{domain}", "scan_interval": 0.5}
            write_toml(me.config_path, me.sections)
        try:
            a.start()
            b.start()
            for server, domain in ((a, "a.test"), (b, "b.test")):
                server.add_user(f"user@{domain}")
                server.add_user(f"reports@{domain}")
            # A signs what it sends for a.test, its reports included (issue 14: DKIM-signed).
            out = admin_output(a, "dkim", "generate", "a.test", "--selector", "r1")
            keys = re.findall(r'^(\S+)\. IN TXT ((?:"[^"]*" ?)+)$', out, re.M)
            assert len(keys) == 2, out
            published = zones()
            published["a.test"] += [(name, "TXT", "".join(re.findall(r'"([^"]*)"', value)))
                                    for name, value in keys]
            dns.update(published)

            submit(b, "user@b.test", ["user@a.test"],
                   make_message("user@b.test", "user@a.test", "b to a"))
            assert a.wait_for_messages("user@a.test", timeout=30), a.log_text()[-3000:]
            assert queue_is_empty(b)

            # A reports to b.test what it saw: one message from 127.0.0.1, aligned SPF pass.
            out = admin_output(a, "reports", "send", "--date", today)
            assert f"dmarc b.test: queued" in out and "to reports@b.test" in out, out
            wait_until(lambda: "127.0.0.1" in admin_output(b, "reports", "dmarc", "b.test"),
                       timeout=60, interval=0.5,
                       message="B to show A's DMARC report\n" + b.log_text()[-3000:])
            shown = admin_output(b, "reports", "dmarc", "b.test")
            assert "b.test: 1 messages, DMARC pass 100%" in shown, shown
            assert "mx.a.test" in shown  # A's org_name: who reported it
            [report_mail] = b.messages("reports@b.test")
            with open(report_mail, "rb") as f:
                head = f.read(4096)
            assert b"Report Domain: b.test Submitter: a.test" in head
            with open(report_mail, "rb") as f:
                report = f.read()
            import dkim
            assert re.search(rb"(?im)^DKIM-Signature:.*\bd=a\.test;", report), head
            assert dkim.verify(report[report.index(b"DKIM-Signature:"):],
                               dnsfunc=dns.dnsfunc), head

            # B reports to a.test how TLS went on its session to A's MX.
            out = admin_output(b, "reports", "send", "--date", today)
            assert "tlsrpt a.test: queued" in out, out
            wait_until(lambda: "success" in admin_output(a, "reports", "tls", "a.test"),
                       timeout=60, interval=0.5,
                       message="A to show B's TLS report\n" + a.log_text()[-3000:])
            shown = admin_output(a, "reports", "tls", "a.test")
            assert "a.test: 1 sessions ok, 0 failed" in shown, shown
            assert "no-policy-found" in shown and "mx.b.test" in shown

            # Sending again the same day does not send the DMARC report twice: the claim says
            # it went. (A's own session to B, which carried that report, is new TLS data for
            # b.test, sent now; the run after that sends nothing at all.)
            again = admin_output(a, "reports", "send", "--date", today)
            assert "dmarc b.test: already sent" in again, again
            assert "tlsrpt b.test: queued" in again, again
            third = admin_output(a, "reports", "send", "--date", today)
            assert "queued" not in third and third.count("already sent") == 2, third
            assert "Traceback" not in a.log_text() + b.log_text()
        finally:
            a.stop()
            b.stop()

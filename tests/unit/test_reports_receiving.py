"""What the server notes (the gate's DMARC outcomes), the reports address's INBOX read once per
message and once per report, and the admin command's views (mailsuite/reports/record.py,
inbox.py, admin/reports_cmd.py)."""
from __future__ import annotations

import gzip
import os
import random

import pytest
from twisted.internet import defer, task

from mailsuite.admin.cli import main
from mailsuite.config import Config, TrustSection
from mailsuite.directory.records import Route
from mailsuite.mailbox.store import MailStore
from mailsuite.pools import InlinePool
from mailsuite.reports.inbox import ReportInbox, inbox_messages
from mailsuite.reports.record import ReportRecorder, evaluation_from
from mailsuite.trust import AuthResult, Envelope
from mailsuite.trust.checks import authenticate_message
from mailsuite.trust.gate import Gate
from tests.unit.test_reports_inbound import DMARC_XML, TLSRPT_JSON, mail_with
from tests.unit.test_reports_sending import db_url, store  # noqa: F401 (fixtures)
from tests.unit.trustkit import FakeLookup

MESSAGE = b"From: Bob <bob@b.test>\r\nTo: a@a.test\r\nSubject: hi\r\n\r\nHello\r\n"
ENVELOPE = Envelope("192.0.2.1", "mx.b.test", "bob@b.test", ("a@a.test",))
ZONE = {("_dmarc.b.test", "TXT"): [b"v=DMARC1; p=reject; rua=mailto:d@b.test"]}


# -- what the gate notes -------------------------------------------------------------------------
def test_evaluation_of_a_passing_message():
    spf = AuthResult("spf", "pass", "", (("smtp.mailfrom", "bob@b.test"),))
    outcome = authenticate_message(MESSAGE, ENVELOPE, spf, FakeLookup(ZONE), TrustSection(),
                                   random.Random(1))
    e = evaluation_from(outcome, ENVELOPE, "2026-11-27")
    assert (e.policy_domain, e.header_from, e.envelope_from, e.source_ip) == (
        "b.test", "b.test", "b.test", "192.0.2.1")
    assert (e.disposition, e.dkim, e.spf, e.spf_result) == ("none", "fail", "pass",
                                                            ("b.test", "mfrom", "pass"))


def test_evaluation_of_a_rejected_message_and_of_none():
    spf = AuthResult("spf", "fail", "", (("smtp.mailfrom", "x@spoof.test"),))
    outcome = authenticate_message(MESSAGE, ENVELOPE, spf, FakeLookup(ZONE), TrustSection(),
                                   random.Random(1))
    e = evaluation_from(outcome, ENVELOPE, "2026-11-27")
    assert (e.disposition, e.dkim, e.spf, e.envelope_from) == ("reject", "fail", "fail",
                                                               "spoof.test")
    no_record = authenticate_message(MESSAGE, ENVELOPE, spf, FakeLookup({}), TrustSection(),
                                     random.Random(1))
    assert evaluation_from(no_record, ENVELOPE, "2026-11-27") is None


class Dns:
    def blocking(self, reactor):
        return FakeLookup(ZONE)


def test_the_gate_hands_each_dmarc_outcome_to_the_recorder(tmp_path, store):
    clock = task.Clock()
    clock.advance(1795737600 + 3600)  # 2026-11-27 01:00 UTC
    config = Config()
    gate = Gate(config, "mx", reactor=clock, work=InlinePool(), dns=Dns(),
                reports=ReportRecorder(store, InlinePool(), clock))
    path = tmp_path / "staged"
    path.write_bytes(MESSAGE)
    results = []
    gate.session("192.0.2.1").inspect(ENVELOPE, str(path), len(MESSAGE), False) \
        .addBoth(results.append)
    assert results[0].verdict.disposition == "reject"  # SPF not checked: DMARC fails
    [row] = store.dmarc_day("2026-11-27")["b.test"]
    assert (row.source_ip, row.count, row.disposition) == ("192.0.2.1", 1, "reject")


def test_a_recorder_failure_never_changes_the_verdict(tmp_path):
    class Broken:
        def record_dmarc(self, evaluation):
            raise RuntimeError("database gone")

    clock = task.Clock()
    gate = Gate(Config(), "mx", reactor=clock, work=InlinePool(), dns=Dns(),
                reports=ReportRecorder(Broken(), InlinePool(), clock))
    path = tmp_path / "staged"
    path.write_bytes(MESSAGE)
    results = []
    gate.session("192.0.2.1").inspect(ENVELOPE, str(path), len(MESSAGE), False) \
        .addBoth(results.append)
    assert results[0].verdict.disposition == "reject"


# -- the reports address's INBOX ------------------------------------------------------------------
class Directory:
    def route(self, address):
        return defer.succeed(Route(address, True, ("reports@a.test",)))


def deliver(mailstore: MailStore, data: bytes) -> str:
    return mailstore.account("reports@a.test").deliver(b"", data=data)


def scan(inbox: ReportInbox) -> int:
    results = []
    inbox.scan().addBoth(results.append)
    if not isinstance(results[0], int):
        results[0].raiseException()
    return results[0]


def test_inbox_stores_each_report_once(tmp_path, store):
    mailstore = MailStore(str(tmp_path / "mail"))
    inbox = ReportInbox("reports@a.test", Directory(), mailstore, store, InlinePool(),
                        InlinePool(), task.Clock(), 60)
    dmarc = mail_with(gzip.compress(DMARC_XML), "application", "gzip", "r.xml.gz")
    deliver(mailstore, dmarc)
    path = deliver(mailstore, mail_with(gzip.compress(TLSRPT_JSON), "application",
                                        "tlsrpt+gzip", "r.json.gz"))
    assert scan(inbox) == 2
    assert scan(inbox) == 0  # nothing new
    deliver(mailstore, dmarc)  # the same report delivered again
    # A client reads the TLS report: new/ -> cur/ with flags; it is not read again.
    cur = path.replace("/new/", "/cur/") + ":2,S"
    os.rename(path, cur)
    assert scan(inbox) == 0
    [summary] = store.dmarc_summary("example.org")[:1]
    assert summary.messages == 12 and summary.reporters == "big-provider.example"


def test_inbox_skips_hostile_messages_once(tmp_path, store):
    mailstore = MailStore(str(tmp_path / "mail"))
    inbox = ReportInbox("reports@a.test", Directory(), mailstore, store, InlinePool(),
                        InlinePool(), task.Clock(), 60)
    deliver(mailstore, mail_with(b"<!DOCTYPE x [<!ENTITY a 'b'>]><feedback>&a;</feedback>",
                                 "text", "xml", "r.xml"))
    assert scan(inbox) == 0
    names = list(inbox_messages(mailstore, "reports@a.test"))
    assert len(names) == 1 and store.unseen(names) == []  # read once, not again
    assert store.dmarc_summary() == []


def test_inbox_timer_rescans_on_the_clock(tmp_path, store):
    clock = task.Clock()
    mailstore = MailStore(str(tmp_path / "mail"))
    inbox = ReportInbox("reports@a.test", Directory(), mailstore, store, InlinePool(),
                        InlinePool(), clock, 30)
    inbox.startService()
    clock.advance(0)
    deliver(mailstore, mail_with(DMARC_XML, "text", "xml", "r.xml"))
    assert store.dmarc_summary() == []
    clock.advance(30)
    assert store.dmarc_summary() != []
    inbox.stopService()
    assert clock.getDelayedCalls() == []


# -- the admin command ---------------------------------------------------------------------------
def test_cli_import_and_show(tmp_path, capsys):
    config = tmp_path / "m.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n')
    report = tmp_path / "r.xml.gz"
    report.write_bytes(gzip.compress(DMARC_XML))
    message = tmp_path / "tls.eml"
    message.write_bytes(mail_with(gzip.compress(TLSRPT_JSON), "application", "tlsrpt+gzip",
                                  "r.json.gz"))
    assert main(["-c", str(config), "reports", "import", str(report), str(message)]) == 0
    assert main(["-c", str(config), "reports", "import", str(report)]) == 0
    out = capsys.readouterr().out
    assert "stored before" in out.splitlines()[-1]

    assert main(["-c", str(config), "reports", "dmarc", "example.org"]) == 0
    out = capsys.readouterr().out
    assert "example.org: 15 messages, DMARC pass 80%, fail 20%" in out
    assert "failing: 2001:db8::bad (3 of 3)" in out
    assert "192.0.2.25" in out and "big-provider.example" in out

    assert main(["-c", str(config), "reports", "tls"]) == 0
    out = capsys.readouterr().out
    assert "company-y.example: 5326 sessions ok, 303 failed" in out
    assert "certificate-expired" in out

    assert main(["-c", str(config), "reports", "dmarc", "nobody.test"]) == 0
    assert "no DMARC reports about nobody.test" in capsys.readouterr().out


def test_cli_import_of_a_bad_file_is_one_line(tmp_path, capsys):
    config = tmp_path / "m.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n')
    bomb = tmp_path / "bomb.xml"
    bomb.write_bytes(b"<!DOCTYPE x [<!ENTITY a 'b'>]><feedback>&a;</feedback>")
    assert main(["-c", str(config), "reports", "import", str(bomb)]) == 1
    captured = capsys.readouterr()
    assert "not acceptable XML" in captured.out
    assert captured.err == "mailsuite: 1 of 1 files could not be read\n"


def test_cli_send_refuses_without_sender(tmp_path, capsys):
    assert main(["reports", "send"]) == 1
    assert "[reports] sender is empty" in capsys.readouterr().err

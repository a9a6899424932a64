"""Sending reports (mailsuite/reports/sender.py, store.py) on a real SQLite directory with fakes
for DNS and the queue: who asked (rua), RFC 7489 §7.1's external-destination check, the
once-per-(kind, domain, day) claim shared by instances, the claim given back when the queue
fails, and the daily timer on a task.Clock."""
from __future__ import annotations

import email
import email.policy
import gzip
import json

import pytest
from twisted.internet import defer, task

from mailsuite.config import Config
from mailsuite.directory.store import DirectoryStore
from mailsuite.pools import InlinePool
from mailsuite.reports import DmarcEvaluation, TlsOutcome
from mailsuite.reports.inbound import parse_dmarc
from mailsuite.reports.record import day_range
from mailsuite.reports.sender import ReportSender, ReportService, mailto_destinations
from mailsuite.reports.store import ReportStore
from mailsuite.trust.dns import DnsTempError
from tests.unit.conftest import prepared_if_sqlite

DAY = "2026-11-27"
START, END = day_range(DAY)


class Zone:
    """DnsClient.query over a dict of TXT records; remembers the questions."""

    def __init__(self, txt: dict[str, list[str] | Exception]):
        self.txt = txt
        self.asked: list[str] = []

    def query(self, name: str, qtype: str) -> defer.Deferred:
        assert qtype == "TXT"
        self.asked.append(name)
        value = self.txt.get(name, [])
        if isinstance(value, Exception):
            return defer.fail(value)
        return defer.succeed([v.encode() for v in value])


class Queue:
    def __init__(self, fail: bool = False):
        self.submitted: list[tuple[str, list, bytes, dict]] = []
        self.fail = fail

    def submit(self, sender, recipients, data, meta):
        if self.fail:
            return defer.fail(OSError(28, "No space left on device"))
        self.submitted.append((sender, [a for a, _ in recipients], data, dict(meta)))
        return defer.succeed(f"q{len(self.submitted)}")


@pytest.fixture
def db_url(tmp_path):
    """The database under test; tests/scenario/test_reports_postgresql.py overrides it."""
    return "sqlite:///" + str(tmp_path / "d.db")


@pytest.fixture
def store(db_url, request):
    directory = DirectoryStore(prepared_if_sqlite(request, db_url))
    directory.prepare()
    yield ReportStore(directory)
    directory.close()


def config() -> Config:
    c = Config()
    c.server.hostname = "mx.a.test"
    c.reports.sender = "reports@a.test"
    return c


def sender(store, zone, queue=None, clock=None) -> ReportSender:
    clock = clock or task.Clock()
    if not clock.seconds():
        clock.advance(END + 3600)
    return ReportSender(config(), store, InlinePool(), InlinePool(), zone, queue or Queue(),
                        clock)


def evaluation(ip="192.0.2.1", dkim="pass", spf="pass", domain="b.test", day=DAY,
               disposition="none"):
    return DmarcEvaluation(day, domain, domain, domain, ip, disposition, dkim, spf,
                           dkim_results=((domain, "mail", dkim),),
                           spf_result=(domain, "mfrom", spf))


def run(d: defer.Deferred):
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred did not fire"
    if isinstance(results[0], Exception):
        raise results[0]
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


B_DMARC = {"_dmarc.b.test": ["v=DMARC1; p=reject; rua=mailto:dmarc@b.test"]}


def test_dmarc_report_for_a_domain_that_asks(store):
    for _ in range(3):
        store.record_dmarc(evaluation())
    store.record_dmarc(evaluation(ip="198.51.100.9", dkim="fail", spf="fail",
                                  disposition="reject"))
    store.record_dmarc(evaluation(day="2026-11-26"))  # another day: not in this report
    queue = Queue()
    lines = run(sender(store, Zone(B_DMARC), queue).send_day(DAY))
    assert lines == [f"dmarc b.test: queued q1 for {DAY} to dmarc@b.test"]
    [(from_, to, data, meta)] = queue.submitted
    assert (from_, to, meta["protocol"]) == ("reports@a.test", ["dmarc@b.test"], "REPORT")
    message = email.message_from_bytes(data, policy=email.policy.default)
    [attachment] = list(message.iter_attachments())
    report = parse_dmarc(gzip.decompress(attachment.get_content()))
    assert (report.domain, report.policy, report.begin, report.end) == ("b.test", "reject",
                                                                        START, END)
    assert sorted((r.source_ip, r.count, r.dkim) for r in report.records) == [
        ("192.0.2.1", 3, "pass"), ("198.51.100.9", 1, "fail")]


def test_no_rua_no_report(store):
    store.record_dmarc(evaluation())
    queue = Queue()
    lines = run(sender(store, Zone({"_dmarc.b.test": ["v=DMARC1; p=none"]}), queue)
                .send_day(DAY))
    assert lines == ["dmarc b.test: no rua= in its DMARC record, no report"]
    assert queue.submitted == []


def test_external_destination_needs_its_verification_record(store):
    store.record_dmarc(evaluation())
    zone = Zone({"_dmarc.b.test": ["v=DMARC1; p=none; rua=mailto:agg@reports.example,"
                                   "mailto:d@b.test"]})
    queue = Queue()
    run(sender(store, zone, queue).send_day(DAY))
    assert "b.test._report._dmarc.reports.example" in zone.asked
    assert queue.submitted[0][1] == ["d@b.test"]  # the unverified one is left out

    store.record_dmarc(evaluation(day="2026-11-28"))
    zone.txt["b.test._report._dmarc.reports.example"] = ["v=DMARC1"]
    run(sender(store, zone, queue).send_day("2026-11-28"))
    assert queue.submitted[1][1] == ["agg@reports.example", "d@b.test"]


def test_only_unverified_destinations_means_no_report(store):
    store.record_dmarc(evaluation())
    queue = Queue()
    lines = run(sender(store, Zone({"_dmarc.b.test": ["v=DMARC1; p=none; "
                                                      "rua=mailto:agg@reports.example"]}),
                       queue).send_day(DAY))
    assert "no rua= destination accepts reports" in lines[0]
    assert queue.submitted == []


def test_a_report_is_sent_once_per_day_whatever_the_instances(store, tmp_path):
    """Two senders (two instances) on one database: the claim lets one of them send; running
    again the same day sends nothing."""
    store.record_dmarc(evaluation())
    store.record_tls(TlsOutcome(DAY, "b.test", "mx.b.test", "192.0.2.7", "success"))
    zone = Zone({**B_DMARC, "_smtp._tls.b.test": ["v=TLSRPTv1; rua=mailto:tls@b.test"]})
    other = ReportStore(DirectoryStore(store.directory.url))
    other.directory.prepare()
    first, second = Queue(), Queue()
    run(sender(store, zone, first).send_day(DAY))
    lines = run(sender(other, zone, second).send_day(DAY))
    assert len(first.submitted) == 2 and second.submitted == []
    assert all("already sent" in line for line in lines)
    run(sender(store, zone, first).send_day(DAY))
    assert len(first.submitted) == 2


def test_claim_is_given_back_when_the_queue_fails(store):
    store.record_dmarc(evaluation())
    lines = run(sender(store, Zone(B_DMARC), Queue(fail=True)).send_day(DAY))
    assert "not sent: OSError" in lines[0]
    queue = Queue()
    run(sender(store, Zone(B_DMARC), queue).send_day(DAY))
    assert len(queue.submitted) == 1


def test_dns_trouble_for_one_domain_does_not_stop_the_others(store):
    store.record_dmarc(evaluation(domain="b.test"))
    store.record_dmarc(evaluation(domain="c.test"))
    zone = Zone({"_dmarc.b.test": DnsTempError("SERVFAIL"),
                 "_dmarc.c.test": ["v=DMARC1; p=none; rua=mailto:d@c.test"]})
    queue = Queue()
    lines = run(sender(store, zone, queue).send_day(DAY))
    assert "b.test: not sent: DnsTempError" in lines[0]
    assert [s[1] for s in queue.submitted] == [["d@c.test"]]
    # Nothing was claimed for b.test: tomorrow's run (or a rerun) may still send it.
    zone.txt["_dmarc.b.test"] = ["v=DMARC1; p=none; rua=mailto:d@b.test"]
    run(sender(store, zone, queue).send_day(DAY))
    assert [s[1] for s in queue.submitted] == [["d@c.test"], ["d@b.test"]]


def test_tls_report(store):
    for result in ("success", "success", "starttls-not-supported"):
        store.record_tls(TlsOutcome(DAY, "b.test", "mx.b.test", "192.0.2.7", result))
    zone = Zone({"_smtp._tls.b.test": ["v=TLSRPTv1; rua=mailto:tls@b.test,https://r.b.test/"]})
    queue = Queue()
    lines = run(sender(store, zone, queue).send_day(DAY))
    assert lines == [f"tlsrpt b.test: queued q1 for {DAY} to tls@b.test"]
    message = email.message_from_bytes(queue.submitted[0][2], policy=email.policy.default)
    attachment = list(message.iter_parts())[1]
    report = json.loads(gzip.decompress(attachment.get_content()))
    assert report["policies"][0]["summary"] == {"total-successful-session-count": 2,
                                                "total-failure-session-count": 1}


@pytest.mark.parametrize("records", [[], ["v=TLSRPTv1; rua=https://r.b.test/"],
                                     ["v=TLSRPTv1; rua=mailto:a@b.test",
                                      "v=TLSRPTv1; rua=mailto:c@b.test"]])
def test_tls_report_needs_one_record_with_mailto(store, records):
    store.record_tls(TlsOutcome(DAY, "b.test", "mx.b.test", "192.0.2.7", "success"))
    queue = Queue()
    run(sender(store, Zone({"_smtp._tls.b.test": records}), queue).send_day(DAY))
    assert queue.submitted == []


def test_old_data_is_purged(store):
    store.record_dmarc(evaluation(day="2026-10-01"))
    store.record_dmarc(evaluation())
    run(sender(store, Zone({}), Queue()).send_day(DAY))
    assert list(store.dmarc_day("2026-10-01")) == []
    assert list(store.dmarc_day(DAY)) == ["b.test"]


def test_mailto_destinations():
    assert mailto_destinations(["mailto:a@b.test!10m", "https://x/", "mailto:c%40d@e.test",
                                "mailto:A@b.test", "mailto:bad", "mailto:x@y.test?subject=z"]) == [
        ("a@b.test", 10 * 1024 * 1024), ("c@d@e.test", 0), ("x@y.test", 0)]


def test_size_limit_leaves_out_a_destination(store):
    store.record_dmarc(evaluation())
    zone = Zone({"_dmarc.b.test": ["v=DMARC1; p=none; rua=mailto:small@b.test!1k,"
                                   "mailto:big@b.test"]})
    queue = Queue()
    run(sender(store, zone, queue).send_day(DAY))
    assert queue.submitted[0][1] == ["big@b.test"]


# -- the daily timer -----------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.days: list[str] = []

    def send_day(self, day):
        self.days.append(day)
        return defer.succeed([])


def test_daily_timer_sends_yesterday_at_send_at():
    clock = task.Clock()
    clock.advance(START + 300)  # 00:05 UTC on DAY, before send_at (600 s)
    fake = Recorder()
    service = ReportService(fake, clock, 600)
    service.startService()
    assert fake.days == []
    clock.advance(299)
    assert fake.days == []
    clock.advance(1)
    assert fake.days == ["2026-11-26"]
    clock.advance(86400)
    assert fake.days == ["2026-11-26", DAY]
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_daily_timer_catches_up_at_start_after_send_at():
    clock = task.Clock()
    clock.advance(START + 15 * 3600)
    fake = Recorder()
    service = ReportService(fake, clock, 600)
    service.startService()
    clock.advance(0)
    assert fake.days == ["2026-11-26"]
    [call] = clock.getDelayedCalls()
    assert call.getTime() == START + 86400 + 600
    service.stopService()

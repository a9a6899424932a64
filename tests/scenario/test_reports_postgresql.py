"""The report tables on a real PostgreSQL server: the unit layer's sending tests again (each on
a fresh schema), then instances racing for one day's claims in threads of their own: exactly
one wins each (kind, domain, day), and a report delivered to two instances is stored once.

PostgreSQL comes from $MAILSUITE_TEST_PG, else 127.0.0.1:5432 as postgres or root; without one
these tests skip with the reason (and fail under CI: tests/environment.py).
"""
from __future__ import annotations

import threading

from mailsuite.directory import DirectoryStore
from mailsuite.reports.inbound import parse_dmarc
from mailsuite.reports.store import ReportStore
from tests.scenario.test_directory_postgresql import (  # noqa: F401 (a fresh schema per test)
    db_url, postgresql)
from tests.unit.test_reports_inbound import DMARC_XML
from tests.unit.test_reports_sending import (  # noqa: F401 (collected here on PostgreSQL)
    store, test_a_report_is_sent_once_per_day_whatever_the_instances,
    test_claim_is_given_back_when_the_queue_fails, test_dmarc_report_for_a_domain_that_asks,
    test_old_data_is_purged, test_tls_report)


def race(db_url: str, fn, threads: int = 8) -> list:
    stores = [ReportStore(DirectoryStore(db_url)) for _ in range(2)]
    stores[0].directory.prepare()
    barrier = threading.Barrier(threads)
    results: list = []

    def worker(s):
        barrier.wait()
        results.append(fn(s))

    workers = [threading.Thread(target=worker, args=(stores[i % 2],)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    for s in stores:
        s.directory.close()
    return results


def test_one_claim_wins_among_racing_instances(db_url):
    results = race(db_url, lambda s: s.claim("dmarc", "b.test", "2026-11-27", 0))
    assert sorted(results) == [False] * 7 + [True]


def test_a_report_read_by_racing_instances_is_stored_once(db_url):
    report = parse_dmarc(DMARC_XML)
    results = race(db_url, lambda s: s.store_dmarc(report, 0))
    assert sorted(results) == [False] * 7 + [True]
    check = ReportStore(DirectoryStore(db_url))
    assert sum(r.messages for r in check.dmarc_summary()) == 15
    check.directory.close()

"""A real Prometheus (Debian `prometheus`) scrapes the real server's metrics listener; after a
message through the MX port, its HTTP API shows the counter of accepted messages moved
(docs/design/metrics.md, "Tests")."""
from __future__ import annotations

import smtplib

import pytest

from tests.daemons import PrometheusDaemon
from tests.environment import require_program
from tests.harness import HOST
from tests.polling import wait_until

pytestmark = pytest.mark.external


@pytest.fixture(scope="module", autouse=True)
def prometheus_installed():
    require_program("prometheus", "prometheus")


def test_prometheus_sees_the_accepted_message(server, tmp_path):
    target = f"{HOST}:{server.ports['metrics']}"
    with PrometheusDaemon(str(tmp_path / "prometheus"), targets=[target]) as prometheus:
        # The first scrape: the target is up and the counter exists, still at 0.
        up = wait_until(lambda: prometheus.query(f'up{{instance="{target}"}} == 1'),
                        timeout=60, interval=0.5, message="Prometheus to scrape mailsuite")
        assert up[0][0]["job"] == "mailsuite"
        [(_, before)] = wait_until(
            lambda: prometheus.query("sum(mailsuite_messages_accepted_total)"),
            timeout=60, interval=0.5, message="the accepted-messages counter in Prometheus")
        assert before == 0
        with smtplib.SMTP(HOST, server.ports["mx"], timeout=30) as smtp:
            smtp.sendmail("carol@remote.example", ["alice@example.org", "bob@example.org"],
                          b"From: carol@remote.example\r\nSubject: scraped\r\n\r\nHello.\r\n")

        def moved() -> list:
            return prometheus.query("sum(mailsuite_messages_accepted_total) >= 1")

        [(_, after)] = wait_until(moved, timeout=60, interval=0.5,
                                  message="Prometheus to see the accepted message")
        assert after == 1
        deliveries = wait_until(
            lambda: prometheus.query('mailsuite_deliveries_total{kind="local",status="sent"} '
                                     '>= 2'), timeout=60, interval=0.5,
            message="Prometheus to see both local deliveries")
        assert deliveries[0][1] == 2

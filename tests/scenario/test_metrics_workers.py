"""/metrics of a server with [server] workers = 2 (docs/design/metrics.md, "Worker processes"):
the page adds up both processes' counts, and the queue both see in the one spool is counted
once."""
from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import time

import pytest

from tests.harness import HOST, MailServer, free_port
from tests.polling import wait_until
from tests.scenario.test_metrics import sample, scrape
from tests.scenario.test_workers import ALICE, PASSWORD, worker_pids

ACCEPTED = "mailsuite_messages_accepted_total"


@pytest.fixture
def server(tmp_path):
    # Remote mail goes to a smarthost that refuses connections: each message stays in the
    # spool, deferred, where both processes' queue runners see it at their next scan.
    srv = MailServer(str(tmp_path), extra={
        "server": {"workers": 2},
        "queue": {"scan_interval": 0.5},
        "courier": {"relay": f"{HOST}:{free_port()}", "relay_tls": "none"}})
    srv.add_user(ALICE, PASSWORD)
    srv.start()
    wait_until(lambda: worker_pids(srv), timeout=60, message="the worker process")
    yield srv
    srv.stop()


def accepted_by(srv: MailServer) -> dict[int, int]:
    """pid -> messages that process accepted, from the log."""
    counts: dict[int, int] = {}
    for pid in re.findall(r"\[pid=(\d+) mailsuite\.smtp\.server#info\] accepted \w+",
                          srv.log_text()):
        counts[int(pid)] = counts.get(int(pid), 0) + 1
    return counts


def submit(srv: MailServer, n: int) -> None:
    with smtplib.SMTP(HOST, srv.ports["submission"], timeout=30) as smtp:
        smtp.starttls(context=srv.ssl_context())
        smtp.login(ALICE, PASSWORD)
        smtp.sendmail(ALICE, ["someone@remote.example"],
                      f"From: {ALICE}\r\nTo: someone@remote.example\r\nSubject: m{n}\r\n\r\n"
                      f"held in the queue\r\n")


def test_metrics_add_up_both_processes_and_count_the_queue_once(server):
    first, worker = server.process.pid, worker_pids(server)[0]
    started = time.time()
    sent = 0
    while sent < 4 or len(accepted_by(server)) < 2:  # each connection may land in either
        assert sent < 60, f"60 connections did not reach both processes: {accepted_by(server)}"
        submit(server, sent)
        sent += 1
        wait_until(lambda: sum(accepted_by(server).values()) == sent, message="the log line")
    assert set(accepted_by(server)) == {first, worker}
    # Counted in each process before its "accepted" line: every one of them is on the page.
    assert sample(scrape(server), ACCEPTED, origin="smtp", tls="yes") == sent

    def all_deferred() -> dict | None:
        now = scrape(server)
        deferred = sample(now, "mailsuite_deliveries_total", kind="remote", status="deferred")
        return now if deferred >= sent else None

    after = wait_until(all_deferred, timeout=30, interval=0.2, message="every message deferred")
    assert sample(after, ACCEPTED, origin="smtp", tls="yes") == sent
    assert sample(after, "mailsuite_processes", state="answered") == 2
    assert sample(after, "mailsuite_processes", state="missing") == 0
    assert sample(after, "mailsuite_sessions_total", listener="submission") == sent
    # Both runners rescan the spool twice a second: over several scans, each sees every entry,
    # and the page says `sent` entries, never twice as many.
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        now = scrape(server)
        assert sample(now, "mailsuite_queue_entries") <= sent
        assert sample(now, "mailsuite_queue_oldest_entry_age_seconds") <= \
            time.time() - started + 1.5
    assert sample(now, "mailsuite_queue_entries") == sent
    # Stopped, the server leaves no socket behind and logs no error about them.
    run = os.path.join(server.data_dir, "run")
    assert os.listdir(run) == [f"metrics-{socket.gethostname()}-{first}"]
    server.stop()
    assert os.listdir(run) == []
    assert "Traceback" not in server.log_text()


def test_a_worker_that_does_not_answer_is_counted_missing(server):
    worker = worker_pids(server)[0]
    os.kill(worker, signal.SIGSTOP)
    try:
        missing = scrape(server)
    finally:
        os.kill(worker, signal.SIGCONT)
    assert sample(missing, "mailsuite_processes", state="answered") == 1
    assert sample(missing, "mailsuite_processes", state="missing") == 1
    assert ("mailsuite_queue_entries", frozenset()) in missing  # the first process's figures
    assert f"worker pid {worker} gave no metrics" in server.log_text()
    answered = wait_until(
        lambda: (s := scrape(server)) and sample(s, "mailsuite_processes", state="answered") == 2
        and s, message="the worker to answer again")
    assert sample(answered, "mailsuite_processes", state="missing") == 0

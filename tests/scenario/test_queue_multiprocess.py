"""Several queue runner processes on one spool deliver every message exactly once.

The child processes are real runners (`python -m tests.scenario.test_queue_multiprocess ...`)
on their own reactors and thread pools, started together on a spool full of entries, so they race
for every entry.
"""
from __future__ import annotations

import collections
import email
import os
import subprocess
import sys
import time

from mailsuite.mailbox.store import MailStore
from mailsuite.queue.spool import QueueEntry, Recipient, Spool, new_queue_id
from tests.polling import wait_until
from tests.unit.queuekit import make_config, message

ALICE = "alice@example.org"
BOB = "bob@example.org"


def test_two_runner_processes_deliver_each_message_exactly_once(tmp_path):
    data_dir = str(tmp_path / "data")
    config = make_config(data_dir)
    spool = Spool(config.queue_dir)
    spool.ensure()
    count = 150
    for i in range(count):
        entry = QueueEntry(new_queue_id(), "carol@remote.example",
                           [Recipient(ALICE, ALICE, True), Recipient(BOB, BOB, True)],
                           time.time())
        spool.store(entry, message(f"m{i:04d}"))
    go = str(tmp_path / "go")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ready = [str(tmp_path / f"ready{n}") for n in range(2)]
    children = [subprocess.Popen([sys.executable, "-m", "tests.scenario.test_queue_multiprocess",
                                  data_dir, go, str(tmp_path / f"log{n}"), ready[n]], cwd=repo)
                for n in range(2)]
    try:
        # Both have imported everything and built their runners; then both start at once.
        wait_until(lambda: all(os.path.exists(r) for r in ready), timeout=30,
                   message="both runner processes ready")
        open(go, "w").close()
        for child in children:
            assert child.wait(60) == 0
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert spool.ids() == []
    store = MailStore(config.mail_dir)
    for address in (ALICE, BOB):
        new = os.path.join(store.account(address).path, "new")
        subjects = collections.Counter()
        for name in os.listdir(new):
            with open(os.path.join(new, name), "rb") as f:
                subjects[email.message_from_bytes(f.read())["Subject"]] += 1
        assert len(subjects) == count
        assert set(subjects.values()) == {1}, [s for s, n in subjects.items() if n > 1]
        assert os.listdir(os.path.join(store.account(address).path, "tmp")) == []
    sent = [sum(line.count("status=sent") for line in open(tmp_path / f"log{n}"))
            for n in range(2)]
    assert sum(sent) == 2 * count
    print("deliveries per process:", sent)


def run_child(data_dir: str, go: str, log_path: str, ready: str) -> None:
    """A runner process: say it is ready, wait for `go`, deliver until the spool is empty, exit."""
    from twisted.internet import reactor, task
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from mailsuite.pools import Pools
    from tests.unit.queuekit import build_runner

    log_file = open(log_path, "w")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)])
    pools = Pools(reactor=reactor)
    runner = build_runner(make_config(data_dir, scan_interval=0.2), pools.io, reactor)
    open(ready, "w").close()
    wait_until(lambda: os.path.exists(go), timeout=30, interval=0.005, message="go")
    pools.startService()
    runner.startService()

    def check() -> None:
        if not runner.spool.ids() and not runner._inflight:
            loop.stop()
            runner.stopService()
            pools.stopService()
            reactor.stop()

    loop = task.LoopingCall(check)
    loop.start(0.1, now=False)
    reactor.callLater(50, reactor.stop)
    reactor.run()
    log_file.close()


if __name__ == "__main__":
    run_child(*sys.argv[1:5])

#!/usr/bin/env python3
"""What one Prometheus scrape costs the reactor: the time to render a registry in which every
label set of a busy server has a value (every IMAP command, every SMTP reply reason on each SMTP
listener, every listener, every delivery kind and outcome). docs/design/metrics.md, "Cost".

    PYTHONPATH=$PWD python bench/metrics_render.py [--renders 200]

Prints the size of the page and the milliseconds per render.
"""
from __future__ import annotations

import argparse
import time

from prometheus_client import generate_latest

from mailsuite.imap.server import COMMANDS
from mailsuite.metrics import Metrics
from mailsuite.smtp import replies

LISTENERS = ("mx", "submission", "submissions", "imap", "imaps", "pop3", "pop3s", "autoconfig",
             "metrics")


class _Listener:
    def __init__(self, name: str):
        self.name = name
        self.admitted = self.refusals = self.evictions = self.logins = self.sessions = 1
        self.open_connections = 1


def busy_metrics() -> Metrics:
    metrics = Metrics()
    for command in {name for names in COMMANDS.values() for name in names}:
        metrics.imap_command(command.encode(), 0.01)
    reasons = {r.reason for r in vars(replies).values() if isinstance(r, replies.Reply)}
    for listener in LISTENERS[:3]:
        for reason in reasons:
            metrics.smtp_reply(listener, 550, reason)
    for listener in LISTENERS:
        metrics.watch_listener(_Listener(listener))
    for local in (True, False):
        for status in ("sent", "deferred", "bounced"):
            metrics.delivery(local, status, 3.0)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--renders", type=int, default=200)
    args = parser.parse_args()
    registry = busy_metrics().registry
    page = generate_latest(registry)
    started = time.perf_counter()
    for _ in range(args.renders):
        generate_latest(registry)
    per_render = (time.perf_counter() - started) / args.renders
    print(f"{len(page.splitlines())} lines, {len(page)} bytes: "
          f"{per_render * 1000:.2f} ms per render")


if __name__ == "__main__":
    main()

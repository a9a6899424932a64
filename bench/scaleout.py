#!/usr/bin/env python3
"""Messages per second and IMAP sessions with 1, 2 and 3 mailsuite instances on one PostgreSQL
directory and one data_dir (docs/scale-out.md, "Measured limits").

    python bench/scaleout.py                                   # 1, 2, 3 instances, the doc's sizes
    python bench/scaleout.py --instances 2 --messages 20 --sessions 10 --json out.json   # smoke

For each instance count: a fresh PostgreSQL database (created on --database-url's server and
dropped after), one data_dir, and N `twistd -n mailsuite` processes (tests/harness.py), each on
its own MX and IMAPS ports, started one after the other (the first creates the certificate the
others share). Then:

- SMTP: --streams `smtp-source` clients (Postfix's load generator), stream j on the MX port of
  instance j mod N, to its own recipient; msg/s counts from the start until every message is a
  file in the Maildirs (new/ or cur/).
- IMAP: for each of --sessions, that many clients connect at once (TLS), LOGIN, SELECT INBOX and
  IDLE, client i on instance i mod N as one of --users users; the time until all idle, how many
  did, and the PSS of each instance while they idle. Every user logs in on every instance once
  before (a warm login cache: the storms measure sessions, not argon2).

Prints one table row per instance count; --json FILE writes the rows and the machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)

from compare import _cpu_model  # noqa: E402
from imap_clients import Client, Target, connect_storm  # noqa: E402
from servers import bench_settings  # noqa: E402
from smtp_source import count_files  # noqa: E402
from tests.daemons import process_tree, pss_kib  # noqa: E402
from tests.harness import MailServer  # noqa: E402
from tests.polling import wait_until  # noqa: E402

DOMAIN = "bench.test"
PASSWORD = "bench-pw-1"
PUBLIC_NAME = "mx.bench.test"  # every instance answers as the one name clients know
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@dataclass
class Storm:
    sessions: int
    idling: int  # sessions that reached IDLE
    seconds: float  # first connect until all idle (or failed)
    pss_mib: list[float]  # each instance, while they idle


@dataclass
class Row:
    instances: int
    messages: int
    msg_per_s: float
    idle_pss_mib: list[float]  # each instance after start, before any load
    storms: list[Storm] = field(default_factory=list)
    tracebacks: int = 0  # in the instances' logs: a run with any is not a measurement


# -- the instances ------------------------------------------------------------------------------

class Cluster:
    """N mailsuite processes on one database and one data_dir, each with its own ports."""

    def __init__(self, base: str, count: int, database_url: str, max_clients: int):
        self.data_dir = os.path.join(base, "shared-data")
        settings = bench_settings(max_clients, workers=1)  # one process per instance
        settings["server"] = {"data_dir": self.data_dir}
        settings["database"] = {"url": database_url}
        self.servers = [MailServer(os.path.join(base, f"instance{n + 1}"), hostname=PUBLIC_NAME,
                                   listeners=["mx", "imaps"], extra=settings)
                        for n in range(count)]
        for server in self.servers:
            server.data_dir = self.data_dir  # for MailServer.maildir()

    def add_users(self, users: list[str]) -> None:
        store = self.servers[0].directory()  # the one database every instance reads
        try:
            store.add_domain(DOMAIN)
            for user in users:
                store.add_user(user, PASSWORD)
        finally:
            store.close()

    def start(self) -> None:
        for server in self.servers:
            server.start(timeout=120)

    def stop(self) -> int:
        """Stop every instance; the number of tracebacks in their logs."""
        found = 0
        for server in self.servers:
            server.stop()
            found += server.log_text().count("Traceback")
        return found

    def pss_mib(self) -> list[float]:
        return [round(pss_kib(process_tree(s.process.pid)) / 1024, 1) for s in self.servers]

    def maildir(self, user: str) -> str:
        return self.servers[0].maildir(user)

    def targets(self, users: list[str], timeout: float) -> list[Target]:
        """Instance varies fastest, then user: client i -> instance i mod N."""
        return [Target(port=self.servers[k % len(self.servers)].ports["imaps"], tls="implicit",
                       user=users[(k // len(self.servers)) % len(users)], password=PASSWORD,
                       timeout=timeout)
                for k in range(len(self.servers) * len(users))]


def private_database(base_url: str) -> tuple[str, str]:
    """Create a database of our own beside `base_url`'s; (its URL, its name)."""
    from sqlalchemy.engine import make_url

    name = f"bench_scaleout_{secrets.token_hex(4)}"
    _run_outside_transaction(base_url, f'CREATE DATABASE "{name}"')
    return make_url(base_url).set(database=name).render_as_string(hide_password=False), name


def drop_database(base_url: str, name: str) -> None:
    _run_outside_transaction(base_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _run_outside_transaction(url: str, statement: str) -> None:
    """CREATE/DROP DATABASE refuse to run inside a transaction block."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


# -- the workloads ------------------------------------------------------------------------------

def smtp_rate(cluster: Cluster, recipients: list[str], messages: int, sessions: int, size: int,
              timeout: float) -> float:
    """Messages delivered into the Maildirs per second, `smtp-source` stream j (one per
    recipient) on instance j mod N."""
    streams = len(recipients)
    maildirs = [cluster.maildir(r) for r in recipients]
    before = sum(count_files(m) for m in maildirs)
    shares = [messages // streams + (1 if j < messages % streams else 0) for j in range(streams)]
    started = time.monotonic()
    procs = [subprocess.Popen(
        ["smtp-source", "-s", str(max(1, sessions // streams)), "-m", str(shares[j]),
         "-l", str(size), "-f", "sender@remote.example", "-t", recipients[j],
         f"127.0.0.1:{cluster.servers[j % len(cluster.servers)].ports['mx']}"])
        for j in range(streams) if shares[j]]
    try:
        wait_until(lambda: sum(count_files(m) for m in maildirs) - before >= messages,
                   timeout=timeout, interval=0.02, message=f"{messages} messages in the Maildirs")
        elapsed = time.monotonic() - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return messages / elapsed


async def warm_logins(targets: list[Target]) -> None:
    """Each (instance, user) logs in once, a few at a time."""
    limit = asyncio.Semaphore(8)

    async def one(target: Target) -> None:
        async with limit:
            client = Client(target)
            await asyncio.wait_for(client.connect(), target.timeout)
            await asyncio.wait_for(client.login(), target.timeout)
            await client.close()

    await asyncio.gather(*(one(t) for t in targets))


def imap_storm(cluster: Cluster, targets: list[Target], sessions: int) -> Storm:
    pss: list[float] = []
    result = asyncio.run(connect_storm(targets, sessions,
                                       while_idle=lambda: pss.extend(cluster.pss_mib())))
    return Storm(sessions, sessions - result.failed, round(result.seconds, 2), pss)


def measure(count: int, args: argparse.Namespace, base: str) -> Row:
    users = [f"user{n:03d}@{DOMAIN}" for n in range(max(args.users, args.streams))]
    url, name = private_database(args.database_url)
    # Half of max_connections is for sessions not logged in yet (docs/design/limits.md): a
    # storm arrives all at once, before any login, so twice the storm fits.
    cluster = Cluster(os.path.join(base, f"n{count}"), count, url, 2 * max(args.sessions) + 100)
    try:
        cluster.add_users(users)
        cluster.start()
        row = Row(count, args.messages, 0.0, cluster.pss_mib())
        row.msg_per_s = round(smtp_rate(cluster, users[:args.streams], args.messages,
                                        args.smtp_sessions, args.size, args.timeout), 1)
        targets = cluster.targets(users[:args.users], args.timeout)
        asyncio.run(warm_logins(targets))
        for sessions in args.sessions:
            row.storms.append(imap_storm(cluster, targets, sessions))
    finally:
        tracebacks = cluster.stop()
        drop_database(args.database_url, name)
    row.tracebacks = tracebacks
    if tracebacks:
        print(f"{tracebacks} tracebacks in the logs of {count} instance(s) (--keep to read "
              f"them under {base})", file=sys.stderr)
    return row


# -- output -------------------------------------------------------------------------------------

def table(rows: list[Row]) -> str:
    """One line per instance count; a storm's cell is "seconds idling/sessions"."""
    sizes = [s.sessions for s in rows[0].storms] if rows else []
    lines = [f"{'instances':>9}  {'msg/s':>7}  " +
             "  ".join(f"{f'{n} IMAP sessions':>18}" for n in sizes) +
             f"  {'PSS MiB/instance idle':>21}" + (f"  {f'at {sizes[-1]}':>8}" if sizes else "")]
    for row in rows:
        cells = "".join(f"  {f'{s.seconds:.2f} s {s.idling}/{s.sessions}':>18}"
                        for s in row.storms)
        at_max = f"  {_mean(row.storms[-1].pss_mib):>8.1f}" if row.storms else ""
        lines.append(f"{row.instances:>9}  {row.msg_per_s:>7.1f}{cells}  "
                     f"{_mean(row.idle_pss_mib):>21.1f}{at_max}")
    return "\n".join(lines)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def machine() -> dict:
    return {"cpus": os.cpu_count(), "processor": _cpu_model(), "platform": platform.platform(),
            "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--messages", type=int, default=3000, help="SMTP messages per instance count")
    p.add_argument("--size", type=int, default=2048, help="octets per message")
    p.add_argument("--streams", type=int, default=6,
                   help="smtp-source processes (one recipient each; 6 divides by 1, 2 and 3)")
    p.add_argument("--smtp-sessions", type=int, default=24, help="SMTP sessions in all")
    p.add_argument("--sessions", type=int, nargs="+", default=[200, 500, 1000],
                   help="IMAP session counts, each a storm of its own")
    p.add_argument("--users", type=int, default=20, help="IMAP users the sessions spread over")
    p.add_argument("--database-url", default=os.environ.get("MAILSUITE_TEST_PG", DEFAULT_PG),
                   help="a PostgreSQL URL whose server may create databases")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", default="", help="also write the rows to this file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    os.environ["PATH"] += os.pathsep + "/usr/sbin"
    if shutil.which("smtp-source") is None:
        p.error("smtp-source not found (Debian package postfix)")
    # Every IMAP client is a descriptor of this process too.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    base = tempfile.mkdtemp(prefix="scaleout-")
    rows: list[Row] = []
    try:
        for count in args.instances:
            rows.append(measure(count, args, base))
            print(f"{count} instance(s) done", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(table(rows))
    if any(row.tracebacks for row in rows):
        print("tracebacks in the server logs: see above", file=sys.stderr)
        status = 1
    else:
        status = 0
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "machine": machine(),
                       "rows": [asdict(r) for r in rows]}, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())

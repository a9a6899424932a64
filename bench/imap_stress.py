#!/usr/bin/env python3
"""imaptest stress throughput (commands per second) against any IMAP server.

    python bench/imap_stress.py --port 993 --user u --password p --clients 10 --secs 20
    python bench/imap_stress.py ... --profile logout0         # imaptest logout=0
    python bench/imap_stress.py --start-server --clients 50   # a throwaway mailsuite
    python bench/imap_stress.py --start-server --workers 2    # IMAP in two processes

Runs imaptest (Dovecot's stress tool, tools/imaptest; $MAILSUITE_IMAPTEST, else
/tmp/imaptest-build/src/imaptest) with its default profile, or with `logout=0` (clients stay
logged in), on an mbox generated like tests/interop/test_imaptest.py's. The figure is the sum of
imaptest's "Totals" command counts divided by the run's seconds; `Error:` lines are counted.
With `--pid` (or `--start-server`) the server's CPU seconds per 1,000 commands are printed too
(user + system time from /proc/PID/stat, before and after): the figure that survives a busy
machine. `--runs N` repeats the measurement (a fresh server each time with `--start-server`)
and prints the medians.

Importable: `run_stress(StressTarget, clients, secs, profile)` returns a StressResult.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.smtp_source import cpu_seconds  # noqa: E402
PROFILES = {"default": [], "logout0": ["logout=0"]}


@dataclass
class StressTarget:
    host: str = "127.0.0.1"
    port: int = 993
    ssl: bool = True  # implicit TLS (imaptest ssl=any-cert)
    user: str = "stress@example.org"
    password: str = "pw1"


@dataclass
class StressResult:
    clients: int
    secs: int
    profile: str
    commands: int
    errors: int
    cpu_seconds: float = 0.0  # the server's, during the run (0: not measured)

    @property
    def per_second(self) -> float:
        return self.commands / self.secs

    @property
    def cpu_per_1000(self) -> float:
        return self.cpu_seconds * 1000 / self.commands if self.commands else 0.0


def imaptest_binary() -> str:
    for path in (os.environ.get("MAILSUITE_IMAPTEST"), "/tmp/imaptest-build/src/imaptest"):
        if path and os.access(path, os.X_OK):
            return path
    raise SystemExit("imaptest is not built: set MAILSUITE_IMAPTEST (see .ci/run)")


def stress_mbox(path: str, count: int = 300) -> str:
    if not os.path.exists(path):
        from tests.interop.test_imaptest import generate_mbox
        generate_mbox(path, count)
    return path


def run_stress(target: StressTarget, clients: int = 10, secs: int = 20,
               profile: str = "default", mbox: str | None = None,
               pid: int | None = None) -> StressResult:
    mbox = mbox or stress_mbox(os.path.join(tempfile.gettempdir(), "imap-stress.mbox"))
    cmd = [imaptest_binary(), f"host={target.host}", f"port={target.port}",
           f"user={target.user}", f"pass={target.password}", f"mbox={mbox}",
           f"clients={clients}", f"secs={secs}", *PROFILES[profile]]
    if target.ssl:
        cmd.append("ssl=any-cert")
    env = dict(os.environ, LD_LIBRARY_PATH="/usr/lib/dovecot")
    cpu_before = cpu_seconds(pid)
    out = subprocess.run(cmd, env=env, capture_output=True, timeout=secs + 120,
                         stdin=subprocess.DEVNULL)
    cpu = cpu_seconds(pid) - cpu_before
    text = (out.stdout + out.stderr).decode("utf-8", "replace")
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    for line in errors[:5]:
        print(line, file=sys.stderr)
    totals = text.split("Totals:", 1)
    if len(totals) != 2:
        raise RuntimeError(f"no totals in imaptest's output:\n{text[-2000:]}")
    numbers = [line.split() for line in totals[1].splitlines()]
    counts = [int(n) for n in next(row for row in reversed(numbers)
                                   if row and all(n.isdigit() for n in row))]
    return StressResult(clients, secs, profile, sum(counts), len(errors), cpu)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=993)
    p.add_argument("--no-ssl", action="store_true", help="plain IMAP (not for mailsuite)")
    p.add_argument("--user", default="stress@example.org")
    p.add_argument("--password", default="pw1")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--secs", type=int, default=20)
    p.add_argument("--profile", choices=sorted(PROFILES), default="default")
    p.add_argument("--runs", type=int, default=1, help="repeat and print the medians")
    p.add_argument("--pid", type=int, default=None,
                   help="server pid (with --port): report its CPU per 1,000 commands")
    p.add_argument("--start-server", action="store_true",
                   help="start a throwaway mailsuite (tests/harness.py) and measure it")
    p.add_argument("--workers", type=int, default=1,
                   help="with --start-server: processes sharing the IMAP listeners (CPU is "
                        "summed over them)")
    args = p.parse_args(argv)
    results = [measure(args) for _ in range(args.runs)]
    for r in results:
        print(describe(r))
    if args.runs > 1:
        print(f"median of {args.runs}: {statistics.median(r.per_second for r in results):.0f} "
              f"cmd/s, server cpu {statistics.median(r.cpu_per_1000 for r in results):.3f} "
              f"s per 1000 commands, errors {sum(r.errors for r in results)}")
    return 0


def measure(args: argparse.Namespace) -> StressResult:
    """One run, on a fresh server with --start-server."""
    target = StressTarget(args.host, args.port, not args.no_ssl, args.user, args.password)
    if not args.start_server:
        return run_stress(target, args.clients, args.secs, args.profile, pid=args.pid)
    from bench.imap_clients import start_server
    server = start_server(tempfile.mkdtemp(prefix="imap-stress-"), args.user, args.password,
                          args.workers)
    target.port = server.ports["imaps"]
    try:
        return run_stress(target, args.clients, args.secs, args.profile,
                          pid=server.process.pid)
    finally:
        server.stop()


def describe(r: StressResult) -> str:
    cpu = f", server cpu {r.cpu_per_1000:.3f} s per 1000 commands" if r.cpu_seconds else ""
    return (f"imaptest {r.profile} profile, {r.clients} clients, {r.secs} s: "
            f"{r.per_second:.0f} cmd/s ({r.commands} commands, {r.errors} errors){cpu}")


if __name__ == "__main__":
    sys.exit(main())

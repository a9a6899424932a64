#!/usr/bin/env python3
"""mailsuite beside Debian's Postfix + Dovecot, the same workloads on each, alternated.

    python bench/compare.py                                   # the issue's sizes, 3 rounds
    python bench/compare.py --rounds 1 --messages 200 --smtp-messages 50 --clients 5 \\
        --imaptest-secs 2                                      # a smoke run (< 1 minute)
    python bench/compare.py --only smtp,login --servers mailsuite,reference --json out.json

Everything runs privately under one temporary directory, on free loopback ports: a mailsuite
(`twistd -n mailsuite`, tests/harness.py), a Postfix (`postfix -c DIR`) and a Dovecot
(`dovecot -F -c FILE`) (tests/daemons.py), all stopped at the end. Both IMAP servers get
identical Maildirs written directly into new/ (no SMTP). Each round runs every workload on each
server in turn (A B, A B, ...); the table shows medians over the rounds, and the ratio
mailsuite / reference with the goal it has. Root is needed (Postfix and Dovecot start as root).
See docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)

import workloads  # noqa: E402
from mailboxes import Layout, fill_maildir, reset_maildir  # noqa: E402
from servers import MailsuiteSide, ReferenceSide, Side, process_count  # noqa: E402

PASSWORD = "bench-pw-1"
DOMAIN = "bench.test"
USERS = {name: f"{name}@{DOMAIN}" for name in ("smtp", "sub", "big", "idle", "stress")}
SMALL_FOLDER = "Ten"  # the second large folder of `big`, a tenth of --messages


@dataclass
class Row:
    """One line of the table: a figure, its unit, and whether more is better."""

    name: str
    unit: str
    higher_is_better: bool
    values: dict[str, list[float]] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)  # rounds in which the workload failed
    errors: dict[str, list[int]] = field(default_factory=dict)  # imaptest's Error: lines

    def add(self, side: str, value: float) -> None:
        self.values.setdefault(side, []).append(value)

    def median(self, side: str) -> float | None:
        values = self.values.get(side)
        return statistics.median(values) if values else None

    def ratio(self) -> float | None:
        """mailsuite / reference (the issue's column)."""
        ms, ref = self.median("mailsuite"), self.median("reference")
        if ms is None or ref is None or ref == 0:
            return None
        return ms / ref

    def score(self) -> float | None:
        """How many times as good as the reference (>= 1.0 is at goal, whatever the unit);
        any imaptest error puts a row below goal."""
        ratio = self.ratio()
        if ratio is None:
            return None
        score = ratio if self.higher_is_better else (1 / ratio if ratio else float("inf"))
        if any(self.errors.get("mailsuite", [])):
            score = min(score, 0.0)
        return score


@dataclass
class Workload:
    name: str  # for --only
    rows: list[tuple[str, str, bool]]  # (row name, unit, higher is better)
    run: Callable[["Bench", Side], dict[str, float | tuple[float, int]]]


@dataclass
class Bench:
    args: argparse.Namespace
    base: str
    layout: Layout

    def target(self, side: Side) -> workloads.ImapTarget:
        return workloads.ImapTarget("127.0.0.1", side.imap_port,
                                    side.client_context if side.imap_tls else None)


def run_smtp(size_option: str) -> Callable[[Bench, Side], dict]:
    def run(bench: Bench, side: Side) -> dict:
        a = bench.args
        size = getattr(a, size_option)
        count = a.smtp_messages if size_option == "smtp_size" else a.smtp_large_messages
        value = workloads.smtp_source("127.0.0.1", side.mx_port, "load@remote.example",
                                      USERS["smtp"], count, size, a.smtp_sessions,
                                      side.maildir(USERS["smtp"]))
        return {"smtp-" + ("2k" if size_option == "smtp_size" else "100k"): value}
    return run


def run_submission(bench: Bench, side: Side) -> dict:
    a = bench.args
    value = workloads.smtp_submission("127.0.0.1", side.submission_port, USERS["sub"], PASSWORD,
                                      USERS["smtp"], a.smtp_messages, a.smtp_size,
                                      a.smtp_sessions, side.client_context,
                                      side.maildir(USERS["smtp"]))
    return {"submission": value}


def run_large_folder(bench: Bench, side: Side) -> dict:
    side.stop_imap()
    reset_maildir(side.maildir(USERS["big"]))
    reset_maildir(side.maildir(USERS["big"], SMALL_FOLDER))
    side.start_imap()
    return workloads.large_folder(bench.target(side), USERS["big"], PASSWORD,
                                  bench.args.messages)


def run_login(bench: Bench, side: Side) -> dict:
    return {"login": workloads.login_latency(bench.target(side), USERS["idle"], PASSWORD,
                                             bench.args.logins)}


def run_idle(bench: Bench, side: Side) -> dict:
    return {"idle-clients": workloads.idle_storm(bench.target(side), USERS["idle"], PASSWORD,
                                                 bench.args.clients)}


def run_imaptest(bench: Bench, side: Side) -> dict:
    a = bench.args
    out: dict = {}
    for profile, extra in (("default", []), ("logout0", ["logout=0"])):
        for clients in a.imaptest_clients:
            out[f"imaptest-{profile}-{clients}"] = workloads.imaptest(
                a.imaptest, "127.0.0.1", side.imap_port, side.imap_tls, USERS["stress"],
                PASSWORD,
                bench.layout.mbox, clients, a.imaptest_secs, extra)
    return out


def run_memory(bench: Bench, side: Side) -> dict:
    side.stop_imap()
    side.start_imap()
    return workloads.memory(bench.target(side), side.imap_pss_kib, USERS["idle"], PASSWORD,
                            bench.args.clients, USERS["big"], ["INBOX", SMALL_FOLDER])


def workload_list(args: argparse.Namespace) -> list[Workload]:
    imaptest_rows = [(f"imaptest-{p}-{c}", "cmd/s", True) for p in ("default", "logout0")
                     for c in args.imaptest_clients]
    return [
        Workload("smtp", [("smtp-2k", "msg/s", True)], run_smtp("smtp_size")),
        Workload("smtp-large", [("smtp-100k", "msg/s", True)], run_smtp("smtp_large_size")),
        Workload("submission", [("submission", "msg/s", True)], run_submission),
        Workload("large-folder", [("select-first", "s", False), ("fetch-flags", "s", False),
                                  ("fetch-headers", "s", False)], run_large_folder),
        Workload("login", [("login", "ms", False)], run_login),
        Workload("idle", [("idle-clients", "s", False)], run_idle),
        Workload("imaptest", imaptest_rows, run_imaptest),
        Workload("memory", [("memory-idle", "MiB", False),
                            ("memory-after-folders", "MiB", False)], run_memory),
    ]


# -- the table --------------------------------------------------------------------------------
def format_table(rows: list[Row], sides: list[str]) -> list[str]:
    header = f"{'workload':<24} {'unit':<6}" + "".join(f" {s:>12}" for s in sides) + \
        f" {'ratio':>7}  goal"
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = []
        for side in sides:
            m = row.median(side)
            text = "-" if m is None else (f"{m:.3f}" if m < 10 else f"{m:.1f}")
            if row.failed.get(side):
                text += f" F{row.failed[side]}"
            errors = row.errors.get(side)
            if errors and any(errors):
                text += f" E{max(errors)}"
            cells.append(f" {text:>12}")
        ratio = row.ratio()
        goal = ">= 1.0x" if row.higher_is_better else "<= 1.0x"
        score = row.score()
        mark = "" if score is None else ("  ok" if score >= 1.0 else "  MISS")
        if row.failed.get("mailsuite"):
            mark = "  MISS"
        lines.append(f"{row.name:<24} {row.unit:<6}" + "".join(cells) +
                     f" {'-' if ratio is None else f'{ratio:.2f}x':>7}  {goal}{mark}")
    return lines


def summary_line(rows: list[Row]) -> str:
    """A row where mailsuite failed in some round is not at goal (its score counts as 0)."""
    scored = [(0.0 if row.failed.get("mailsuite") else row.score(), row.name) for row in rows
              if row.score() is not None or row.failed.get("mailsuite")]
    if not scored:
        return "summary: no workload ran on both servers"
    at_goal = sum(1 for score, _ in scored if score >= 1.0)
    worst_score, worst = min(scored)
    return (f"summary: {at_goal}/{len(scored)} workloads at goal; worst: {worst} "
            f"{worst_score:.2f}x (as good as the reference; >= 1.0 is the goal)")


# -- main -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--messages", type=int, default=100000, help="the large folder (INBOX); a "
                   "second folder gets a tenth of it")
    p.add_argument("--smtp-messages", type=int, default=3000)
    p.add_argument("--smtp-large-messages", type=int, default=0,
                   help="messages of the 100 KiB SMTP run (default: --smtp-messages)")
    p.add_argument("--smtp-size", type=int, default=2048)
    p.add_argument("--smtp-large-size", type=int, default=102400)
    p.add_argument("--smtp-sessions", type=int, default=20)
    p.add_argument("--clients", type=int, default=200, help="idle IMAP clients")
    p.add_argument("--logins", type=int, default=50, help="sequential logins for the latency")
    p.add_argument("--imaptest-clients", default="10,50")
    p.add_argument("--imaptest-secs", type=int, default=30)
    p.add_argument("--imaptest", default=os.environ.get("MAILSUITE_IMAPTEST", ""),
                   help="imaptest binary (default $MAILSUITE_IMAPTEST)")
    p.add_argument("--reference-imap", choices=["tls", "plain"], default="tls",
                   help="Dovecot over IMAPS like mailsuite (default), or plain IMAP on loopback "
                   "(mailsuite has no LOGIN before TLS, so it stays on IMAPS)")
    p.add_argument("--only", default="", help="comma-separated workloads: smtp, smtp-large, "
                   "submission, large-folder, login, idle, imaptest, memory")
    p.add_argument("--servers", default="reference,mailsuite",
                   help="which of reference (Postfix + Dovecot) and mailsuite, in this order")
    p.add_argument("--workers", type=int, default=0,
                   help="mailsuite's [server] workers: processes on the same sockets (default "
                   "0, mailsuite's own default: one per CPU)")
    p.add_argument("--json", default="", help="write every figure to this file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    args.imaptest_clients = [int(c) for c in args.imaptest_clients.split(",") if c]
    args.smtp_large_messages = args.smtp_large_messages or args.smtp_messages
    args.servers = [s for s in args.servers.split(",") if s]
    unknown = set(args.servers) - {"reference", "mailsuite"}
    if unknown or not args.servers:
        p.error(f"--servers: reference and/or mailsuite, not {sorted(unknown)}")
    return args


def chosen(args: argparse.Namespace) -> list[Workload]:
    every = workload_list(args)
    if not args.only:
        return every
    names = [n for n in args.only.split(",") if n]
    known = {w.name for w in every}
    if set(names) - known:
        raise SystemExit(f"--only: unknown {sorted(set(names) - known)}; known: {sorted(known)}")
    return [w for w in every if w.name in names]


def build_sides(args: argparse.Namespace, base: str, layout: Layout) -> dict[str, Side]:
    sides: dict[str, Side] = {}
    users = list(USERS.values())
    for name in args.servers:
        if name == "reference":
            sides[name] = ReferenceSide(os.path.join(base, "reference"), users, PASSWORD,
                                        layout, max_clients=max(1024, args.clients * 2),
                                        imap_tls=args.reference_imap == "tls")
        else:
            sides[name] = MailsuiteSide(os.path.join(base, "mailsuite"), users, PASSWORD,
                                        layout, max_clients=max(1000, args.clients * 4),
                                        workers=args.workers)
    return sides


def fill(sides: dict[str, Side], args: argparse.Namespace) -> None:
    """The same messages, the same file names, into every side's Maildirs."""
    for side in sides.values():
        fill_maildir(side.maildir(USERS["big"]), args.messages, seed=1)
        fill_maildir(side.maildir(USERS["big"], SMALL_FOLDER), max(1, args.messages // 10),
                     seed=2, subfolder=True)
        fill_maildir(side.maildir(USERS["idle"]), 10, seed=3)
        side.own_mail()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = chosen(args)
    if any(w.name == "imaptest" for w in work) and not (
            args.imaptest and os.access(args.imaptest, os.X_OK)):
        raise SystemExit("imaptest: give --imaptest or $MAILSUITE_IMAPTEST (an executable; "
                         ".ci/run builds tools/imaptest)")
    base = tempfile.mkdtemp(prefix="mailsuite-compare-")
    os.chmod(base, 0o755)
    started = time.monotonic()
    workloads.ATTIC = os.path.join(base, "attic")  # the SMTP runs' messages, removed below
    layout = Layout.create(base)
    sides = build_sides(args, base, layout)
    rows = {name: Row(name, unit, better) for w in work for name, unit, better in w.rows}
    bench = Bench(args, base, layout)
    failures: list[str] = []
    try:
        for side in sides.values():
            side.start()
        fill(sides, args)
        print(f"filled the Maildirs ({args.messages} + {max(1, args.messages // 10)} messages "
              f"each) in {time.monotonic() - started:.0f} s", flush=True)
        for round_no in range(1, args.rounds + 1):
            for w in work:
                for name, side in sides.items():
                    t = time.monotonic()
                    try:
                        figures = w.run(bench, side)
                    except Exception as e:  # one failed workload leaves the others' figures
                        failures.append(f"round {round_no} {w.name} {name}: {e}")
                        for row_name, _, _ in w.rows:
                            rows[row_name].failed[name] = rows[row_name].failed.get(name, 0) + 1
                        print(f"round {round_no} {w.name:<13} {name:<10} FAILED: {e}",
                              flush=True)
                        continue
                    for row_name, value in figures.items():
                        if isinstance(value, tuple):
                            value, errors = value
                            rows[row_name].errors.setdefault(name, []).append(errors)
                        rows[row_name].add(name, value)
                    shown = ", ".join(f"{k}={v[0] if isinstance(v, tuple) else v:.3f}"
                                      for k, v in figures.items())
                    print(f"round {round_no} {w.name:<13} {name:<10} {shown} "
                          f"({time.monotonic() - t:.1f} s)", flush=True)
    except KeyboardInterrupt:  # Ctrl-C: stop, and still print what was measured
        failures.append("interrupted")
    finally:
        for side in sides.values():
            side.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print("kept", base)
    elapsed = time.monotonic() - started
    names = list(sides)
    table = format_table(list(rows.values()), names)
    print()
    print("\n".join(table))
    summary = summary_line(list(rows.values()))
    if args.json:
        write_json(args, rows, names, elapsed, summary)
    print(f"(medians of {args.rounds} round(s); ratio = mailsuite / reference; mailsuite with "
          f"{process_count(args.workers)} process(es); {elapsed:.0f} s)")
    for failure in failures:
        print("failed:", failure)
    print(summary)
    return 1 if failures else 0


def write_json(args: argparse.Namespace, rows: dict[str, Row], sides: list[str],
               elapsed: float, summary: str) -> None:
    out = {
        "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "processor": _cpu_model()},
        "rounds": args.rounds, "workers": process_count(args.workers), "seconds": elapsed, "servers": sides, "summary": summary,
        "rows": [{"name": r.name, "unit": r.unit, "higher_is_better": r.higher_is_better,
                  "values": r.values, "errors": r.errors, "failed": r.failed,
                  "medians": {s: r.median(s) for s in sides}, "ratio": r.ratio(),
                  "score": r.score()} for r in rows.values()],
    }
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())

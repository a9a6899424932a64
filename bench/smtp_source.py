#!/usr/bin/env python3
"""SMTP accept -> Maildir throughput with Postfix's load client, `smtp-source`.

Runs `smtp-source -s SESSIONS -m MESSAGES -l SIZE` against an MX port and counts the time until
MESSAGES files are in the recipient's Maildir (new/ and cur/), so the figure is "delivered into
the Maildir per second", the same for any server (mailsuite, Postfix + Dovecot's LDA, ...):

    python bench/smtp_source.py --spawn                              # a throwaway mailsuite
    python bench/smtp_source.py --spawn --size 102400 --messages 1000
    python bench/smtp_source.py --port 25 --maildir /home/alice/Maildir   # any running server

With --spawn the server is this checkout's `twistd -n mailsuite` (tests/harness.py), or the one
of --repo (another checkout, for before/after comparisons). Prints one line ending in msg/s.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def count_files(maildir: str) -> int:
    total = 0
    for sub in ("new", "cur"):
        try:
            total += sum(1 for n in os.listdir(os.path.join(maildir, sub))
                         if not n.startswith("."))
        except FileNotFoundError:
            pass
    return total


def spawn(repo: str, sessions: int, recipient: str, trust: bool = True, workers: int = 1):
    """A mailsuite of checkout `repo` with the MX listener and one user, serving with
    `workers` processes; (server, maildir)."""
    sys.path.insert(0, repo)
    from tests.harness import MailServer

    base = tempfile.mkdtemp(prefix="smtp-source-")
    extra: dict = {"limits": {"max_connections_per_ip": max(50, sessions + 10),
                              "max_connections": max(200, sessions + 10)}}
    if not trust:
        extra["trust"] = {"enabled": False}
    if workers > 1:
        extra["server"] = {"workers": workers}
    server = MailServer(base, listeners=["mx"], extra=extra)
    server.start()
    server.add_user(recipient)
    if workers > 1:  # the first process listens at once; the others need a moment to start
        from tests.polling import wait_until

        wait_until(lambda: server.log_text().count("serving mx on") >= workers - 1,
                   timeout=60, message="the worker processes")
    local, domain = recipient.lower().split("@")
    return server, os.path.join(server.data_dir, "mail", domain, local)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process `pid` and its live children (worker processes) so
    far (0 when unknown)."""
    if pid is None:
        return 0.0
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(name) == pid or fields[1] == str(pid):  # fields[1]: the parent's pid
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def run(host: str, port: int, maildir: str, messages: int, size: int, sessions: int,
        sender: str, recipient: str, timeout: float, pid: int | None = None
        ) -> tuple[float, float]:
    """Run smtp-source and wait for the Maildir; returns (messages per second, server CPU
    milliseconds per message, 0 without `pid`)."""
    before = count_files(maildir)
    cpu_before = cpu_seconds(pid)
    cmd = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
           "-f", sender, "-t", recipient, f"{host}:{port}"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd)
    deadline = started + timeout
    try:  # counting the Maildir while smtp-source runs would take CPU from the server
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    while count_files(maildir) - before < messages:
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"timeout: {count_files(maildir) - before}/{messages} delivered")
        time.sleep(0.02)
    elapsed = time.monotonic() - started
    if proc.wait(30) != 0:
        print(f"smtp-source exited with {proc.returncode}", file=sys.stderr)
    return messages / elapsed, (cpu_seconds(pid) - cpu_before) * 1000 / messages


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--maildir", default="", help="the recipient's Maildir (with --port)")
    p.add_argument("--spawn", action="store_true", help="start a throwaway mailsuite")
    p.add_argument("--repo", default=HERE, help="checkout to spawn (default: this one)")
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--from", dest="sender", default="sender@remote.example")
    p.add_argument("--to", default="alice@example.org")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--pid", type=int, default=None, help="server pid (with --port): report "
                   "its CPU time per message")
    p.add_argument("--no-trust", action="store_true",
                   help="spawned server without the inbound checks ([trust] enabled = false)")
    p.add_argument("--keep", action="store_true", help="keep the spawned server's directory")
    p.add_argument("--workers", type=int, default=1,
                   help="spawned server's [server] workers (processes on the MX socket)")
    args = p.parse_args(argv)
    if shutil.which("smtp-source") is None and not os.path.exists("/usr/sbin/smtp-source"):
        p.error("smtp-source not found (Debian package postfix)")
    os.environ["PATH"] += os.pathsep + "/usr/sbin"
    server = None
    if args.spawn:
        server, maildir = spawn(os.path.abspath(args.repo), args.sessions, args.to,
                                trust=not args.no_trust, workers=args.workers)
        port = server.ports["mx"]
    else:
        if not args.port or not args.maildir:
            p.error("give --spawn, or --port and --maildir")
        port, maildir = args.port, args.maildir
    try:
        rate, cpu = run(args.host, port, maildir, args.messages, args.size, args.sessions,
                        args.sender, args.to, args.timeout,
                        server.process.pid if server is not None else args.pid)
    finally:
        if server is not None:
            server.stop()
            if not args.keep:
                shutil.rmtree(server.base_dir, ignore_errors=True)
    print(f"smtp-source sessions={args.sessions} messages={args.messages} size={args.size} "
          f"workers={args.workers}: "
          f"server cpu {cpu:.2f} ms/msg, {rate:.1f} msg/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

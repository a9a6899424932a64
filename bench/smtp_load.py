#!/usr/bin/env python3
"""Load generator: N concurrent SMTP clients sending fixed-size messages; prints messages/second.

Only messages whose end-of-data got a 250 reply are counted (a 4xx/5xx or a dropped connection
is reported separately), so the figure is "messages durably queued per second" (docs/design/architecture.md,
"Invariants": 250 after DATA means message and envelope are fsynced).

    python bench/smtp_load.py --port 2525 --to alice@example.org            # a running server
    python bench/smtp_load.py --spawn                                      # a throwaway server
    python bench/smtp_load.py --spawn --clients 20 --size 2048 --duration 20
    python bench/smtp_load.py --spawn --mode mx-trust     # SPF/DKIM/DMARC + rspamd + clamd
    python bench/smtp_load.py --spawn --mode submission --count 2000 --duration 0  # STARTTLS+AUTH

Modes are entries of MODES: each builds a `Scenario` (where to connect, what envelope, how to
log in) from the options, so a `--remote-sink` mode (relay through submission to a sink that
counts what arrives) can be added beside `mx` without touching the client loop.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Scenario:
    host: str
    port: int
    sender: str
    recipients: list[str]
    implicit_tls: bool = False
    starttls: bool = False
    auth: tuple[str, str] | None = None  # (user, password) for AUTH PLAIN
    ssl_context: ssl.SSLContext | None = None
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    # The message to send instead of build_message()'s (e.g. one with a DKIM signature).
    make_message: Callable[[bytes], bytes] | None = None


@dataclass
class Counters:
    accepted: int = 0  # 250 after DATA
    refused: int = 0  # 4xx/5xx at any step of a transaction
    errors: int = 0  # connection failures, timeouts, protocol surprises
    latencies: list[float] = field(default_factory=list)


class SMTPError(Exception):
    pass


class Client:
    """A minimal asyncio SMTP client (sequential commands) that reuses its connection."""

    def __init__(self, scenario: Scenario, message: bytes, counters: Counters):
        self.s = scenario
        self.message = message
        self.counters = counters
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def reply(self) -> tuple[int, bytes]:
        assert self.reader is not None
        lines = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise SMTPError("connection closed")
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), b"".join(lines)

    async def command(self, line: bytes, expect: int) -> None:
        assert self.writer is not None
        self.writer.write(line + b"\r\n")
        code, text = await self.reply()
        if code != expect:
            raise SMTPError(f"{line[:40]!r}: {text!r}")

    async def connect(self) -> None:
        s = self.s
        self.reader, self.writer = await asyncio.open_connection(
            s.host, s.port, ssl=s.ssl_context if s.implicit_tls else None)
        code, text = await self.reply()
        if code != 220:
            raise SMTPError(f"greeting {text!r}")
        await self.command(b"EHLO load.example", 250)
        if s.starttls:
            await self.command(b"STARTTLS", 220)
            await self.writer.start_tls(s.ssl_context)
            await self.command(b"EHLO load.example", 250)
        if s.auth:
            token = base64.b64encode(b"\0%s\0%s" % (s.auth[0].encode(), s.auth[1].encode()))
            await self.command(b"AUTH PLAIN " + token, 235)

    async def send_one(self) -> bool:
        started = time.monotonic()
        try:
            await self.command(b"MAIL FROM:<%s>" % self.s.sender.encode(), 250)
            for rcpt in self.s.recipients:
                await self.command(b"RCPT TO:<%s>" % rcpt.encode(), 250)
            await self.command(b"DATA", 354)
            assert self.writer is not None
            self.writer.write(self.message + b".\r\n")
            code, text = await self.reply()
        except SMTPError:
            self.counters.refused += 1
            await self.command(b"RSET", 250)
            return False
        if code == 250:
            self.counters.accepted += 1
            self.counters.latencies.append(time.monotonic() - started)
            return True
        self.counters.refused += 1
        return False

    async def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.write(b"QUIT\r\n")
                await asyncio.wait_for(self.writer.drain(), 2)
                self.writer.close()
            except Exception:
                pass
            self.writer = None


def build_message(size: int, n: int) -> bytes:
    """A dot-stuffing-free message of about `size` octets with CRLF lines of 76 characters."""
    head = (f"From: load@load.example\r\nTo: rcpt@example.org\r\nSubject: load {n}\r\n"
            f"Message-ID: <load-{n}-{os.getpid()}@load.example>\r\n\r\n").encode()
    body = b""
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-0123456789ab\r\n"
    while len(head) + len(body) + len(line) <= size:
        body += line
    return head + body + b"x" * max(0, size - len(head) - len(body) - 2) + b"\r\n"


async def worker(scenario: Scenario, message: bytes, counters: Counters, stop_at: float,
                 remaining: list[int]) -> None:
    client: Client | None = None
    while time.monotonic() < stop_at and remaining[0] > 0:
        remaining[0] -= 1  # taken before any await, so N workers never send more than count
        try:
            if client is None:
                client = Client(scenario, message, counters)
                try:
                    await client.connect()
                except BaseException:
                    remaining[0] += 1  # nothing was sent on this ticket
                    raise
            await client.send_one()
        except (OSError, SMTPError, asyncio.IncompleteReadError, ssl.SSLError) as e:
            counters.errors += 1
            if counters.errors <= 5:
                print(f"client error: {e}", file=sys.stderr)
            if client is not None:
                await client.close()
            client = None
            await asyncio.sleep(0.05)
    if client is not None:
        await client.close()


async def run(scenario: Scenario, clients: int, size: int, duration: float, count: int
              ) -> tuple[Counters, float]:
    counters = Counters()
    message = build_message(size, 0)
    if scenario.make_message is not None:
        message = scenario.make_message(message)
    remaining = [count if count > 0 else 1 << 62]
    started = time.monotonic()
    stop_at = started + duration if duration > 0 else float("inf")
    await asyncio.gather(*(worker(scenario, message, counters, stop_at, remaining)
                           for _ in range(clients)))
    return counters, time.monotonic() - started


# -- modes ----------------------------------------------------------------------------------
def mode_mx(args: argparse.Namespace) -> Scenario:
    if args.spawn:
        server = spawn_server(args)
        cleanup = [server.stop]
        if not args.keep:
            cleanup.append(lambda: shutil.rmtree(server.base_dir, ignore_errors=True))
        return Scenario("127.0.0.1", server.ports["mx"], args.sender, [args.to],
                        cleanup=cleanup)
    return Scenario(args.host, args.port, args.sender, [args.to])


def mode_submission(args: argparse.Namespace) -> Scenario:
    """Submission (587) with STARTTLS and AUTH PLAIN from a user of ours to a local user: the
    path a mail client takes. The figure is messages/second accepted (250); with --spawn the
    run also waits until the recipient's Maildir holds every accepted message and reports
    that rate too."""
    if not args.spawn:
        raise SystemExit("--mode submission needs --spawn (it creates the sending user)")
    server = spawn_server(args)
    sender = args.sender if args.sender != "load@load.example" else "sender@example.org"
    password = "load-pw-1"
    server.add_user(sender, password)
    maildir = server.maildir(args.to)
    started = time.monotonic()
    cpu_before = _cpu_seconds(server.process.pid)

    def report() -> None:
        deadline = time.monotonic() + 120
        target = args.accepted_for_report[0] if args.accepted_for_report else 0
        while time.monotonic() < deadline and _maildir_count(maildir) < target:
            time.sleep(0.05)
        elapsed = max(time.monotonic() - started, 1e-9)
        count = _maildir_count(maildir)
        cpu = (_cpu_seconds(server.process.pid) - cpu_before) * 1000 / max(count, 1)
        print(f"in the Maildir: {count} after {elapsed:.1f}s: "
              f"{count / elapsed:.1f} messages/second accept->Maildir, "
              f"server cpu {cpu:.2f} ms/msg")

    cleanup = [report, server.stop]
    if not args.keep:
        cleanup.append(lambda: shutil.rmtree(server.base_dir, ignore_errors=True))
    return Scenario("127.0.0.1", server.ports["submission"], sender, [args.to], starttls=True,
                    auth=(sender, password), ssl_context=server.ssl_context(), cleanup=cleanup,
                    make_message=lambda m: m.replace(b"From: load@load.example",
                                                     b"From: " + sender.encode(), 1))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _maildir_count(maildir: str) -> int:
    total = 0
    for sub in ("new", "cur"):
        try:
            total += len(os.listdir(os.path.join(maildir, sub)))
        except FileNotFoundError:
            pass
    return total


def mode_remote_sink(args: argparse.Namespace) -> Scenario:
    """Relay: clients submit (587, STARTTLS + AUTH) to a spawned mailsuite that delivers every
    message by MX (test DNS server on loopback) to a counting SMTP sink. The figure printed at
    the end is messages/second that arrived at the sink (submission in, remote SMTP out)."""
    if not args.spawn:
        raise SystemExit("--mode remote-sink needs --spawn (the server must point at the sink)")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.dnsserver import DNSServer
    from tests.harness import MailServer

    sink = _CountingSink().start()
    dns = DNSServer({"sink.test": [("sink.test", "MX", "10 mx.sink.test"),
                                   ("mx.sink.test", "A", "127.0.0.1")]}).start()
    sender = args.sender if args.sender != "load@load.example" else "load@a.test"
    rcpt = args.to if args.to != "alice@example.org" else "rcpt@sink.test"
    password = "load-pw-1"
    base = tempfile.mkdtemp(prefix="smtp-relay-load-")
    server = MailServer(base, hostname="mx.a.test", listeners=["mx", "submission"], extra={
        "limits": {"max_connections_per_ip": max(20, args.clients + 5)},
        "courier": {"nameservers": [dns.nameserver], "mx_port": sink.port},
        "queue": {"retry_schedule": [1], "delay_warning": 0}})
    server.start()
    server.add_user(sender, password)
    print(f"spawned mailsuite in {base} (submission port {server.ports['submission']}), "
          f"sink on port {sink.port}")
    started = time.monotonic()

    def report() -> None:
        # Wait for the queue to drain: every accepted message is at the sink (or failed).
        queue_dir = os.path.join(server.data_dir, "queue")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(
                n.endswith(".json") and not n.startswith(".") for n in os.listdir(queue_dir)):
            time.sleep(0.1)
        last = sink.last or time.monotonic()
        elapsed = max(last - started, 1e-9)
        print(f"relayed={sink.count} to the sink in {elapsed:.1f}s (connections={sink.connections})"
              f": {sink.count / elapsed:.1f} messages/second end-to-end")

    cleanup = [report, server.stop, dns.stop, sink.stop]
    if not args.keep:
        cleanup.append(lambda: shutil.rmtree(base, ignore_errors=True))
    return Scenario("127.0.0.1", server.ports["submission"], sender, [rcpt], starttls=True,
                    auth=(sender, password), ssl_context=server.ssl_context(), cleanup=cleanup)


class _CountingSink:
    """An SMTP server (its own asyncio loop in a thread) that accepts and counts everything."""

    def __init__(self) -> None:
        self.count = 0
        self.connections = 0
        self.last: float | None = None
        self.port = 0

    def start(self) -> "_CountingSink":
        import threading

        ready = threading.Event()

        def serve() -> None:
            self.loop = asyncio.new_event_loop()
            server = self.loop.run_until_complete(
                asyncio.start_server(self._session, "127.0.0.1", 0))
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=serve, daemon=True).start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 sink.test ESMTP counting sink\r\n")
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                 b"250 SIZE 100000000\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    while (await reader.readline()) not in (b".\r\n", b""):
                        pass
                    self.count += 1
                    self.last = time.monotonic()
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    break
                else:
                    writer.write(b"250 2.0.0 ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        writer.close()


def mode_mx_trust(args: argparse.Namespace) -> Scenario:
    """MX with every inbound check on (docs/design/trust.md): the sender domain publishes SPF,
    DKIM and DMARC p=reject on a loopback DNS server and every message carries a valid DKIM
    signature; rspamd and clamd run as private daemons (tests/daemons.py) unless --no-engines.
    The figure is messages/second accepted (250) after all of that."""
    if not args.spawn:
        raise SystemExit("--mode mx-trust needs --spawn (it brings its own DNS and engines)")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.dnsserver import DNSServer
    from tests.harness import MailServer
    from tests.trustkit import SenderDomain, zones

    base = tempfile.mkdtemp(prefix="smtp-trust-load-")
    sender = SenderDomain("load.example", spf="v=spf1 ip4:127.0.0.0/8 -all",
                          dmarc="v=DMARC1; p=reject")
    dns = DNSServer(zones(sender)).start()
    cleanup: list[Callable[[], None]] = [dns.stop]
    extra: dict = {"limits": {"max_connections_per_ip": max(20, args.clients + 5)},
                   "courier": {"nameservers": [dns.nameserver]}}
    if not args.no_engines:
        from tests.daemons import ClamdDaemon, RspamdDaemon

        rspamd = RspamdDaemon(os.path.join(base, "rspamd")).start()
        clamd = ClamdDaemon(os.path.join(base, "clamd")).start()
        cleanup += [rspamd.stop, clamd.stop]
        extra["rspamd"] = {"url": rspamd.url}
        extra["clamd"] = {"socket": clamd.socket}
    server = MailServer(os.path.join(base, "mailsuite"), listeners=["mx"], extra=extra)
    server.start()
    server.add_user(args.to)
    print(f"spawned mailsuite in {base} (mx port {server.ports['mx']}): SPF, DKIM, DMARC, ARC"
          f"{'' if args.no_engines else ', rspamd, clamd'}")
    cleanup.insert(0, server.stop)
    if not args.keep:
        cleanup.append(lambda: shutil.rmtree(base, ignore_errors=True))
    return Scenario("127.0.0.1", server.ports["mx"], "load@load.example", [args.to],
                    cleanup=cleanup, make_message=sender.sign)


MODES: dict[str, Callable[[argparse.Namespace], Scenario]] = {"mx": mode_mx,
                                                              "submission": mode_submission,
                                                              "remote-sink": mode_remote_sink,
                                                              "mx-trust": mode_mx_trust}


def spawn_server(args: argparse.Namespace):
    """A throwaway `twistd -n mailsuite` (tests/harness.py of --repo, default this checkout)
    with one user to receive the load."""
    sys.path.insert(0, os.path.abspath(args.repo) if args.repo else
                    os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.harness import MailServer

    base = tempfile.mkdtemp(prefix="smtp-load-")
    extra = {"limits": {"max_connections_per_ip": max(20, args.clients + 5),
                        "max_preauth_per_ip": max(10, args.clients + 5)},
             # one user sends the whole load: not a spammer to throttle. Off (0), as
             # bench/compare.py has them: no SQL per message (Postfix has no such limits)
             "ratelimit": {"submission_messages_per_hour": 0,
                           "submission_recipients_per_hour": 0}}
    if args.no_trust:
        extra["trust"] = {"enabled": False}
    server = MailServer(base, listeners=["mx", "submission", "submissions"], extra=extra)
    server.start()
    server.add_user(args.to)
    print(f"spawned mailsuite in {base} (mx port {server.ports['mx']})")
    return server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=sorted(MODES), default="mx")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=2525)
    p.add_argument("--spawn", action="store_true",
                   help="start a throwaway server (tests/harness.py) instead of using --port")
    p.add_argument("--keep", action="store_true", help="keep the spawned server's data dir")
    p.add_argument("--repo", default="", help="checkout whose server --spawn starts (mx and "
                   "submission modes; default: this one), for before/after comparisons")
    p.add_argument("--no-trust", action="store_true",
                   help="mx: with the inbound checks off ([trust] enabled = false)")
    p.add_argument("--no-engines", action="store_true",
                   help="mx-trust: without rspamd and clamd (sender authentication only)")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--size", type=int, default=2048, help="message size in octets")
    p.add_argument("--duration", type=float, default=10.0, help="seconds (0: until --count)")
    p.add_argument("--count", type=int, default=0, help="stop after this many attempts")
    p.add_argument("--from", dest="sender", default="load@load.example")
    p.add_argument("--to", default="alice@example.org")
    args = p.parse_args(argv)
    if args.duration <= 0 and args.count <= 0:
        p.error("give --duration or --count")
    args.accepted_for_report = []
    scenario = MODES[args.mode](args)
    try:
        counters, elapsed = asyncio.run(run(scenario, args.clients, args.size, args.duration,
                                            args.count))
        args.accepted_for_report.append(counters.accepted)
    finally:
        for fn in scenario.cleanup:
            fn()
    lat = sorted(counters.latencies)
    p50 = lat[len(lat) // 2] * 1000 if lat else 0.0
    p99 = lat[int(len(lat) * 0.99)] * 1000 if lat else 0.0
    print(f"mode={args.mode} clients={args.clients} size={args.size} elapsed={elapsed:.1f}s "
          f"accepted={counters.accepted} refused={counters.refused} errors={counters.errors}")
    print(f"latency p50={p50:.1f}ms p99={p99:.1f}ms")
    print(f"{counters.accepted / elapsed:.1f} messages/second (250 after DATA)")
    return 0 if counters.accepted else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""IMAP client-side figures against any IMAP server (ours or Dovecot): LOGIN latency and a
connection storm of many clients that connect, log in, SELECT and IDLE.

    python bench/imap_clients.py latency --port 993 --tls implicit --user u --password p
    python bench/imap_clients.py storm --port 993 --tls implicit --user u --password p \
        --clients 200
    python bench/imap_clients.py --start-server latency      # a throwaway mailsuite (harness)

`latency`: `--count` fresh connections, one after another; each connects (and negotiates TLS),
then the time from sending LOGIN to its tagged OK is taken. The first login is reported apart
(a server with a login cache answers later ones from it), then the median and 90th percentile
of the others. `storm`: `--clients` connections opened at once; the time from the first
connect until every one of them is idling (`+` after IDLE), then all DONE and LOGOUT.

Importable: `login_latency(Target, count)` and `connect_storm(Target, clients)` return the
figures as dataclasses (bench/compare.py runs them against Dovecot too).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

TLS_MODES = ("implicit", "starttls", "none")


@dataclass
class Target:
    host: str = "127.0.0.1"
    port: int = 993
    tls: str = "implicit"  # implicit (IMAPS), starttls, none
    user: str = "alice@example.org"
    password: str = "secret-pw-1"
    mailbox: str = "INBOX"
    timeout: float = 120.0
    # A session cache shared by the connections of one run, so TLS resumes like a real client.
    _ctx: ssl.SSLContext | None = field(default=None, repr=False)

    def ssl_context(self) -> ssl.SSLContext:
        if self._ctx is None:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # a benchmark of throughput, not of trust
            self._ctx = ctx
        return self._ctx


@dataclass
class LatencyResult:
    count: int
    first_ms: float
    median_ms: float
    p90_ms: float
    connect_median_ms: float  # TCP + TLS + greeting, for reference


@dataclass
class StormResult:
    clients: int
    seconds: float  # first connect until every client is idling
    failed: int


class Client:
    """A minimal IMAP client on asyncio streams: one command at a time, tagged."""

    def __init__(self, target: Target):
        self.target = target
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._n = 0
        self.session: ssl.SSLSession | None = None

    async def connect(self) -> None:
        t = self.target
        ctx = t.ssl_context() if t.tls == "implicit" else None
        self.reader, self.writer = await asyncio.open_connection(t.host, t.port, ssl=ctx,
                                                                 limit=1 << 20)
        greeting = await self.reader.readline()
        if not greeting.startswith(b"* OK"):
            raise RuntimeError(f"greeting: {greeting!r}")
        if t.tls == "starttls":
            await self.command(b"STARTTLS")
            await self.writer.start_tls(t.ssl_context())

    async def command(self, text: bytes) -> list[bytes]:
        """Send one command; the lines up to and including its tagged OK."""
        assert self.reader is not None and self.writer is not None
        self._n += 1
        tag = b"b%d" % self._n
        self.writer.write(tag + b" " + text + b"\r\n")
        return await self.read_tagged(tag)

    async def read_tagged(self, tag: bytes) -> list[bytes]:
        assert self.reader is not None
        lines = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError(f"closed while waiting for {tag!r}")
            lines.append(line)
            if line.startswith(tag + b" "):
                if not line.startswith(tag + b" OK"):
                    raise RuntimeError(f"{line!r}")
                return lines

    async def login(self) -> None:
        t = self.target
        await self.command(b"LOGIN " + _quoted(t.user) + b" " + _quoted(t.password))

    async def idle(self) -> None:
        assert self.reader is not None and self.writer is not None
        self._n += 1
        self._idle_tag = b"b%d" % self._n
        self.writer.write(self._idle_tag + b" IDLE\r\n")
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("closed while waiting for the IDLE continuation")
            if line.startswith(b"+"):
                return

    async def done(self) -> None:
        assert self.writer is not None
        self.writer.write(b"DONE\r\n")
        await self.read_tagged(self._idle_tag)

    async def close(self) -> None:
        if self.writer is None:
            return
        try:
            await asyncio.wait_for(self.command(b"LOGOUT"), 10)
        except (OSError, RuntimeError, ConnectionError, asyncio.TimeoutError):
            pass
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            pass


def _quoted(text: str) -> bytes:
    return b'"' + text.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


async def login_latency(target: Target, count: int = 50) -> LatencyResult:
    logins: list[float] = []
    connects: list[float] = []
    for _ in range(count):
        client = Client(target)
        t0 = time.perf_counter()
        await asyncio.wait_for(client.connect(), target.timeout)
        t1 = time.perf_counter()
        await asyncio.wait_for(client.login(), target.timeout)
        t2 = time.perf_counter()
        await client.close()
        connects.append((t1 - t0) * 1000)
        logins.append((t2 - t1) * 1000)
    rest = logins[1:] or logins
    return LatencyResult(count, logins[0], statistics.median(rest), _percentile(rest, 90),
                         statistics.median(connects))


async def connect_storm(target: Target | list[Target], clients: int = 200,
                        while_idle: Callable[[], object] | None = None) -> StormResult:
    """`clients` at once; client i uses target i modulo their number (several instances or
    users: bench/scaleout.py). `while_idle` is called once every client idles (or failed),
    before they leave."""
    targets = target if isinstance(target, list) else [target]
    opened: list[Client] = []
    failed = 0

    async def one(target: Target) -> None:
        client = Client(target)
        await client.connect()
        opened.append(client)
        await client.login()
        await client.command(b"SELECT " + _quoted(target.mailbox))
        await client.idle()

    t0 = time.perf_counter()
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(one(targets[i % len(targets)]) for i in range(clients)),
                       return_exceptions=True),
        targets[0].timeout)
    seconds = time.perf_counter() - t0
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    failed = len(errors)
    if errors:
        print(f"{failed} clients failed, e.g. {errors[0]!r}", file=sys.stderr)
    if while_idle is not None:
        while_idle()

    async def finish(client: Client) -> None:
        try:
            await asyncio.wait_for(client.done(), 10)
        except (OSError, RuntimeError, ConnectionError, asyncio.TimeoutError, AttributeError):
            pass
        await client.close()
    await asyncio.gather(*(finish(c) for c in opened), return_exceptions=True)
    return StormResult(clients, seconds, failed)


def _percentile(values: list[float], p: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def start_server(base_dir: str, user: str, password: str, workers: int = 1):
    """A throwaway mailsuite with limits wide enough for a storm from one address. `workers`
    > 1: that many processes share the IMAP listeners (docs/design/architecture.md, "Worker
    processes"; not the default, which keeps IMAP in the first process)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.harness import MailServer
    from tests.polling import wait_until

    extra: dict = {
        "limits": {"max_connections_per_ip": 1000, "max_preauth_per_ip": 1000,
                   "max_preauth_per_prefix": 1000, "max_connections": 2000},
        "imap": {"max_commands_per_second": 0},
    }
    if workers > 1:
        extra["server"] = {"workers": workers, "worker_listeners": ["imap", "imaps"]}
    server = MailServer(base_dir, listeners=["imap", "imaps"], extra=extra)
    server.add_user(user, password)
    server.start()
    if workers > 1:
        try:
            wait_until(lambda: server.log_text().count("serving imaps on the listening socket")
                       >= workers - 1, timeout=60, message="the worker processes")
        except BaseException:
            server.stop()
            raise
    return server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=993)
    p.add_argument("--tls", choices=TLS_MODES, default="implicit")
    p.add_argument("--user", default="alice@example.org")
    p.add_argument("--password", default="secret-pw-1")
    p.add_argument("--start-server", action="store_true",
                   help="start a throwaway mailsuite (tests/harness.py) and measure it")
    sub = p.add_subparsers(dest="what", required=True)
    lat = sub.add_parser("latency", help="LOGIN latency on fresh connections")
    lat.add_argument("--count", type=int, default=50)
    storm = sub.add_parser("storm", help="clients connect + LOGIN + SELECT + IDLE at once")
    storm.add_argument("--clients", type=int, default=200)
    args = p.parse_args(argv)
    target = Target(args.host, args.port, args.tls, args.user, args.password)
    server = None
    if args.start_server:
        server = start_server(tempfile.mkdtemp(prefix="imap-clients-"), args.user, args.password)
        target.port = server.ports["imaps" if args.tls == "implicit" else "imap"]
        print(f"server pid {server.process.pid}, port {target.port}", file=sys.stderr)
    try:
        if args.what == "latency":
            r = asyncio.run(login_latency(target, args.count))
            print(f"LOGIN latency over {r.count} connections: first {r.first_ms:.1f} ms, "
                  f"median {r.median_ms:.1f} ms, p90 {r.p90_ms:.1f} ms "
                  f"(connect+TLS+greeting median {r.connect_median_ms:.1f} ms)")
        else:
            s = asyncio.run(connect_storm(target, args.clients))
            print(f"{s.clients} clients connect+LOGIN+SELECT+IDLE: {s.seconds:.2f} s "
                  f"({s.failed} failed)")
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

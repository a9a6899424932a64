#!/usr/bin/env python3
"""IMAP figures for large folders, the rows of the performance table:

    python bench/imap_load.py --messages 100000 --direct --idle-clients 200

prints
    first SELECT, 100k files delivered by another MDA into new/   (fresh process)
    FETCH 1:* (UID FLAGS RFC822.SIZE)            warm (the second run in the session)
    UID FETCH 1:* (BODY.PEEK[HEADER])            warm
    PSS, N idle clients, fresh process
    PSS, N idle clients, after a large (--messages) and a 10k folder were opened once and closed

A throwaway server (`twistd -n mailsuite` via tests/harness.py) runs in a temporary directory.
The large folder is `Big`, the 10k one `Medium`; idle clients select INBOX (a few messages).
With --direct the files are written into new/ with delivery-style names (as another MDA would);
without it, INBOX messages go through SMTP (the large folders are always written directly).

The measuring functions take an `ImapTarget` (host, port, TLS, credentials, the pids whose PSS
counts), so bench/compare.py runs the same workloads against another server:
`fill_new`, `first_select`, `fetch_warm`, `idle_clients`, `pss_kib`, `open_once`.
"""
from __future__ import annotations

import argparse
import os
import re
import smtplib
import socket
import ssl
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

USER = "alice@example.org"
PASSWORD = "secret-pw-1"
FLAGS_FETCH = b"FETCH 1:* (UID FLAGS RFC822.SIZE)"
HEADER_FETCH = b"UID FETCH 1:* (BODY.PEEK[HEADER])"


@dataclass
class ImapTarget:
    """Where and as whom to connect; `pids` returns the processes whose PSS is the server's."""

    host: str
    port: int
    user: str
    password: str
    ssl_context: Optional[ssl.SSLContext] = None  # None: plain IMAP
    pids: Callable[[], list[int]] = field(default=lambda: [])


def message(i: int) -> bytes:
    return (f"From: Sender {i % 97} <sender{i % 97}@remote.example>\r\nTo: {USER}\r\n"
            f"Subject: load test message {i}\r\nDate: Mon, 02 Feb 2026 10:00:00 +0000\r\n"
            f"Message-ID: <load{i}@remote.example>\r\n\r\n"
            f"Small body of message {i}.\r\n").encode()


def fill_new(maildir: str, n: int, start: int = 0) -> float:
    """Write n messages into maildir/new/ with delivery-style names (another MDA's work)."""
    t = time.monotonic()
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(maildir, sub), exist_ok=True)
    host = socket.gethostname()
    base = int(time.time()) - n
    new = os.path.join(maildir, "new")
    for i in range(start, start + n):
        data = message(i)
        name = f"{base + i}.M{i % 1000000}P{os.getpid()}Q{i}.{host},S={len(data)}"
        with open(os.path.join(new, name), "wb") as f:
            f.write(data)
    return time.monotonic() - t


def deliver_smtp(host: str, port: int, n: int, connections: int = 8) -> None:
    per = (n + connections - 1) // connections
    errors: list[BaseException] = []

    def worker(start: int, stop: int) -> None:
        try:
            with smtplib.SMTP(host, port, timeout=120) as c:
                for i in range(start, stop):
                    c.sendmail("sender@remote.example", [USER], message(i))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k * per, min(n, (k + 1) * per)))
               for k in range(connections)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


def pss_kib(pids: list[int]) -> int:
    """Proportional set size of these processes (/proc/PID/smaps_rollup), summed."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except FileNotFoundError:
            continue
    return total


class RawClient:
    """One IMAP connection; `command` reads up to the tagged reply, skipping literals unparsed,
    and returns the number of `* n FETCH` responses."""

    _LITERAL = re.compile(rb"\{(\d+)\}\r\n$")

    def __init__(self, target: ImapTarget):
        sock = socket.create_connection((target.host, target.port), timeout=600)
        if target.ssl_context is not None:
            sock = target.ssl_context.wrap_socket(sock, server_hostname=target.host)
        self.sock = sock
        self.f = sock.makefile("rb", buffering=1 << 20)
        self.f.readline()
        self.n = 0
        self.command(b"LOGIN " + _astring(target.user) + b" " + _astring(target.password))

    def command(self, line: bytes) -> int:
        self.n += 1
        tag = b"t%d " % self.n
        self.sock.sendall(tag + line + b"\r\n")
        fetches = 0
        f = self.f
        while True:
            resp = f.readline()
            if not resp:
                raise RuntimeError("connection closed")
            if resp.startswith(b"* ") and b" FETCH " in resp[:20]:
                fetches += 1
            m = self._LITERAL.search(resp)
            while m:
                f.read(int(m.group(1)))
                resp = f.readline()
                m = self._LITERAL.search(resp)
            if resp.startswith(tag):
                if not resp.startswith(tag + b"OK"):
                    raise RuntimeError(resp)
                return fetches

    def close(self) -> None:
        try:
            self.command(b"LOGOUT")
        except (OSError, RuntimeError):
            pass
        self.sock.close()


def _astring(s: str) -> bytes:
    return b'"' + s.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.monotonic()
    out = fn()
    return time.monotonic() - t, out


def first_select(client: RawClient, folder: str) -> float:
    """SELECT of a folder the server has not opened yet (its files still in new/)."""
    took, _ = timed(lambda: client.command(b"SELECT " + _astring(folder)))
    return took


def fetch_warm(client: RawClient, command: bytes, expect: int) -> float:
    """The second run of `command` in the session (files in the page cache)."""
    for run in range(2):
        took, n = timed(lambda: client.command(command))
        if n != expect:
            raise RuntimeError(f"{command!r}: {n} FETCH responses, expected {expect}")
    return took


def open_once(target: ImapTarget, folder: str, expect: int) -> None:
    """What a client does with a folder it opens once: SELECT, both FETCHes, CLOSE, LOGOUT."""
    c = RawClient(target)
    c.command(b"SELECT " + _astring(folder))
    c.command(FLAGS_FETCH)
    c.command(HEADER_FETCH)
    c.command(b"CLOSE")
    c.close()


def idle_clients(target: ImapTarget, count: int, folder: str = "INBOX") -> list[socket.socket]:
    """`count` connections that logged in, selected `folder` and are in IDLE."""
    socks = []
    for _ in range(count):
        s = socket.create_connection((target.host, target.port), timeout=120)
        if target.ssl_context is not None:
            s = target.ssl_context.wrap_socket(s, server_hostname=target.host)
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"a LOGIN " + _astring(target.user) + b" " + _astring(target.password)
                  + b"\r\nb SELECT " + _astring(folder) + b"\r\nc IDLE\r\n")
        while True:
            line = f.readline()
            if not line:
                raise RuntimeError("idle client lost its connection")
            if line.startswith(b"+"):
                break
        socks.append(s)
    return socks


def idle_pss(target: ImapTarget, count: int, settle: float = 3.0) -> int:
    """PSS (KiB) of the server with `count` idle clients; the clients are closed afterwards."""
    socks = idle_clients(target, count)
    time.sleep(settle)
    try:
        return pss_kib(target.pids())
    finally:
        for s in socks:
            s.close()


# -- the mailsuite run ---------------------------------------------------------------------

def run_mailsuite(messages: int, medium: int, idle: int, direct: bool) -> dict[str, float]:
    from tests.harness import MailServer

    base = tempfile.mkdtemp(prefix="imap-load-")
    server = MailServer(base, listeners=["mx", "imaps"],
                        extra={"limits": {"max_connections": 1000,
                                          "max_connections_per_ip": 1000,
                                          "max_preauth_per_ip": 1000}})
    rows: dict[str, float] = {}
    try:
        server.start()
        server.add_user(USER, PASSWORD)
        target = ImapTarget("127.0.0.1", server.ports["imaps"], USER, PASSWORD,
                            server.ssl_context(), lambda: [server.process.pid])
        c = RawClient(target)  # the first login creates the Maildir and the special folders
        c.command(b'CREATE "Big"')
        c.command(b'CREATE "Medium"')
        c.close()
        root = server.maildir(USER)
        if direct:
            fill_new(root, 20)
        else:
            deliver_smtp("127.0.0.1", server.ports["mx"], 20)
        print(f"writing {messages} + {medium} files into new/ ...", flush=True)
        fill_new(os.path.join(root, ".Big"), messages)
        fill_new(os.path.join(root, ".Medium"), medium)
        server.wait_for_messages(USER, 20, timeout=120) if not direct else None

        server.stop()
        server.start()
        rows["pss_fresh_mib"] = idle_pss(target, idle) / 1024
        _row(f"PSS, {idle} idle clients, fresh process", rows["pss_fresh_mib"], "MiB")

        server.stop()
        server.start()
        c = RawClient(target)
        rows["first_select_s"] = first_select(c, "Big")
        _row(f"first SELECT, {messages} files in new/ (fresh process)", rows["first_select_s"], "s")
        rows["fetch_flags_s"] = fetch_warm(c, FLAGS_FETCH, messages)
        _row("FETCH 1:* (UID FLAGS RFC822.SIZE) warm", rows["fetch_flags_s"], "s")
        rows["fetch_header_s"] = fetch_warm(c, HEADER_FETCH, messages)
        _row("UID FETCH 1:* (BODY.PEEK[HEADER]) warm", rows["fetch_header_s"], "s")
        c.command(b"CLOSE")
        c.close()
        open_once(target, "Medium", medium)
        rows["pss_after_mib"] = idle_pss(target, idle) / 1024
        _row(f"PSS, {idle} idle clients, after a {messages} and a {medium} folder were opened",
             rows["pss_after_mib"], "MiB")
    finally:
        server.stop()
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    return rows


def _row(label: str, value: float, unit: str) -> None:
    print(f"{label:<84} {value:9.3f} {unit}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=10000, help="size of the large folder")
    ap.add_argument("--medium", type=int, default=10000, help="size of the second folder")
    ap.add_argument("--direct", action="store_true",
                    help="INBOX files written into new/ instead of delivered through SMTP")
    ap.add_argument("--idle-clients", type=int, default=200)
    args = ap.parse_args()
    run_mailsuite(args.messages, args.medium, args.idle_clients, args.direct)
    return 0


if __name__ == "__main__":
    sys.exit(main())

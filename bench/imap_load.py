#!/usr/bin/env python3
"""IMAP load figures for a large folder: SELECT, FETCH over the whole folder, and the
server's resident memory with many idle clients.

    python bench/imap_load.py --messages 10000                  # delivered through SMTP (MX port)
    python bench/imap_load.py --messages 100000 --direct        # files written into new/ directly
    python bench/imap_load.py --messages 10000 --idle-clients 200

A throwaway server (`twistd -n mailsuite` via tests/harness.py) is started in a temporary
directory. Mail goes through the MX port and the queue (the real path) unless --direct, which
writes Maildir files with delivery-style names into new/ (much faster for 100k). The server is
restarted after loading, so "first SELECT" is a cold one in a fresh process (no in-memory
index: only the on-disk dovecot-uidlist and index), and "later SELECT" is the next one.
"""
from __future__ import annotations

import argparse
import imaplib
import os
import smtplib
import socket
import ssl
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.harness import MailServer  # noqa: E402

USER = "alice@example.org"
PASSWORD = "secret-pw-1"


def message(i: int) -> bytes:
    return (f"From: Sender {i % 97} <sender{i % 97}@remote.example>\r\nTo: {USER}\r\n"
            f"Subject: load test message {i}\r\nDate: Mon, 02 Feb 2026 10:00:00 +0000\r\n"
            f"Message-ID: <load{i}@remote.example>\r\n\r\n"
            f"Small body of message {i}.\r\n").encode()


def deliver_smtp(server: MailServer, n: int, connections: int = 8) -> float:
    t = time.monotonic()
    per = (n + connections - 1) // connections
    errors: list[BaseException] = []

    def worker(start: int, stop: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=120) as c:
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
    # Wait until the queue has delivered every message into the Maildir.
    while len(server.messages(USER)) < n:
        time.sleep(0.2)
        if time.monotonic() - t > 3600:
            raise RuntimeError("delivery did not finish")
    return time.monotonic() - t


def deliver_direct(server: MailServer, n: int) -> float:
    t = time.monotonic()
    root = server.maildir(USER)
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    host = socket.gethostname()
    base = int(time.time()) - n
    for i in range(n):
        data = message(i)
        name = f"{base + i}.M{i % 1000000}P{os.getpid()}Q{i}.{host},S={len(data)}"
        with open(os.path.join(root, "new", name), "wb") as f:
            f.write(data)
    return time.monotonic() - t


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def connect(server: MailServer) -> imaplib.IMAP4_SSL:
    m = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.ssl_context(),
                          timeout=600)
    m.login(USER, PASSWORD)
    return m


def timed(label: str, fn, results: dict) -> object:
    t = time.monotonic()
    out = fn()
    results[label] = time.monotonic() - t
    print(f"{label:<74} {results[label]:8.3f} s", flush=True)
    return out


class RawClient:
    """Counts `* n FETCH` responses up to the tagged reply, skipping literals unparsed."""

    def __init__(self, server: MailServer):
        sock = socket.create_connection(("127.0.0.1", server.ports["imaps"]), timeout=600)
        self.sock = server.ssl_context().wrap_socket(sock)
        self.f = self.sock.makefile("rb", buffering=1 << 20)
        self.f.readline()
        self.command(f"l LOGIN {USER} {PASSWORD}".encode())

    def command(self, line: bytes) -> int:
        import re

        tag = line.split(b" ", 1)[0] + b" "
        self.sock.sendall(line + b"\r\n")
        fetches = 0
        while True:
            resp = self.f.readline()
            if not resp:
                raise RuntimeError("connection closed")
            if resp.startswith(b"* ") and b" FETCH " in resp[:20]:
                fetches += 1
            m = re.search(rb"\{(\d+)\}\r\n$", resp)
            while m:
                self.f.read(int(m.group(1)))
                resp = self.f.readline()
                m = re.search(rb"\{(\d+)\}\r\n$", resp)
            if resp.startswith(tag):
                if not resp.startswith(tag + b"OK"):
                    raise RuntimeError(resp)
                return fetches

    def close(self) -> None:
        self.sock.close()


def idle_clients(server: MailServer, count: int) -> list[ssl.SSLSocket]:
    ctx = server.ssl_context()
    socks = []
    for i in range(count):
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", server.ports["imaps"]), timeout=60))
        f = s.makefile("rb")
        f.readline()
        s.sendall(f"a LOGIN {USER} {PASSWORD}\r\nb SELECT INBOX\r\nc IDLE\r\n".encode())
        while True:
            line = f.readline()
            if not line:
                raise RuntimeError("idle client lost its connection")
            if line.startswith(b"+"):
                break
        socks.append(s)
    return socks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--direct", action="store_true", help="write files into new/ instead of SMTP")
    ap.add_argument("--idle-clients", type=int, default=200)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()

    base = tempfile.mkdtemp(prefix="imap-load-")
    server = MailServer(base, listeners=["mx", "imaps"],
                        extra={"limits": {"max_connections": 1000, "max_connections_per_ip": 1000}}
                        if _has_connection_limits() else None)
    server.start()
    results: dict = {}
    try:
        server.add_user(USER, PASSWORD)
        m = connect(server)  # first login creates the Maildir and the special folders
        m.logout()
        how = "direct file writes into new/" if args.direct else "SMTP to the MX port (8 connections)"
        print(f"loading {args.messages} messages via {how} ...", flush=True)
        took = deliver_direct(server, args.messages) if args.direct else deliver_smtp(server, args.messages)
        print(f"{'load (' + ('direct' if args.direct else 'SMTP + queue delivery') + ')':<62} {took:8.3f} s")
        server.stop()
        server.start()
        print(f"server restarted (pid {server.process.pid}), RSS {rss_kb(server.process.pid)} kB")
        m = connect(server)
        typ, data = timed("first SELECT INBOX (fresh process, new/ -> cur/)", lambda: m.select("INBOX"), results)
        assert typ == "OK" and int(data[0]) == args.messages, data
        m.close()
        timed("later SELECT INBOX", lambda: m.select("INBOX"), results)
        typ, data = timed("UID FETCH 1:* (UID FLAGS RFC822.SIZE)   [imaplib]",
                          lambda: m.uid("FETCH", "1:*", "(UID FLAGS RFC822.SIZE)"), results)
        assert typ == "OK" and len(data) == args.messages, (typ, len(data))
        typ, data = timed("UID FETCH 1:* (BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)]) [imaplib]",
                          lambda: m.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])"),
                          results)
        assert typ == "OK" and len([d for d in data if isinstance(d, tuple)]) == args.messages
        m.logout()
        # The same commands read by a raw socket (no client-side parsing): the server's time.
        raw = RawClient(server)
        raw.command(b"s SELECT INBOX")
        n = timed("UID FETCH 1:* (UID FLAGS RFC822.SIZE)   [raw socket]",
                  lambda: raw.command(b"f UID FETCH 1:* (UID FLAGS RFC822.SIZE)"), results)
        assert n == args.messages, n
        n = timed("UID FETCH 1:* (BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)]) [raw socket]",
                  lambda: raw.command(b"h UID FETCH 1:* (BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])"),
                  results)
        assert n == args.messages, n
        raw.close()
        m2 = connect(server)
        timed("SELECT INBOX in a second session", lambda: m2.select("INBOX"), results)
        m2.logout()
        pid = server.process.pid
        before = rss_kb(pid)
        print(f"server RSS before idle clients: {before} kB", flush=True)
        t = time.monotonic()
        socks = idle_clients(server, args.idle_clients)
        print(f"{args.idle_clients} clients logged in, selected and idling in {time.monotonic() - t:.1f} s")
        time.sleep(3)
        after = rss_kb(pid)
        print(f"server RSS with {args.idle_clients} idle clients: {after} kB "
              f"({(after - before) / max(1, args.idle_clients):.0f} kB per client)")
        # One new message while everybody idles: how long until every client has its EXISTS?
        t = time.monotonic()
        with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=60) as c:
            c.sendmail("sender@remote.example", [USER], message(args.messages))
        latest = 0.0
        for s in socks:
            s.settimeout(30)
            buf = b""
            while b"EXISTS" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    raise RuntimeError("idle client lost its connection")
                buf += chunk
            latest = time.monotonic() - t
        results["idle_exists"] = latest
        print(f"{'new mail seen as EXISTS by all ' + str(len(socks)) + ' idle clients after':<74} "
              f"{latest:8.3f} s (SMTP accept + queue delivery + IDLE poll)")
        for s in socks:
            s.close()
    finally:
        server.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(base, ignore_errors=True)
        else:
            print("kept", base)
    return 0


def _has_connection_limits() -> bool:
    # limits.max_connections exists in the config; the listeners may or may not enforce it.
    return True


if __name__ == "__main__":
    sys.exit(main())

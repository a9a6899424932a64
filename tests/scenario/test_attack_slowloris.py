"""Attack class: slowloris from many addresses (docs/design/limits.md).

500 slow connections (1 byte every 5 s) from 25 source addresses 127.0.0.2-26, which reconnect
when the server closes them, against MX and against IMAP. The server keeps the crowd to its
network's share and drops its slowest connections to make room: a normal client from 127.0.0.1
- the same /24 as the attackers - is served on each listener during the attack.
"""
from __future__ import annotations

import imaplib
import selectors
import smtplib
import socket
import threading
import time

import pytest

from tests.harness import rss_kib
from tests.polling import wait_until

ATTACKERS = [f"127.0.0.{n}" for n in range(2, 27)]
CONNECTIONS = 500
TRICKLE_EVERY = 5.0
NORMAL_CLIENTS = 8
IDLE = 1.0  # [limits] evict_idle_after for the test (default 10 s): keeps the attack short




class Slowloris:
    """CONNECTIONS sockets from ATTACKERS, one byte each every TRICKLE_EVERY seconds, reopened
    (at most 100 per second) when the server closes them. Counts what the server said."""

    def __init__(self, port: int):
        self.port = port
        self.sel = selectors.DefaultSelector()
        self.stop = threading.Event()
        self.opened = 0
        self.closed_by_server = 0
        self.greetings: dict[bytes, int] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Slowloris":
        self.thread.start()
        return self

    def held(self) -> int:
        return len(self.sel.get_map()) if not self.stop.is_set() else 0

    def _open(self, n: int) -> None:
        src = ATTACKERS[n % len(ATTACKERS)]
        try:
            # Blocking: established before the next one (a burst of non-blocking connects
            # overflows the accept queue, and SYN retries would spread the attack over a minute).
            s = socket.socket()
            s.bind((src, 0))
            s.settimeout(5)
            s.connect(("127.0.0.1", self.port))
            s.setblocking(False)
        except OSError:
            return
        self.opened += 1
        self.sel.register(s, selectors.EVENT_READ, [n, time.monotonic(), b""])

    def _run(self) -> None:
        for n in range(CONNECTIONS):
            self._open(n)
        reopen: list[tuple[float, int]] = []
        while not self.stop.is_set():
            now = time.monotonic()
            for key, _ in self.sel.select(timeout=0.05):
                data = key.data
                try:
                    chunk = key.fileobj.recv(4096)
                except OSError:
                    chunk = b""
                if chunk:
                    data[2] += chunk
                    continue
                first = data[2].split(b"\r\n")[-2:-1] or [data[2][:40]]
                self.greetings[first[0][:12]] = self.greetings.get(first[0][:12], 0) + 1
                self.closed_by_server += 1
                self.sel.unregister(key.fileobj)
                key.fileobj.close()
                reopen.append((now + 0.5, data[0]))
            due = [r for r in reopen if r[0] <= now][:10]  # <= 100 reconnects per second
            for r in due:
                reopen.remove(r)
                self._open(r[1])
            for key in list(self.sel.get_map().values()):
                if now - key.data[1] >= TRICKLE_EVERY:
                    key.data[1] = now
                    try:
                        key.fileobj.send(b"X")
                    except OSError:
                        pass

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(10)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.sel.close()


@pytest.fixture
def srv(make_server):
    s = make_server(listeners=["mx", "imap", "imaps"],
                    extra={"limits": {"evict_idle_after": IDLE}})
    s.add_user("alice@example.org")
    return s


def send_one(srv, n: int) -> bool:
    try:
        with smtplib.SMTP("127.0.0.1", srv.ports["mx"], timeout=10,
                          source_address=("127.0.0.1", 0)) as c:
            c.sendmail("someone@remote.example", ["alice@example.org"],
                       f"Subject: normal {n}\r\n\r\nhello\r\n")
        return True
    except (smtplib.SMTPException, OSError):
        return False


def imap_session(srv) -> bool:
    try:
        m = imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=10)
        m.starttls(ssl_context=srv.ssl_context())
        ok = m.login("alice@example.org", "secret-pw-1")[0] == "OK"
        ok = ok and m.select("INBOX")[0] == "OK"
        m.logout()
        return ok
    except (imaplib.IMAP4.error, OSError):
        return False


def attack(srv, listener: str, normal) -> tuple[int, int, Slowloris]:
    attacker = Slowloris(srv.ports[listener]).start()
    try:
        wait_until(lambda: attacker.opened >= CONNECTIONS, timeout=20, message="the attack")
        started = time.monotonic()
        # The crowd's connections must have been silent for `evict_idle_after` before any can
        # be dropped: a fresh crowd is indistinguishable from fresh clients.
        wait_until(lambda: time.monotonic() - started > IDLE * 1.2, timeout=5,
                   message="the crowd to be idle")
        served = 0
        for n in range(NORMAL_CLIENTS):
            served += normal(n)
            assert attacker.held() > 0  # the attack is still going on
        # The crowd holds no more than its network's share of the listener (plus the
        # connections in flight: reopened, not yet accepted or not yet refused).
        cap = srv.config().limits.max_preauth_per_prefix
        wait_until(lambda: attacker.held() <= cap + 50, timeout=15,
                   message=f"the crowd to hold at most {cap} + 50 connections")
        return served, NORMAL_CLIENTS, attacker
    finally:
        attacker.finish()


def test_slowloris_from_many_addresses_leaves_mx_and_imap_serving(srv):
    before = rss_kib(srv.process.pid)
    served_mx, total_mx, mx_attack = attack(srv, "mx", lambda n: send_one(srv, n))
    served_imap, total_imap, imap_attack = attack(srv, "imap", lambda n: imap_session(srv))
    after = rss_kib(srv.process.pid)
    print(f"\nATTACK slowloris: rss_before={before}KiB rss_after={after}KiB "
          f"served={served_mx + served_imap}/{total_mx + total_imap} "
          f"(mx {served_mx}/{total_mx}, imap {served_imap}/{total_imap}; crowd refused or "
          f"evicted {mx_attack.closed_by_server}+{imap_attack.closed_by_server} times)")
    assert served_mx == total_mx
    assert served_imap == total_imap
    assert len(srv.wait_for_messages("alice@example.org", total_mx)) == total_mx
    # What the crowd was told: SMTP 421 and IMAP BYE, never a traceback.
    assert any(g.startswith(b"421") for g in mx_attack.greetings), mx_attack.greetings
    assert any(g.startswith(b"* BYE") for g in imap_attack.greetings), imap_attack.greetings
    log = srv.log_text()
    assert "Traceback" not in log
    assert "evicted a connection" in log
    assert after - before < 100 * 1024  # KiB: a crowd of idle connections costs little

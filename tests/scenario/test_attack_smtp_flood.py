"""Attack: floods against the MX from many loopback addresses: pipelined command floods, lines
that never end, messages full of NULs, messages with 1,000 Received: fields. Each gets its
protocol answer (421 and a close, 550 5.6.0, 554 5.4.6), nothing of it is queued or bounced, the
server's RSS stays flat, and a normal client is served during the attack.

Prints one `ATTACK smtp_flood_<kind>: rss_before=.. rss_after=.. served=N/M` line per kind.
"""
from __future__ import annotations

import os
import smtplib
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import pytest

from tests.harness import HOST, MailServer, rss_kib, staged_files
from tests.polling import wait_until

CLIENTS = 40




@pytest.fixture(scope="module")
def mx(tmp_path_factory):
    s = MailServer(str(tmp_path_factory.mktemp("flood")), listeners=["mx"])
    s.start()
    try:
        s.add_user("alice@example.org")
        yield s
    finally:
        s.stop()


def connect(server: MailServer, n: int) -> tuple[socket.socket, object]:
    s = socket.create_connection((HOST, server.ports["mx"]), timeout=30,
                                 source_address=(f"127.{n // 200 + 1}.{n % 200 + 1}.9", 0))
    f = s.makefile("rb")
    assert f.readline().startswith(b"220")
    return s, f


def replies_until_close(s: socket.socket, f) -> list[bytes]:
    """Every final reply line until the server closes (a reset counts as a close)."""
    finals = []
    try:
        for line in f:
            if line[3:4] != b"-":
                finals.append(line.rstrip(b"\r\n"))
    except (ConnectionResetError, socket.timeout):
        pass
    s.close()
    return finals


def send_ignoring_reset(s: socket.socket, data: bytes) -> None:
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server closed on us mid-flood: that is the defence


def under_attack(server: MailServer, kind: str, attack: Callable[[int], None]) -> None:
    """Run `attack(n)` for CLIENTS clients at once while a normal client sends mail; check
    that the normal client was served and print the ATTACK line."""
    pid = server.process.pid
    rss_before = rss_kib(pid)
    stop = threading.Event()
    served: list[bool] = []

    def normal() -> None:
        while not stop.is_set():
            try:
                with smtplib.SMTP(HOST, server.ports["mx"], timeout=20) as c:
                    c.sendmail("friend@remote.example", ["alice@example.org"],
                               b"Subject: normal\r\n\r\nnormal client\r\n")
                served.append(True)
            except (smtplib.SMTPException, OSError):
                served.append(False)

    before = len(server.messages("alice@example.org"))
    friend = threading.Thread(target=normal, daemon=True)
    friend.start()
    try:
        with ThreadPoolExecutor(max_workers=20) as pool:
            list(pool.map(attack, range(CLIENTS)))
        wait_until(lambda: len(served) >= 3, timeout=30, message="a few normal messages")
    finally:
        stop.set()
        friend.join(30)
    ok = sum(served)
    server.wait_for_messages("alice@example.org", before + ok, timeout=60)
    rss_after = rss_kib(pid)
    print(f"\nATTACK smtp_flood_{kind}: rss_before={rss_before // 1024}MiB "
          f"rss_after={rss_after // 1024}MiB served={ok}/{len(served)} "
          f"(attack: {CLIENTS} clients)")
    assert ok == len(served)
    assert rss_after - rss_before < 60 * 1024
    # Nothing of the attack reached a mailbox or the queue.
    for path in server.messages("alice@example.org"):
        with open(path, "rb") as f:
            assert b"ATTACK" not in f.read()
    queue = os.path.join(server.data_dir, "queue")
    wait_until(lambda: not [n for n in os.listdir(queue) if n.endswith(".json")], timeout=30,
               message="an empty queue (nothing bounced)")
    # The envelope beside a served message's staged file goes just after its 250, once its
    # log lines are written (docs/design/queue.md, "The mail log"): wait for that, not longer.
    wait_until(lambda: staged_files(server.data_dir) == [], timeout=30,
               message="no staged file left")


def test_pipelined_command_flood_is_cut_off(mx):
    def attack(n: int) -> None:
        s, f = connect(mx, n)
        send_ignoring_reset(s, b"EHLO flood.example\r\n" + b"NOOP\r\n" * 20000)
        finals = replies_until_close(s, f)
        assert finals and finals[-1].startswith(b"421 4.7.0"), finals[-3:]
        assert len(finals) < 1000  # the server stopped answering long before 20,000

    under_attack(mx, "commands", attack)


def test_lines_without_end_are_cut_off(mx):
    def attack(n: int) -> None:
        s, f = connect(mx, n)
        send_ignoring_reset(s, b"EHLO ATTACK.example\r\nNOOP " + b"A" * 1024 * 1024)
        finals = replies_until_close(s, f)
        assert finals[-1].startswith(b"421"), finals

    under_attack(mx, "long_lines", attack)


def test_messages_with_nul_are_refused(mx):
    def attack(n: int) -> None:
        s, f = connect(mx, n)
        body = b"Subject: ATTACK nul\r\n\r\n" + (b"ATTACK\0\0\0" * 100 + b"\r\n") * 200
        s.sendall(b"EHLO nul.example\r\nMAIL FROM:<a@attacker.example>\r\n"
                  b"RCPT TO:<alice@example.org>\r\nDATA\r\n" + body + b".\r\nQUIT\r\n")
        finals = replies_until_close(s, f)
        assert [r[:9] for r in finals] == [b"250 HELP", b"250 2.1.0", b"250 2.1.5", b"354 End d",
                                           b"550 5.6.0", b"221 2.0.0"], finals

    under_attack(mx, "nul", attack)


def test_received_floods_are_refused_at_data(mx):
    def attack(n: int) -> None:
        s, f = connect(mx, n)
        fields = b"".join(b"Received: from hop%d.attacker.example by x; %s\r\n"
                          % (i, uuid.uuid4().hex.encode()) for i in range(1000))
        s.sendall(b"EHLO loop.example\r\nMAIL FROM:<forged@victim.example>\r\n"
                  b"RCPT TO:<alice@example.org>\r\nDATA\r\n" + fields
                  + b"Subject: ATTACK loop\r\n\r\nloop\r\n.\r\nQUIT\r\n")
        finals = replies_until_close(s, f)
        assert finals[-2].startswith(b"554 5.4.6"), finals

    under_attack(mx, "received", attack)

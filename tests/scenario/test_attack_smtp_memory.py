"""Attack: many clients send huge messages slowly to the MX. DATA streams to disk through a
bounded buffer (docs/design/smtp.md, "Memory"), so the server's RSS must not grow with the bytes
in flight; the half-received messages leave nothing behind; the messages that are finished arrive
whole; and a normal client is served all along.

Prints `ATTACK smtp_memory: rss_before=.. rss_after=.. rss_peak=.. served=N/M`.
"""
from __future__ import annotations

import hashlib
import os
import smtplib
import socket
import threading

import pytest

from tests.harness import HOST, MailServer, rss_kib, staged_files
from tests.polling import wait_until

ATTACKERS = 20
MESSAGE_SIZE = 21 * 1024 * 1024  # each, under the default 25 MiB limit
FINISHERS = 2  # attackers that end with the dot: their message must arrive intact
CHUNK = 128 * 1024
LINE = b"x" * 998 + b"\r\n"  # the longest line allowed (RFC 5321 §4.5.3.1.6)




@pytest.fixture
def mx(tmp_path):
    s = MailServer(str(tmp_path / "mx"), listeners=["mx"],
                   extra={"limits": {"max_connections_per_ip": 50, "smtp_timeout": 60}})
    s.start()
    try:
        s.add_user("alice@example.org")
        yield s
    finally:
        s.stop()


def read_reply(f) -> bytes:
    while True:
        line = f.readline()
        if not line:
            raise EOFError("connection closed")
        if line[3:4] != b"-":
            return line


def attacker(server: MailServer, n: int, finish: bool, progress: list[int], errors: list[str],
             go_on: threading.Event) -> None:
    try:
        # Each from its own /24 of the loopback network, like a botnet.
        s = socket.create_connection((HOST, server.ports["mx"]), timeout=60,
                                     source_address=(f"127.0.{n + 10}.1", 0))
        f = s.makefile("rb")
        read_reply(f)
        s.sendall(b"EHLO attacker.example\r\nMAIL FROM:<a@attacker.example>\r\n"
                  b"RCPT TO:<alice@example.org>\r\nDATA\r\n")
        for _ in range(3):
            read_reply(f)
        assert read_reply(f).startswith(b"354")
        s.sendall(b"Subject: big %d\r\n\r\n" % n)
        block = LINE * (CHUNK // len(LINE))
        sent = 0
        while sent < MESSAGE_SIZE:
            s.sendall(block)
            sent += len(block)
            progress[n] = sent
        go_on.wait(60)  # everybody holds their message open at the same time
        if finish:
            s.sendall(b".\r\n")
            reply = read_reply(f)
            assert reply.startswith(b"250"), reply
        s.close()
    except Exception as e:  # reported by the test
        errors.append(f"attacker {n}: {type(e).__name__}: {e}")


def normal_client(server: MailServer, stop: threading.Event, results: list[bool]) -> None:
    while not stop.is_set():
        try:
            with smtplib.SMTP(HOST, server.ports["mx"], timeout=20,
                              source_address=("127.0.0.1", 0)) as c:
                c.sendmail("friend@remote.example", ["alice@example.org"],
                           b"Subject: normal\r\n\r\nhello\r\n")
            results.append(True)
        except (smtplib.SMTPException, OSError):
            results.append(False)


def staged_bytes(data_dir: str) -> int:
    """The size of the staged files; the normal client's own may go between listing and stat."""
    total = 0
    for path in staged_files(data_dir):
        try:
            total += os.path.getsize(path)
        except FileNotFoundError:
            pass
    return total


def test_huge_slow_messages_do_not_grow_memory(mx):
    pid = mx.process.pid
    rss_before = rss_kib(pid)
    progress = [0] * ATTACKERS
    errors: list[str] = []
    go_on = threading.Event()
    stop = threading.Event()
    served: list[bool] = []
    peak = [rss_before]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kib(pid))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    normal = threading.Thread(target=normal_client, args=(mx, stop, served), daemon=True)
    normal.start()
    attackers = [threading.Thread(target=attacker, daemon=True,
                                  args=(mx, n, n < FINISHERS, progress, errors, go_on))
                 for n in range(ATTACKERS)]
    for t in attackers:
        t.start()
    try:
        wait_until(lambda: errors or all(p >= MESSAGE_SIZE for p in progress), timeout=240,
                   interval=0.1, message="every attacker to send its message")
        assert not errors, errors
        # Everything was sent and (TCP buffers aside) read by the server: it is on disk.
        wait_until(lambda: staged_bytes(mx.data_dir) > ATTACKERS * MESSAGE_SIZE * 0.9,
                   timeout=120, interval=0.1, message="the messages on disk")
        peak[0] = max(peak[0], rss_kib(pid))
        go_on.set()
        for t in attackers:
            t.join(120)
        assert not errors, errors
        # The ones that hung up leave nothing behind; the finished ones arrive whole.
        wait_until(lambda: not staged_files(mx.data_dir), timeout=30,
                   message="the staged files of the disconnected attackers to be removed")
        mx.wait_for_messages("alice@example.org", FINISHERS + len([r for r in served if r]),
                             timeout=120)
    finally:
        stop.set()
        go_on.set()
    normal.join(30)
    sampler.join(5)
    big = []
    for path in mx.messages("alice@example.org"):
        if os.path.getsize(path) > MESSAGE_SIZE:
            big.append(path)
    assert len(big) == FINISHERS
    body = LINE * (CHUNK // len(LINE))
    expected = hashlib.sha256(body * (MESSAGE_SIZE // len(body) + (MESSAGE_SIZE % len(body) > 0)))
    for path in big:
        with open(path, "rb") as f:
            data = f.read()
        assert hashlib.sha256(data.split(b"\r\n\r\n", 1)[1]).digest() == expected.digest()
    rss_after = rss_kib(pid)
    ok = sum(served)
    print(f"\nATTACK smtp_memory: rss_before={rss_before // 1024}MiB "
          f"rss_after={rss_after // 1024}MiB rss_peak={peak[0] // 1024}MiB "
          f"served={ok}/{len(served)} (attack: {ATTACKERS} x {MESSAGE_SIZE >> 20} MiB DATA)")
    assert ok == len(served) and ok >= 1
    # 20 messages of 21 MiB in flight: held in RAM they would be +420 MiB. Streamed, each
    # connection holds at most a few hundred KiB (docs/design/smtp.md, "Memory").
    assert peak[0] - rss_before < 100 * 1024, (rss_before, peak[0])

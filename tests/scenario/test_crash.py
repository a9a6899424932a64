"""kill -9 the server while clients are sending: every message that got 250 is delivered once.

Several smtplib clients send to the MX port in a loop; the server is SIGKILLed mid-stream, after a
few hundred messages, and restarted; every message whose DATA got 250 must then be in the Maildir
exactly once (no Message-ID twice: local delivery is idempotent per queue id and recipient,
docs/design/queue.md "Exactly once"), and no half-written file may be in new/ or cur/. The window
between a Maildir rename and the envelope update is also hit deterministically, with fault
injection, in tests/unit/test_queue_exactly_once.py.
"""
from __future__ import annotations

import email
import os
import re
import smtplib
import socket
import threading

from tests.polling import wait_until

ALICE = "alice@example.org"
NAME_RE = re.compile(r",S=(\d+)")


def _client(port: int, n: int, accepted: list[str], stop: threading.Event) -> None:
    body = ("x" * 70 + "\r\n") * 30  # ~2 KiB, so the kill can land inside a write
    i = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                while not stop.is_set():
                    subject = f"crash-{n}-{i}"
                    i += 1
                    msg = (f"From: carol@remote.example\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
                           f"Message-ID: <{subject}@remote.example>\r\n\r\n{body}END {subject}\r\n")
                    smtp.sendmail("carol@remote.example", [ALICE], msg)
                    accepted.append(subject)  # only after the 250
        except (OSError, smtplib.SMTPException):
            stop.wait(0.05)  # the server is down: try again soon, or end when told to stop


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def _delivered(server) -> tuple[dict[str, int], list[str]]:
    """Message-IDs' subjects found in the Maildir (with counts) and files that are not
    complete."""
    found: dict[str, int] = {}
    broken: list[str] = []
    for path in server.messages(ALICE):
        with open(path, "rb") as f:
            data = f.read()
        m = NAME_RE.search(os.path.basename(path))
        msg = email.message_from_bytes(data)
        subject = msg["Subject"] or ""
        if (not m or int(m.group(1)) != len(data) or not data.startswith(b"Return-Path: ")
                or not data.endswith(f"END {subject}\r\n".encode())
                or msg["Message-ID"] != f"<{subject}@remote.example>"):
            broken.append(os.path.basename(path))
            continue
        found[subject] = found.get(subject, 0) + 1
    return found, broken


def test_kill_9_mid_stream_loses_nothing_and_delivers_nothing_twice(make_server):
    server = make_server(listeners=["mx"])
    server.add_user(ALICE)
    accepted: list[str] = []
    stop = threading.Event()
    clients = [threading.Thread(target=_client, args=(server.ports["mx"], n, accepted, stop))
               for n in range(4)]
    for c in clients:
        c.start()
    try:
        # A few hundred: deliveries are in flight all the time, so the kill lands in one.
        wait_until(lambda: len(accepted) >= 300, timeout=60, message="clients sending")
        server.kill()  # SIGKILL while the clients are still sending
        wait_until(lambda: _refused(server.ports["mx"]), timeout=10, message="the server down")
        stop.set()
    finally:
        stop.set()
        for c in clients:
            c.join(15)
    server.start()
    def all_delivered() -> bool:
        found, _ = _delivered(server)
        return all(s in found for s in accepted)
    try:
        wait_until(all_delivered, timeout=30, interval=0.1)
    except AssertionError:
        pass  # reported below, with what is missing
    found, broken = _delivered(server)
    missing = [s for s in accepted if s not in found]
    assert broken == [], f"half-written files in the Maildir: {broken}"
    assert missing == [], f"{len(missing)} of {len(accepted)} accepted messages lost: {missing[:5]}"
    duplicates = {s: n for s, n in found.items() if n > 1}
    assert duplicates == {}, f"delivered more than once: {duplicates}"
    after_restart = server.log_text()[server._log_offset:].count("status=sent")
    print(f"accepted {len(accepted)}, delivered {len(found)}, duplicates {len(duplicates)}, "
          f"delivered after the restart {after_restart}")

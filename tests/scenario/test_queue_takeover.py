"""Two instances on one data_dir; one is killed (-9) under load; the other takes over at once.

Instance A relays remote mail to a "hole" (a port that accepts and never answers), so its spool
entries are in flight, claimed, when it dies; instance B relays to a sink. Half the messages go to
alice only (delivered at spool time), half to an alias with alice and a remote address (spooled:
alice's copy first, then the remote attempt). One client on A stops in the middle of DATA, so A
surely leaves a staged file. B is stopped (SIGSTOP) around the kill so that `queue list` can be
looked at before anyone took over; then B is let go and, with `scan_interval` = 300 s, must take
A's spool over within seconds (docs/design/queue.md, "Instances"). Afterwards: each acknowledged
message is in alice's Maildir exactly once (counted by Message-ID; clients never resend, so a
duplicate cannot be the RFC 1047 lost-reply case), and every copy has a `status=sent` line in one
of the two logs.
"""
from __future__ import annotations

import email
import os
import re
import signal
import smtplib
import socket
import threading

from tests.harness import HOST, maildir_messages
from tests.polling import wait_until
from tests.scenario.test_outbound import SinkServer

ALICE = "alice@example.org"
ALIAS = "both@example.org"
FAR = "far@remote.test"
COPY_ID = re.compile(r"Q([0-9a-f]+)N(\d+)")


def _client(port: int, tag: str, accepted: list[str], stop: threading.Event) -> None:
    body = ("y" * 70 + "\r\n") * 20
    i = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP(HOST, port, timeout=30) as smtp:
                while not stop.is_set():
                    i += 1
                    mid = f"{tag}-{i}"
                    rcpt = ALIAS if i % 2 else ALICE
                    msg = (f"From: carol@sender.test\r\nTo: {rcpt}\r\nSubject: {mid}\r\n"
                           f"Message-ID: <{mid}@sender.test>\r\n\r\n{body}")
                    smtp.sendmail("carol@sender.test", [rcpt], msg)
                    accepted.append(mid)  # only after the 250; a failed one is never resent
        except (OSError, smtplib.SMTPException):
            stop.wait(0.05)


def _half_data(port: int) -> socket.socket:
    """A client that stops in the middle of DATA (the server has a staged file for it)."""
    s = socket.create_connection((HOST, port), timeout=10)
    f = s.makefile("rb")
    f.readline()
    for line in (b"EHLO half.test", b"MAIL FROM:<carol@sender.test>", f"RCPT TO:<{ALICE}>".encode(),
                 b"DATA"):
        s.sendall(line + b"\r\n")
        while True:
            reply = f.readline()
            if reply[3:4] != b"-":
                break
    s.sendall(b"Subject: half\r\n\r\n" + b"z" * 200_000)
    return s


def _hole() -> socket.socket:
    """A port that accepts connections (the kernel's backlog) and never says a word."""
    s = socket.socket()
    s.bind((HOST, 0))
    s.listen(64)
    return s


def _copies(data_dir: str) -> list[tuple[str, str]]:
    """(Message-ID, file name) of every copy in alice's INBOX."""
    out = []
    for path in maildir_messages(os.path.join(data_dir, "mail", "example.org", "alice")):
        with open(path, "rb") as f:
            msg = email.message_from_bytes(f.read())
        out.append((msg["Message-ID"] or "", os.path.basename(path)))
    return out


def test_survivor_takes_over_a_killed_instance_at_once(make_server, tmp_path):
    shared = str(tmp_path / "shared")
    hole = _hole()
    with SinkServer() as sink:
        def extra(relay_port: int) -> dict:
            return {"server": {"data_dir": shared},
                    "queue": {"scan_interval": 300, "retry_schedule": [1]},
                    "courier": {"relay": f"{HOST}:{relay_port}", "relay_tls": "none",
                                "command_timeout": 600}}

        a = make_server(extra=extra(hole.getsockname()[1]), listeners=["mx"], name="a",
                        start=False)
        b = make_server(extra=extra(sink.port), listeners=["mx"], name="b", start=False)
        a.add_user(ALICE)
        store = a.directory()
        try:
            store.add_alias(ALIAS, [ALICE, FAR])
        finally:
            store.close()
        a.start()
        b.start()
        accepted: list[str] = []
        stop = threading.Event()
        clients = [threading.Thread(target=_client, args=(s.ports["mx"], f"{s.hostname}{n}{k}",
                                                           accepted, stop))
                   for k, s in enumerate((a, b)) for n in range(3)]
        for c in clients:
            c.start()
        half = None
        try:
            wait_until(lambda: len(accepted) >= 300, timeout=120, message="300 messages")
            half = _half_data(a.ports["mx"])
            incoming = os.path.join(shared, "queue", "incoming")
            a_pid = a.process.pid
            # Not one of A's spool-time envelope files (`.env`, kept for reuse).
            wait_until(lambda: any(n.startswith(f"{a_pid}.") and not n.endswith(".env")
                                   for _, _, ns in os.walk(incoming) for n in ns),
                       timeout=15, message="A's staged file")
            os.kill(b.process.pid, signal.SIGSTOP)  # nobody takes over yet
            try:
                a.kill()
                listing = b.admin("queue", "list").stdout
            finally:
                os.kill(b.process.pid, signal.SIGCONT)
            # The fast path: well before the 300 s scan. A's entries were claimed by A (its
            # remote attempts hang), so each of those present now must be delivered by B.
            spool = os.path.join(shared, "queue")
            left = {n for n in os.listdir(spool) if n.endswith(".json")}
            assert left, "A had nothing in flight: the test proves nothing"

            def taken_over() -> bool:
                staged = [n for _, _, ns in os.walk(incoming) for n in ns]
                return (not left & set(os.listdir(spool))
                        and not any(n.startswith(f"{a_pid}.") for n in staged))

            wait_until(taken_over, timeout=15, interval=0.1, message="B took A's spool over")
        finally:
            stop.set()
            for c in clients:
                c.join(60)
            if half is not None:
                half.close()
        wait_until(lambda: not [n for n in os.listdir(spool) if n.endswith(".json")],
                   timeout=30, message="the spool empty")
        assert "dead" in listing, listing
        copies = _copies(shared)
        by_id: dict[str, int] = {}
        for mid, _ in copies:
            by_id[mid] = by_id.get(mid, 0) + 1
        twice = {m: n for m, n in by_id.items() if n > 1}
        assert twice == {}, f"delivered more than once: {twice}"
        missing = [m for m in accepted if f"<{m}@sender.test>" not in by_id]
        assert missing == [], f"{len(missing)} acknowledged messages lost: {missing[:5]}"
        forwarded = {m.data.split(b"Message-ID: <", 1)[1].split(b"@", 1)[0].decode()
                     for m in sink.state.messages if b"Message-ID: <" in m.data}
        lost = [m for m, i in ((m, int(m.rsplit("-", 1)[1])) for m in accepted)
                if i % 2 and m not in forwarded]
        assert lost == [], f"{len(lost)} forwarded copies lost: {lost[:5]}"
        logs = a.log_text() + b.log_text()
        unlogged = []
        for mid, name in copies:
            m = COPY_ID.search(name)
            assert m, name
            if not re.search(rf"queue_id={m.group(1)} .*to=<{re.escape(ALICE)}> status=sent",
                             logs):
                unlogged.append((mid, name))
        assert unlogged == [], f"{len(unlogged)} copies without a log line: {unlogged[:5]}"
        print(f"accepted {len(accepted)}, copies {len(copies)}, forwarded {len(forwarded)}")
    hole.close()

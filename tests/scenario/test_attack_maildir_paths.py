"""Attack class: Maildir paths that lead out of data_dir.

A hosted domain's directory under mail_dir is replaced by a symlink to a directory outside it
(what a careless restore, a shared /tmp or an earlier escape could leave). Mail to a user of that
domain must be deferred with one log line per attempt and nothing written there; mail to the
other domains is served all along (docs/design/maildir.md, "Paths").
"""
from __future__ import annotations

import os
import re
import shutil
import smtplib
import tempfile
import threading

from tests.harness import rss_kib
from tests.polling import wait_until

VICTIM = "carol@moved.example"
ALICE = "alice@example.org"
ATTACK_MESSAGES = 30
NORMAL_CLIENTS = 4
NORMAL_MESSAGES = 10  # per client




def send(port: int, to: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.sendmail("dave@remote.example", [to],
                      f"From: dave@remote.example\r\nTo: {to}\r\nSubject: {subject}\r\n"
                      f"Message-ID: <{subject}@remote.example>\r\n\r\nhello\r\n")


def test_symlinked_domain_directory_is_never_written_through(make_server):
    server = make_server(listeners=["mx"], extra={"queue": {"retry_schedule": [600]}})
    server.add_user(ALICE)
    server.add_user(VICTIM)
    elsewhere = tempfile.mkdtemp(prefix="elsewhere-", dir="/tmp")
    try:
        domain_dir = os.path.join(server.data_dir, "mail", "moved.example")
        shutil.rmtree(domain_dir, ignore_errors=True)
        os.symlink(elsewhere, domain_dir)
        port = server.ports["mx"]
        send(port, ALICE, "warmup")
        server.wait_for_messages(ALICE, 1)
        rss_before = rss_kib(server.process.pid)

        served: list[str] = []
        failed: list[str] = []

        def normal_client(n: int) -> None:
            for i in range(NORMAL_MESSAGES):
                subject = f"normal-{n}-{i}"
                try:
                    send(port, ALICE, subject)
                    served.append(subject)
                except (OSError, smtplib.SMTPException) as e:
                    failed.append(f"{subject}: {e}")

        clients = [threading.Thread(target=normal_client, args=(n,))
                   for n in range(NORMAL_CLIENTS)]
        for c in clients:
            c.start()
        for i in range(ATTACK_MESSAGES):  # accepted (the user exists), then deferred
            send(port, VICTIM, f"attack-{i}")
        for c in clients:
            c.join(60)

        def deferred_lines() -> list[str]:
            return [line for line in server.log_text().splitlines()
                    if f"to=<{VICTIM}>" in line and "status=deferred" in line]
        wait_until(lambda: len(deferred_lines()) >= ATTACK_MESSAGES, timeout=30,
                   message="every attack message deferred")
        total = NORMAL_CLIENTS * NORMAL_MESSAGES
        server.wait_for_messages(ALICE, 1 + total)
        rss_after = rss_kib(server.process.pid)

        lines = deferred_lines()
        assert len(lines) == ATTACK_MESSAGES  # one line per attempt, one attempt each
        assert all('detail="451 4.3.0 mailbox path leaves the mail directory' in line
                   for line in lines), lines[:2]
        log = server.log_text()
        assert "Traceback" not in log
        assert os.listdir(elsewhere) == [], "written outside data_dir"
        assert failed == [] and len(served) == total
        assert len(server.messages(ALICE)) == 1 + total
        print(f"ATTACK maildir_paths: rss_before={rss_before}KiB rss_after={rss_after}KiB "
              f"served={len(served)}/{total}")
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)

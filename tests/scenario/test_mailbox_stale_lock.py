"""A locked Dovecot uidlist against the real server (issue 13): a stale lock is broken at once
and logged; a live one makes only its own folder's sessions wait, for [mailbox] lock_wait, then
NO [INUSE], while every other user is served; mail delivered meanwhile gets the next UID once
the lock is gone."""
from __future__ import annotations

import os
import poplib
import select
import smtplib
import socket
import subprocess
import sys

import pytest

from mailsuite.mailbox.maildir import UIDLIST
from tests.harness import HOST, subprocess_env
from tests.polling import wait_until
from tests.scenario.imapraw import Raw

LOCK_WAIT = 8.0
# More waiting sessions than the io pool has threads (pools.py): before the fix every thread
# slept in DotLock and nobody else was served.
WAITERS = 20

HOLD_LOCK = """
import os, socket, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
os.write(fd, f"{os.getpid()}:{socket.gethostname()}\\n".encode())
os.close(fd)
print("locked", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def srv(make_server):
    s = make_server(extra={"mailbox": {"lock_wait": LOCK_WAIT},
                           "limits": {"max_connections_per_ip": 100}})
    s.add_user("alice@example.org")
    s.add_user("bob@example.org")
    return s


def send(srv, rcpt: str, subject: str) -> None:
    with smtplib.SMTP(HOST, srv.ports["mx"], timeout=60) as smtp:
        smtp.sendmail("sender@remote.example", [rcpt],
                      f"From: sender@remote.example\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
                      f"\r\n{subject}\r\n".encode())


def subjects_by_uid(srv, address: str) -> list[tuple[int, str]]:
    c = Raw(srv, login_as=address)
    try:
        assert c.cmd(b"S SELECT INBOX")[-1].startswith(b"S OK")
        lines = c.cmd(b"F UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        out = []
        for line in lines[:-1]:
            if b"FETCH" in line:
                uid = int(line.split(b"UID ")[1].split()[0])
                out.append((uid, line.split(b"Subject: ")[1].split(b"\r\n")[0].decode()))
        return sorted(out)
    finally:
        c.close()


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_lock_of_a_dead_process_is_broken_at_once_and_logged(srv):
    send(srv, "alice@example.org", "first")
    srv.wait_for_messages("alice@example.org", 1)
    lock = os.path.join(srv.maildir("alice@example.org"), UIDLIST + ".lock")
    pid = dead_pid()
    with open(lock, "w") as f:
        f.write(f"{pid}:{socket.gethostname()}\n")
    assert subjects_by_uid(srv, "alice@example.org") == [(1, "first")]
    assert not os.path.exists(lock)
    log = wait_until(lambda: "broke stale lock" in srv.log_text() and srv.log_text(),
                     message="the log line about the broken lock")
    [line] = [line for line in log.splitlines() if "broke stale lock" in line]
    assert lock in line and f"owner {pid}:" in line and f"process {pid} is gone" in line


def test_live_lock_stalls_only_its_folder_then_inuse_and_late_mail_in_order(srv):
    send(srv, "alice@example.org", "before")
    send(srv, "bob@example.org", "for bob")
    srv.wait_for_messages("alice@example.org", 1)
    srv.wait_for_messages("bob@example.org", 1)
    assert subjects_by_uid(srv, "alice@example.org") == [(1, "before")]
    lock = os.path.join(srv.maildir("alice@example.org"), UIDLIST + ".lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, lock], env=subprocess_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    waiters: list[Raw] = []
    try:
        assert holder.stdout.readline() == b"locked\n"
        # Mail for alice while her folder is locked: accepted (a Maildir delivery into new/
        # needs no lock), and invisible until the lock goes.
        send(srv, "alice@example.org", "during")
        srv.wait_for_messages("alice@example.org", 2)
        for _ in range(WAITERS):
            c = Raw(srv, timeout=120)
            c.send(b"W SELECT INBOX\r\n")
            waiters.append(c)
        # Everyone else is served while those wait: SMTP, IMAP and POP3 for bob.
        send(srv, "bob@example.org", "bob again")
        srv.wait_for_messages("bob@example.org", 2)
        assert [s for _, s in subjects_by_uid(srv, "bob@example.org")] == ["for bob", "bob again"]
        pop = poplib.POP3_SSL(HOST, srv.ports["pop3s"], context=srv.ssl_context(), timeout=60)
        pop.user("bob@example.org")
        pop.pass_("secret-pw-1")
        assert pop.stat()[0] == 2
        pop.quit()
        readable, _, _ = select.select([c.sock for c in waiters], [], [], 0)
        assert readable == [] and all(not c.buf for c in waiters), \
            "a session on the locked folder was answered before the bound"
        # The bound: each of them is told the folder is in use.
        for c in waiters:
            assert c.response(b"W")[-1].startswith(b"W NO [INUSE] ")
        assert "still locked by" in srv.log_text()
    finally:
        for c in waiters:
            c.close()
        if os.path.exists(lock):
            os.unlink(lock)  # released, as the holder would
        holder.communicate(b"\n", timeout=30)
    send(srv, "alice@example.org", "after")
    srv.wait_for_messages("alice@example.org", 3)
    assert subjects_by_uid(srv, "alice@example.org") == [(1, "before"), (2, "during"),
                                                         (3, "after")]

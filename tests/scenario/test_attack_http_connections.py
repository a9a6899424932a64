"""Attack class "http connections": 1,100 idle connections to the autoconfig listener from 50
loopback addresses, against a server whose file-descriptor limit is the common 1024.

Before, the listener had no limit: the connections took every descriptor, MX and IMAPS accepted
and closed everything and the queue scan failed with EMFILE. The defence
(docs/design/autoconfig.md, "Limits"): LimitedFactory holds at most 128 connections for the
listener and 8 per client (503 beyond), and a connection that has not sent a whole request within
10 s is closed. SMTP and IMAP clients are served throughout, the server's descriptors stay within
the listener's share, and they come back at the deadline. (The kernel's accept queue paces the
handshakes, so a few hundred of the 1,100 reach the server within the test.) Prints
`ATTACK http_connections: ...` (run with -s)."""
from __future__ import annotations

import errno
import imaplib
import os
import resource
import select
import smtplib
import socket

from mailsuite.autoconfig.web import REQUEST_TIMEOUT
from tests.harness import HOST, rss_kib
from tests.polling import wait_until

CONNECTIONS = 1100
ADDRESSES = 50  # 127.0.0.10 .. 127.0.0.59, 22 connections each
SERVER_FD_LIMIT = 1024




def open_idle(port: int) -> list[socket.socket]:
    """CONNECTIONS non-blocking connects that never send a byte."""
    socks = []
    for i in range(CONNECTIONS):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((f"127.0.0.{10 + i % ADDRESSES}", 0))
        s.setblocking(False)
        err = s.connect_ex((HOST, port))
        assert err in (0, errno.EINPROGRESS), err
        socks.append(s)
    return socks


def answered(socks: list[socket.socket]) -> list[socket.socket]:
    """The sockets the server has answered (503/408) or hung up."""
    poller = select.poll()
    by_fd = {s.fileno(): s for s in socks}
    for fd in by_fd:
        poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
    return [by_fd[fd] for fd, _ in poller.poll(0)]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def smtp_ok(server) -> bool:
    try:
        with smtplib.SMTP(HOST, server.ports["mx"], timeout=10) as smtp:
            smtp.sendmail("someone@example.net", ["bob@example.org"],
                          b"From: someone@example.net\r\nSubject: during\r\n\r\nhi\r\n")
        return True
    except (OSError, smtplib.SMTPException):
        return False


def imap_ok(server) -> bool:
    try:
        imap = imaplib.IMAP4_SSL(HOST, server.ports["imaps"], ssl_context=server.ssl_context(),
                                 timeout=10)
        imap.login("bob@example.org", "secret-pw-1")
        imap.select("INBOX")
        imap.logout()
        return True
    except (OSError, imaplib.IMAP4.error):
        return False


def test_idle_http_connections_do_not_starve_the_other_listeners(make_server):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The server inherits the limit it is started with; the test process needs more than it.
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(SERVER_FD_LIMIT, hard), hard))
    try:
        server = make_server()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    server.add_user("bob@example.org")
    pid = server.process.pid
    assert smtp_ok(server) and imap_ok(server)  # warm up
    rss_before = rss_kib(pid)

    fds_before = open_fds(pid)
    socks = open_idle(server.ports["autoconfig"])
    peak_fds = fds_before
    try:
        # The kernel completes handshakes as fast as its accept queue lets it; the server
        # answers those over the limits with 503 at once and holds at most 128.
        wait_until(lambda: len(answered(socks)) >= 50, timeout=15,
                   message="connections over the limits refused")
        tried = served = 0
        for check in (smtp_ok, imap_ok) * 3:
            tried += 1
            served += check(server)
            peak_fds = max(peak_fds, open_fds(pid))
        peak = rss_kib(pid)
        # The idle ones are closed at the request deadline: the descriptors come back.
        def drained() -> bool:
            nonlocal peak_fds
            fds = open_fds(pid)
            peak_fds = max(peak_fds, fds)
            return fds <= fds_before + 10
        wait_until(drained, timeout=REQUEST_TIMEOUT + 10, interval=0.1,
                   message="the idle connections closed at the deadline")
        done = answered(socks)
        answers = set()
        for sock in done:
            try:
                answers.add(sock.recv(64).split(b"\r\n")[0])
            except OSError:
                answers.add(b"reset")
    finally:
        for sock in socks:
            sock.close()
    assert smtp_ok(server) and imap_ok(server)
    rss_after = rss_kib(pid)
    print(f"\nATTACK http_connections: rss_before={rss_before}KiB peak={peak}KiB "
          f"rss_after={rss_after}KiB served={served}/{tried} fds_before={fds_before} "
          f"peak_fds={peak_fds} answered={len(done)}/{CONNECTIONS}")
    assert served == tried
    assert peak_fds < fds_before + 128 + 150  # the listener's share and one accept burst
    assert b"HTTP/1.1 503 Service Unavailable" in answers
    assert b"HTTP/1.1 408 Request Timeout" in answers
    assert answers <= {b"HTTP/1.1 503 Service Unavailable", b"HTTP/1.1 408 Request Timeout",
                       b"reset"}, answers
    log = server.log_text()
    assert "EMFILE" not in log and "Too many open files" not in log
    assert "Traceback" not in log
    assert len(server.wait_for_messages("bob@example.org", 4, timeout=15)) >= 4

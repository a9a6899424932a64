"""Attack class: file-descriptor exhaustion through one listener (docs/design/limits.md).

1,100 idle connections to the autoconfig HTTP listener of a server whose RLIMIT_NOFILE is 512:
without a process-wide budget they took every descriptor, MX and IMAPS accepted and closed
everything and the queue scan failed with EMFILE. With `[limits] max_open_files` the listener
holds its share and refuses the rest (HTTP 503); MX, IMAPS and the queue keep working.
"""
from __future__ import annotations

import imaplib
import resource
import selectors
import smtplib
import socket

from tests.harness import rss_kib
from tests.polling import wait_until

IDLE_CONNECTIONS = 1100
BUDGET = 300  # [limits] max_open_files
SHARE = 50  # [limits] listener_files_percent


def test_idle_http_flood_leaves_mx_imaps_and_the_queue_serving(make_server):
    srv = make_server(listeners=["mx", "imaps", "autoconfig"],
                      extra={"limits": {"max_open_files": BUDGET,
                                        "listener_files_percent": SHARE}})
    srv.add_user("alice@example.org")
    # The server raised its soft limit to the hard one at start-up; make it small, as on a
    # host with the common 1024 default, for the whole attack.
    resource.prlimit(srv.process.pid, resource.RLIMIT_NOFILE, (512, 512))
    before = rss_kib(srv.process.pid)
    sel = selectors.DefaultSelector()
    refused = {"n": 0, "503": 0}
    try:
        for n in range(IDLE_CONNECTIONS):
            # One at a time, so that the kernel's accept queue does not drop SYNs (their
            # retries would trickle in for a minute): every connection reaches the server.
            s = socket.socket()
            s.bind((f"127.0.{1 + n // 250}.{2 + n % 250}", 0))
            s.settimeout(10)
            s.connect(("127.0.0.1", srv.ports["autoconfig"]))
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, [b""])

        def drain() -> int:
            for key, _ in sel.select(timeout=0.05):
                try:
                    chunk = key.fileobj.recv(4096)
                except OSError:
                    chunk = b""
                if chunk:
                    key.data[0] += chunk
                    continue
                refused["n"] += 1
                refused["503"] += key.data[0].startswith(b"HTTP/1.1 503")
                sel.unregister(key.fileobj)
                key.fileobj.close()
            return refused["n"]

        held_at_most = BUDGET * SHARE // 100
        wait_until(lambda: drain() >= IDLE_CONNECTIONS - held_at_most, timeout=30,
                   message="the flood beyond the listener's share to be refused")

        served, attempts = 0, 0
        for n in range(5):
            attempts += 1
            try:
                with smtplib.SMTP("127.0.0.1", srv.ports["mx"], timeout=10) as c:
                    c.sendmail("someone@remote.example", ["alice@example.org"],
                               f"Subject: during the flood {n}\r\n\r\nhello\r\n")
                served += 1
            except (smtplib.SMTPException, OSError):
                pass
        for _ in range(3):
            attempts += 1
            try:
                m = imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"],
                                      ssl_context=srv.ssl_context(), timeout=10)
                ok = m.login("alice@example.org", "secret-pw-1")[0] == "OK"
                ok = ok and m.select("INBOX")[0] == "OK"
                m.logout()
                served += ok
            except (imaplib.IMAP4.error, OSError):
                pass
        # The queue opened its files and delivered while the flood still held its share.
        delivered = srv.wait_for_messages("alice@example.org", 5)
        held = len(sel.get_map())
        after = rss_kib(srv.process.pid)
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()
    print(f"\nATTACK fd_exhaustion: rss_before={before}KiB rss_after={after}KiB "
          f"served={served}/{attempts} (flood: {held} held, {refused['n']} refused, "
          f"{refused['503']} with 503; {len(delivered)}/5 delivered)")
    assert served == attempts
    assert len(delivered) == 5
    assert held <= held_at_most
    assert refused["503"] > 0
    log = srv.log_text()
    assert "EMFILE" not in log and "Too many open files" not in log
    assert "Traceback" not in log

"""The queue in the real server: SMTP in, Maildir out, restarts, and the queue admin commands."""
from __future__ import annotations

import os
import smtplib
import time

import pytest

from mailsuite.queue.spool import QueueEntry, Recipient, Spool, new_queue_id
from tests.harness import MailServer
from tests.polling import wait_until

ALICE = "alice@example.org"
BOB = "bob@example.org"
CARL = "carl@example.org"  # each test that breaks a Maildir has a user of its own
DORA = "dora@example.org"
ERIN = "erin@example.org"


def send(server, rcpts: list[str], subject: str, sender: str = "carol@remote.example") -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as smtp:
        smtp.sendmail(sender, rcpts, f"From: {sender}\r\nSubject: {subject}\r\n\r\n"
                                     f"Hello {subject}.\r\n")


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def queue_ids(server) -> list[str]:
    return Spool(os.path.join(server.data_dir, "queue")).ids()


def attempted(server) -> list[str]:
    """Ids of the entries that have had a (failed) attempt, read from the envelopes."""
    entries = Spool(os.path.join(server.data_dir, "queue")).entries()
    return [e.id for e in entries if all(r.attempts for r in e.recipients)]


def wait(predicate, timeout: float = 10.0):
    return wait_until(predicate, timeout=timeout, interval=0.05)


def break_maildir(server, address: str) -> str:
    """A regular FILE where new/ should be: even root cannot deliver into that."""
    maildir = server.maildir(address)
    for sub in ("cur", "tmp"):
        os.makedirs(os.path.join(maildir, sub), exist_ok=True)
    with open(os.path.join(maildir, "new"), "w"):
        pass
    return maildir


def fix_maildir(maildir: str) -> None:
    os.unlink(os.path.join(maildir, "new"))
    os.mkdir(os.path.join(maildir, "new"), 0o700)


@pytest.fixture(scope="module")
def mx(tmp_path_factory):
    """One server for this module (each admin CLI call costs seconds on a loaded machine).

    scan_interval is long so that `queue retry` is proven to work through the kick file.
    """
    server = MailServer(str(tmp_path_factory.mktemp("queue-mx")), listeners=["mx"],
                        extra={"queue": {"scan_interval": 60.0}})
    server.start()
    try:
        server.add_domain("example.org")
        for address in (ALICE, BOB, CARL, DORA):
            server.admin("user", "add", address, "--password-stdin", input="secret-pw-1\n")
        yield server
    finally:
        server.stop()


def test_mx_message_lands_in_maildir_with_trace_headers(mx):
    send(mx, ["Alice+news@Example.org", BOB], "hello")
    [a] = mx.wait_for_messages(ALICE)
    [b] = mx.wait_for_messages(BOB)
    data = read(a)
    # The trace fields of final delivery, then what MX added on arrival: our
    # Authentication-Results (docs/design/trust.md) above our Received.
    assert data.startswith(b"Return-Path: <carol@remote.example>\r\n"
                           b"Delivered-To: alice@example.org\r\n"
                           b"Authentication-Results: mx.test.example;")
    assert data.index(b"\r\nReceived: ") < data.index(b"\r\n\r\n")
    assert data.endswith(b"Hello hello.\r\n")
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF everywhere
    assert read(b).startswith(b"Return-Path: <carol@remote.example>\r\n"
                              b"Delivered-To: bob@example.org\r\n")
    assert wait(lambda: queue_ids(mx) == [])
    log = mx.log_text()
    assert "to=<alice@example.org> status=sent" in log
    assert "orig_to=<Alice+news@Example.org>" in log
    os.unlink(a)  # the next test counts alice's messages
    os.unlink(b)


def test_alias_to_two_users_and_duplicate_rcpt_give_one_copy_each(mx):
    mx.admin("alias", "add", "team@example.org", ALICE, BOB)
    send(mx, ["team@example.org", ALICE], "team")
    [b] = mx.wait_for_messages(BOB)
    assert wait(lambda: queue_ids(mx) == [])
    [a] = mx.messages(ALICE)
    os.unlink(a)
    os.unlink(b)


def test_entries_left_by_a_stopped_server_are_delivered_at_start(mx):
    mx.stop()
    # As if the server had said 250 and died before delivering: only the spool has them.
    spool = Spool(os.path.join(mx.data_dir, "queue"))
    for i in range(3):
        entry = QueueEntry(new_queue_id(), "carol@remote.example",
                           [Recipient(ERIN, ERIN, True)], time.time())
        spool.store(entry, f"Subject: left {i}\r\n\r\nbody\r\n".encode())
    mx.start()
    assert len(mx.wait_for_messages(ERIN, 3)) == 3
    assert wait(lambda: queue_ids(mx) == [])


def test_failed_delivery_stays_queued_and_retry_delivers_promptly(mx):
    maildir = break_maildir(mx, CARL)
    send(mx, [CARL], "stuck")
    [qid] = wait(lambda: attempted(mx))
    listing = mx.admin("queue", "list").stdout
    assert "cannot write Maildir" in listing
    assert qid in listing and CARL in listing and "pending" in listing
    assert "next attempt in 4m" in listing  # retry_schedule starts at 300 s
    fix_maildir(maildir)
    mx.admin("queue", "retry", qid)
    began = time.monotonic()  # the CLI itself takes seconds here; time the server's part
    assert mx.wait_for_messages(CARL, timeout=5)
    assert time.monotonic() - began < 2.5
    assert wait(lambda: queue_ids(mx) == [])
    assert mx.admin("queue", "list").stdout.strip() == "queue is empty"


def test_hold_release_delete_show(mx):
    maildir = break_maildir(mx, DORA)
    send(mx, [DORA], "held")
    send(mx, [DORA], "deleted")
    held, doomed = wait(lambda: len(attempted(mx)) == 2 and attempted(mx))
    assert mx.admin("queue", "hold", held).returncode == 0
    assert "[held]" in mx.admin("queue", "list").stdout
    show = mx.admin("queue", "show", doomed).stdout
    assert '"sender": "carol@remote.example"' in show and "Subject: " in show
    assert mx.admin("queue", "delete", doomed).stdout.strip() == f"deleted {doomed}"
    fix_maildir(maildir)
    rescans = mx.log_text().count("retry requested by the admin")
    mx.admin("queue", "retry", "--all")
    # The server has seen the kick and rescanned; a message sent after that is delivered, the
    # held one is not (that nothing is attempted for a held entry is proven on a fake clock in
    # tests/unit/test_queue_runner.py).
    wait(lambda: mx.log_text().count("retry requested by the admin") > rescans)
    send(mx, [DORA], "probe")
    [probe] = mx.wait_for_messages(DORA, timeout=5)
    assert b"Subject: probe" in read(probe)
    assert wait(lambda: queue_ids(mx) == [held])
    assert [p for p in mx.messages(DORA) if b"Subject: held" in read(p)] == []  # held
    os.unlink(probe)
    mx.admin("queue", "release", held)
    [path] = mx.wait_for_messages(DORA, timeout=5)
    assert b"Subject: held" in read(path)
    assert wait(lambda: queue_ids(mx) == [])


def test_unknown_id_is_one_line_and_exit_1(mx):
    for action in ("show", "delete", "release"):
        result = mx.admin("queue", action, "0123456789abcdef0123", check=False)
        assert result.returncode == 1
        assert result.stderr == "mailsuite: no queue entry 0123456789abcdef0123\n"
        assert result.stdout == ""


def test_two_servers_on_one_spool_deliver_once(make_server):
    first = make_server(listeners=["mx"], name="first")
    first.add_user(ALICE)
    second = make_server(listeners=["mx"], name="second",
                         extra={"server": {"data_dir": first.data_dir}})
    for i in range(20):
        send(first if i % 2 else second, [ALICE], f"shared {i}")
    assert len(first.wait_for_messages(ALICE, 20)) == 20
    # Once the shared spool is empty nothing is left to deliver: the count is final.
    assert wait(lambda: queue_ids(first) == [])
    assert len(first.messages(ALICE)) == 20
    assert wait(lambda: queue_ids(first) == [])

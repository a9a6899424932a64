"""Two instances on one PostgreSQL database and one data_dir (issue 13): IDLE on one sees a
delivery made by the other through a notification (the poll is set longer than the test's
deadline), `user disable` from the CLI ends an open session on another instance, a guesser
alternating between instances gets the delays of one, and connection limits are counted per
instance (docs/design/limits.md, "Across instances").

PostgreSQL comes from $MAILSUITE_TEST_PG, else 127.0.0.1:5432; each run uses a database of
its own (h_shared_<random>), dropped afterwards.
"""
from __future__ import annotations

import imaplib
import re
import smtplib
import socket
import time
import uuid

import pytest

from tests.environment import require_postgresql
from tests.harness import HOST, MailServer
from tests.polling import wait_until
from tests.scenario.imapraw import PASSWORD, Raw, admitted, tagged

POLL = 60.0  # [imap] idle_poll: longer than any deadline below
PER_IP = 4  # [limits] max_connections_per_ip


@pytest.fixture(scope="module")
def database():
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    base = require_postgresql()
    name = "h_shared_" + uuid.uuid4().hex[:12]
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def instances(tmp_path_factory, database):
    base = tmp_path_factory.mktemp("instances")
    shared = str(base / "data")
    extra = {"database": {"url": database}, "server": {"data_dir": shared},
             "imap": {"idle_poll": POLL},
             "limits": {"auth_failure_delay": 0.2, "max_connections_per_ip": PER_IP}}
    a = MailServer(str(base / "a"), extra=extra, listeners=["mx", "imaps", "pop3s"])
    b = MailServer(str(base / "b"), extra=extra, listeners=["mx", "imaps", "pop3s"])
    a.data_dir = b.data_dir = shared  # for the helpers that look there (the certificate)
    for user in ("idler@example.org", "leaver@example.org", "guessed@example.org",
                 "reconnected@example.org"):
        a.add_user(user, PASSWORD)
    a.start()
    try:
        b.start()
        try:
            for srv in (a, b):
                wait_until(lambda: "listening for changes from other instances" in srv.log_text(),
                           message="the LISTEN connection")
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


def send_mail(srv: MailServer, rcpt: str, subject: str) -> None:
    with smtplib.SMTP(HOST, srv.ports["mx"], timeout=30) as smtp:
        smtp.sendmail("sender@remote.example", [rcpt],
                      f"From: sender@remote.example\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\n"
                      "hello\r\n")


def test_idle_on_one_instance_sees_a_delivery_on_the_other(instances):
    idle_sees_deliveries(*instances, "idler@example.org")


def idle_sees_deliveries(a: MailServer, b: MailServer, user: str) -> None:
    idler = Raw(a, login_as=user, timeout=15)
    try:
        idler.cmd(b"s SELECT INBOX")
        idler.send(b"i IDLE\r\n")
        assert idler.line().startswith(b"+")
        for n in range(3):
            send_mail(b, user, f"through the other instance {n}")
            acknowledged = time.monotonic()
            # The poll is POLL (60) s away: an EXISTS within 15 s came from the notification.
            while not (line := idler.line()).endswith(b"EXISTS"):
                pass
            assert line == b"* %d EXISTS" % (n + 1)
            print(f"EXISTS on A {1000 * (time.monotonic() - acknowledged):.1f} ms after "
                  "B's 250")
        idler.send(b"DONE\r\n")
        assert tagged(idler.response(b"i")).startswith(b"i OK")
    finally:
        idler.close()


def test_disable_from_the_cli_ends_the_sessions_on_every_instance(instances):
    a, b = instances
    user = "leaver@example.org"
    on_a = Raw(a, login_as=user, timeout=15)
    try:
        assert tagged(on_a.cmd(b"s SELECT INBOX")).startswith(b"s OK")
        pop = socket.create_connection((HOST, b.ports["pop3s"]), timeout=15)
        pop = b.ssl_context().wrap_socket(pop)
        pop_lines = pop.makefile("rb")
        assert pop_lines.readline().startswith(b"+OK")
        for line in (f"USER {user}", f"PASS {PASSWORD}"):
            pop.sendall(line.encode() + b"\r\n")
            assert pop_lines.readline().startswith(b"+OK")
        b.admin("user", "disable", user)  # a CLI process, through the database
        assert on_a.line() == b"* BYE account disabled"
        assert pop_lines.readline() == b""  # POP3: the connection is closed
        with imaplib.IMAP4_SSL(HOST, b.ports["imaps"], ssl_context=b.ssl_context()) as c:
            with pytest.raises(imaplib.IMAP4.error):
                c.login(user, PASSWORD)
        assert "leaver@example.org: account disabled by the administrator; 1 open sessions" \
            in a.log_text()
    finally:
        on_a.close()


def held_delays(srv: MailServer, user: str) -> list[float]:
    pattern = re.compile(rf"authentication failed for {re.escape(user)} from 127\.0\.0\.1: "
                         r"wrong password \(reply held ([0-9.]+) s\)")
    return [float(m) for m in pattern.findall(srv.log_text())]


def test_failures_alternating_between_instances_are_slowed_as_on_one(instances):
    a, b = instances
    user = "guessed@example.org"
    for n in range(6):
        srv = (a, b)[n % 2]
        with imaplib.IMAP4_SSL(HOST, srv.ports["imaps"], ssl_context=srv.ssl_context()) as c:
            with pytest.raises(imaplib.IMAP4.error):
                c.login(user, "guess")
    # auth_failure_delay (0.2 s) times the failures so far, counted by both instances.
    assert held_delays(a, user) == [0.2, 0.6, 1.0]
    assert held_delays(b, user) == [0.4, 0.8, 1.2]
    with imaplib.IMAP4_SSL(HOST, b.ports["imaps"], ssl_context=b.ssl_context()) as c:
        c.login(user, PASSWORD)  # a success forgets them everywhere
    with imaplib.IMAP4_SSL(HOST, a.ports["imaps"], ssl_context=a.ssl_context()) as c:
        with pytest.raises(imaplib.IMAP4.error):
            c.login(user, "typo")
    assert held_delays(a, user)[-1] == 0.2


def test_connections_per_address_are_counted_per_instance(instances):
    a, b = instances
    held: list[Raw] = []
    try:
        for _ in range(PER_IP):
            conn = admitted(a)
            assert conn is not None
            held.append(conn)
        assert admitted(a) is None  # the cap of this instance, from this address
        other = admitted(b)  # the other instance counts its own connections
        assert other is not None
        held.append(other)
    finally:
        for conn in held:
            conn.close()


def test_the_listening_connection_comes_back_after_it_is_cut(instances, database):
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    a, b = instances
    before = a.log_text().count("listening for changes from other instances")
    admin = create_engine(database, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            cut = conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :db "
                "AND query LIKE 'LISTEN%'"), {"db": make_url(database).database}).all()
    finally:
        admin.dispose()
    assert len(cut) == 2  # one per instance
    wait_until(lambda: a.log_text().count("listening for changes from other instances")
               > before, message="A listening again")
    assert "change notifications from other instances interrupted" in a.log_text()
    wait_until(lambda: b.log_text().count("listening for changes from other instances") > 1,
               message="B listening again")
    idle_sees_deliveries(a, b, "reconnected@example.org")

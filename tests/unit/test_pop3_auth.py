"""POP3 AUTHORIZATION state in memory: STLS, USER/PASS and SASL PLAIN only under TLS, failures
held back by the directory's throttle, the maildrop lock."""
from __future__ import annotations

import pytest
from twisted.logger import globalLogPublisher

from tests.unit.pop3kit import PASSWORD, USERS, Pop3World, message, plain
from tests.unit.smtpkit import FakeTLS

ALICE = USERS[0]


@pytest.fixture
def world(tmp_path):
    return Pop3World(str(tmp_path / "mail"), auth_failure_delay=0.3, max_auth_failures=3)


def capa(c) -> list[bytes]:
    assert c.command("CAPA").startswith(b"+OK")
    return c.multiline()


def test_plaintext_login_refused_before_stls(world):
    c = world.connect("pop3")
    assert c.line().startswith(b"+OK")
    caps = capa(c)
    assert b"STLS" in caps and b"USER" not in caps and not any(l.startswith(b"SASL") for l in caps)
    assert b"RESP-CODES" in caps and b"UIDL" in caps and b"TOP" in caps
    assert c.command(f"USER {ALICE}").startswith(b"-ERR [AUTH]")
    assert c.command(f"PASS {PASSWORD}").startswith(b"-ERR [AUTH]")
    assert c.command("AUTH PLAIN " + plain(ALICE)).startswith(b"-ERR [AUTH]")
    assert c.command("STLS").startswith(b"+OK Begin TLS")
    assert c.transport.tls_context is FakeTLS.context
    caps = capa(c)
    assert b"STLS" not in caps and b"USER" in caps and b"SASL PLAIN" in caps
    assert c.command(f"USER {ALICE}").startswith(b"+OK")
    assert c.command(f"PASS {PASSWORD}").startswith(b"+OK")
    assert c.command("STAT") == b"+OK 0 0"
    assert c.command("QUIT").startswith(b"+OK")
    assert c.closed()


def test_pop3s_implicit_tls_and_auth_plain(world):
    world.put(ALICE, message("one"))
    c = world.connect("pop3s")
    c.line()
    caps = capa(c)
    assert b"STLS" not in caps and b"USER" in caps
    assert c.command("AUTH PLAIN " + plain(ALICE)).startswith(b"+OK")
    assert c.command("STAT").startswith(b"+OK 1 ")
    c.command("QUIT")
    # Without an initial response: the server asks with "+ " (RFC 5034 §4).
    c = world.connect("pop3s")
    c.line()
    assert c.command("AUTH PLAIN").startswith(b"+")
    assert c.command(plain(ALICE)).startswith(b"+OK")
    c.command("QUIT")


def test_wrong_password_disabled_user_and_failure_delay(world):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        c = world.connect("pop3s")
        c.line()
        c.command(f"USER {ALICE}")
        t = world.clock.seconds()
        c.send(b"PASS wrong-password\r\n")
        assert c.unread() == b""  # held back by the throttle...
        assert c.line().startswith(b"-ERR [AUTH]")
        c.command(f"USER {ALICE}")
        assert c.command("PASS wrong-again").startswith(b"-ERR [AUTH]")
        assert world.clock.seconds() - t >= 0.3  # ...for 0.3 s, then 0.6 s
        c.command("USER mallory@example.org")  # unknown to the directory: the same failure
        assert c.command(f"PASS {PASSWORD}").startswith(b"-ERR [AUTH] Too many")
        assert c.closed()  # third failure: the connection closes
    finally:
        globalLogPublisher.removeObserver(events.append)
    failed = [e for e in events if e.get("log_format", "").startswith("pop3 login failed")]
    assert failed and all(e["client_ip"] == "127.0.0.1" for e in failed)
    assert world.directory.throttle.failures("127.0.0.1") == 3


def test_stls_discards_pipelined_commands(world):
    """RFC 2595 / CVE-2011-0411: a USER sent in the same packet as STLS must not be answered
    inside TLS."""
    c = world.connect("pop3")
    c.line()
    c.send(b"STLS\r\nUSER " + ALICE.encode() + b"\r\n")
    assert c.line().startswith(b"+OK Begin TLS")
    assert c.unread() == b""
    assert c.command(f"PASS {PASSWORD}").startswith(b"-ERR")  # USER was thrown away
    assert c.command("QUIT").startswith(b"+OK")


def test_stls_only_once(world):
    c = world.connect("pop3s")
    c.line()
    assert c.command("STLS").startswith(b"-ERR")
    assert b"STLS" not in capa(c)


def test_authzid_other_than_the_user_is_refused(world):
    c = world.connect("pop3s")
    c.line()
    assert c.command("AUTH PLAIN " + plain(ALICE, authzid=USERS[1])).startswith(b"-ERR [AUTH]")
    assert c.command("AUTH PLAIN !!!").startswith(b"-ERR [AUTH]")
    assert c.command("AUTH CRAM-MD5").startswith(b"-ERR")


def test_directory_outage_is_sys_temp(world):
    world.directory.unavailable = True
    c = world.connect("pop3s")
    c.line()
    c.command(f"USER {ALICE}")
    assert c.command(f"PASS {PASSWORD}").startswith(b"-ERR [SYS/TEMP]")


def test_maildrop_in_use(world):
    first = world.login(ALICE, port="pop3")
    second = world.connect("pop3s")
    second.line()
    second.command(f"USER {ALICE}")
    assert second.command(f"PASS {PASSWORD}").startswith(b"-ERR [IN-USE]")
    first.command("QUIT")
    second.command(f"USER {ALICE}")
    assert second.command(f"PASS {PASSWORD}").startswith(b"+OK")
    second.command("QUIT")

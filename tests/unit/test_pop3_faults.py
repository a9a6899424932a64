"""POP3 under environment faults: the directory down at PASS/AUTH, mailbox I/O errors at login,
RETR, during a transfer and at QUIT. Each is -ERR [SYS/TEMP] (RFC 3206) or a clean close, and
ONE log line without a traceback."""
from __future__ import annotations

import errno

import pytest
from twisted.logger import LogLevel, globalLogPublisher

from mailsuite.mailbox.store import Folder, MailStore
from tests.unit.pop3kit import PASSWORD, USERS, Pop3World, message, plain

ALICE = USERS[0]


@pytest.fixture
def world(tmp_path):
    return Pop3World(str(tmp_path / "mail"))


@pytest.fixture
def events():
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def problems(events) -> list[dict]:
    """Events at WARN or above; none may carry a traceback."""
    assert not [e for e in events if "log_failure" in e], "a traceback was logged"
    return [e for e in events if e.get("log_level", LogLevel.info) >= LogLevel.warn]


def eio(*args, **kwargs):
    raise OSError(errno.EIO, "Input/output error")


def test_directory_down_at_pass_and_auth(world, events):
    world.directory.unavailable = True
    c = world.connect()
    c.line()
    c.command(f"USER {ALICE}")
    assert c.command(f"PASS {PASSWORD}").startswith(b"-ERR [SYS/TEMP]")
    assert c.command("AUTH PLAIN " + plain(ALICE)).startswith(b"-ERR [SYS/TEMP]")
    assert len(problems(events)) == 2
    world.directory.unavailable = False  # back: the same session logs in
    assert c.command("AUTH PLAIN " + plain(ALICE)).startswith(b"+OK")


def test_maildrop_that_cannot_be_read_at_login(world, events, monkeypatch):
    monkeypatch.setattr(MailStore, "account", eio)
    c = world.connect()
    c.line()
    c.command(f"USER {ALICE}")
    assert c.command(f"PASS {PASSWORD}") == (b"-ERR [SYS/TEMP] Cannot open the maildrop, "
                                             b"try again later")
    (line,) = problems(events)
    assert "Input/output error" in line["error"]
    assert not c.closed() and c.command("CAPA").startswith(b"+OK")


def test_message_that_cannot_be_opened(world, events, monkeypatch):
    world.put(ALICE, message("one"))
    c = world.login(ALICE)
    monkeypatch.setattr(Folder, "open_message", eio)
    assert c.command("RETR 1") == b"-ERR [SYS/TEMP] Cannot read the message"
    assert c.command("TOP 1 0") == b"-ERR [SYS/TEMP] Cannot read the message"
    assert len(problems(events)) == 2
    assert c.command("STAT").startswith(b"+OK 1 ")  # the session goes on
    assert c.command("LIST 1").startswith(b"+OK 1 ")


def test_read_error_during_a_transfer_closes_cleanly(world, events, monkeypatch):
    world.put(ALICE, message("big", b"x" * 100 + b"\r\n" * 40000))
    c = world.login(ALICE)
    real_open = Folder.open_message

    class Failing:
        def __init__(self, f):
            self.f, self.reads = f, 0

        def read(self, size):
            self.reads += 1
            if self.reads > 1:
                eio()
            return self.f.read(size)

        def close(self):
            self.f.close()

    monkeypatch.setattr(Folder, "open_message", lambda self, uid: Failing(real_open(self, uid)))
    c.send(b"RETR 1\r\n")
    assert c.line().startswith(b"+OK")
    assert c.closed()  # the response had started: no -ERR possible, the connection is dropped
    (line,) = problems(events)
    assert "Input/output error" in line["error"]
    c.disconnect()
    again = world.login(ALICE)  # the maildrop lock was given back
    assert again.command("STAT").startswith(b"+OK 1 ")


def test_update_that_fails_at_quit(world, events, monkeypatch):
    world.put(ALICE, message("one"))
    c = world.login(ALICE)
    assert c.command("DELE 1").startswith(b"+OK")
    monkeypatch.setattr(Folder, "expunge", eio)
    assert c.command("QUIT").startswith(b"-ERR [SYS/TEMP]")
    assert c.closed()
    assert len(problems(events)) == 1
    c.disconnect()
    monkeypatch.undo()
    again = world.login(ALICE)
    assert again.command("STAT").startswith(b"+OK 1 ")  # kept, and the lock is free

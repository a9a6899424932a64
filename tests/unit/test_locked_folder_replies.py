"""What a client hears when its folder stays locked by another process past [mailbox] lock_wait
(RFC 5530 [INUSE], RFC 2449 [IN-USE]), and that it is served once the lock goes first."""
from __future__ import annotations

import os
import threading

import pytest

from mailsuite.mailbox.maildir import UIDLIST
from mailsuite.mailbox.waits import LockWaitingPool
from mailsuite.pools import InlinePool
from mailsuite.pop3 import server_factory
from tests.unit.imapkit import simple, world  # noqa: F401 (fixture)
from tests.unit.pop3kit import FakeTLS, Pop3World, message
from tests.unit.test_mailbox_locks import live_owner, make_lock
from tests.unit.test_mailbox_store import deliver

WAIT = 2.0


def waiting(c) -> None:
    """Give a connected IMAP client's session the waiting pool service.py gives it."""
    c.proto.pool = LockWaitingPool(InlinePool(), c.clock, WAIT)


def test_imap_select_of_a_locked_folder_is_no_inuse_after_the_bound(world):
    world.deliver("alice@example.org", simple("one"))
    alice, bob = world.connect(), world.connect(login_as="bob@example.org")
    waiting(alice)
    waiting(bob)
    lock = make_lock(os.path.join(world.maildir("alice@example.org"), UIDLIST), live_owner())
    alice.send(b"A SELECT INBOX\r\n")
    assert alice.pending() == b""  # waiting, on the clock
    assert bob.cmd(b"B SELECT INBOX")[-1].startswith(b"B OK")  # another user is served
    world.clock.advance(WAIT)
    assert alice.response(b"A")[-1].startswith(b"A NO [INUSE] ")
    os.unlink(lock)
    lines = alice.cmd(b"C SELECT INBOX")
    assert b"* 1 EXISTS" in lines and lines[-1].startswith(b"C OK")


def test_imap_select_waits_for_a_lock_released_within_the_bound(world):
    world.deliver("alice@example.org", simple("one"))
    alice = world.connect()
    waiting(alice)
    lock = make_lock(os.path.join(world.maildir("alice@example.org"), UIDLIST), live_owner())
    alice.send(b"A SELECT INBOX\r\n")
    world.clock.advance(WAIT / 2)
    assert alice.pending() == b""
    os.unlink(lock)
    world.clock.advance(0.3)
    lines = alice.response(b"A")
    assert b"* 1 EXISTS" in lines and lines[-1].startswith(b"A OK")


def test_pop3_login_to_a_locked_maildrop_is_err_in_use_after_the_bound(tmp_path):
    w = Pop3World(str(tmp_path / "mail"))
    w.factories["pop3s"] = server_factory(w.config, w.directory, w.store,
                                          LockWaitingPool(InlinePool(), w.clock, WAIT),
                                          FakeTLS(), w.clock, implicit_tls=True)
    w.put("alice@example.org", message("one"))
    lock = make_lock(os.path.join(w.maildir("alice@example.org"), UIDLIST), live_owner())
    c = w.connect()
    assert c.line().startswith(b"+OK")
    assert c.command("USER alice@example.org").startswith(b"+OK")
    assert c.command("PASS secret-pw-1").startswith(b"-ERR [IN-USE] ")
    os.unlink(lock)
    assert c.command("USER alice@example.org").startswith(b"+OK")
    assert c.command("PASS secret-pw-1").startswith(b"+OK")
    assert c.command("STAT").startswith(b"+OK 1 ")


def test_imap_idle_outlives_a_lock_held_past_the_bound(world):
    world.deliver("alice@example.org", simple("one"))
    alice = world.connect()
    waiting(alice)
    assert alice.cmd(b"A SELECT INBOX")[-1].startswith(b"A OK")
    alice.send(b"I IDLE\r\n")
    assert alice.line() == b"+ idling"
    lock = make_lock(os.path.join(world.maildir("alice@example.org"), UIDLIST), live_owner())
    deliver(world.maildir("alice@example.org"), 1)  # world.deliver would reuse the first name
    for _ in range(int(3 * WAIT / 0.5)):
        world.clock.advance(0.5)
    assert alice.pending() == b""  # still idling: no tagged NO [INUSE] ends it
    os.unlink(lock)
    for _ in range(4):
        world.clock.advance(0.5)
    alice.send(b"DONE\r\n")
    lines = alice.response(b"I")
    assert b"* 2 EXISTS" in lines and lines[-1].startswith(b"I OK")


class HeldFolderLock:
    """A folder's in-process lock held by another thread, as a session's long sync holds it."""

    def __init__(self, lock) -> None:
        self.lock = lock
        self.taken, self.done = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._hold, daemon=True)
        self.thread.start()
        assert self.taken.wait(10)

    def _hold(self) -> None:
        self.lock.acquire()
        try:
            self.taken.set()
            self.done.wait(10)
        finally:
            self.lock.release()

    def release(self) -> None:
        self.done.set()
        self.thread.join(10)


@pytest.mark.parametrize("command, answer", [
    (b"SEARCH BODY needle", b"* SEARCH 2"),
    (b"FETCH 2 (BODY.PEEK[TEXT])", b"* 2 FETCH (BODY[TEXT] {"),
    (b"SORT (SUBJECT) UTF-8 ALL", b"* SORT 1 2"),
])
def test_a_busy_folder_lock_is_waited_for_never_taken_for_a_vanished_message(world, command,
                                                                            answer):
    # Another process renamed message 2 for a flag change, so this session's path to it is
    # stale and reading it needs the folder lock, which another session holds. The command
    # must wait for the lock (and then answer), never answer as if message 2 were gone.
    world.deliver("alice@example.org", simple("one"))
    world.deliver("alice@example.org", simple("two", body="a needle in it\r\n"))
    alice = world.connect()
    waiting(alice)
    assert alice.cmd(b"A SELECT INBOX")[-1].startswith(b"A OK")
    cur = os.path.join(world.maildir("alice@example.org"), "cur")
    second = sorted(os.listdir(cur))[1]
    os.rename(os.path.join(cur, second), os.path.join(cur, second + "F"))
    state = world.store._state(world.maildir("alice@example.org"))
    state.lock.spin = 0
    held = HeldFolderLock(state.lock)
    try:
        alice.send(b"B " + command + b"\r\n")
        assert alice.pending() == b""  # waiting on the clock, not answered without message 2
    finally:
        held.release()
    world.clock.advance(0.3)
    lines = alice.response(b"B")
    assert lines[-1].startswith(b"B OK")
    assert any(line.startswith(answer) for line in lines), lines

"""Change notifications (mailsuite/notify.py; docs/design/imap.md "IDLE", docs/design/
directory.md "Changes between instances"), in memory on a fake clock: a publish wakes IDLE
without its poll timer firing, another session's APPEND and a delivery through the store are
published, `user disable` ends the account's IMAP and POP3 sessions, NOTIFYs are batched and
an instance's own notifications are not delivered twice."""
from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import task

from mailsuite.directory.logincache import LoginCache
from mailsuite.mailbox.store import MailStore
from mailsuite.notify import (DIRECTORY, MAILBOX, PG_PREFIX, ChangeHub, LocalChangeBus,
                              PostgresChangeBus, mailbox_payload, parse_mailbox_payload)
from mailsuite.pools import InlinePool
from mailsuite.pop3 import server_factory as pop3_factory
from tests.unit.imapkit import World, simple, tagged
from tests.unit.pop3kit import USERS, Pop3World

BOB = "bob@example.org"


class ThreadlessReactor:
    """callFromThread at once: the tests run every 'thread' on this one."""

    def callFromThread(self, fn: Any, *args: Any) -> None:
        fn(*args)


@pytest.fixture
def world(tmp_path):
    w = World(str(tmp_path))
    w.changes = ChangeHub(LocalChangeBus(), ThreadlessReactor())
    return w


def idle_on_inbox(world: World, user: str = BOB) -> tuple[Any, int]:
    r = world.connect(login_as=user)
    resp = r.cmd(b"s SELECT INBOX")
    exists = int([line for line in resp if line.endswith(b"EXISTS")][0].split()[1])
    r.send(b"i IDLE\r\n")
    assert r.line().startswith(b"+")
    return r, exists


def test_a_publish_wakes_idle_without_the_poll(world):
    r, exists = idle_on_inbox(world)
    now = world.clock.seconds()
    world.deliver(BOB, simple("written by another process"))
    assert r.pending() == b""  # nobody polled yet
    world.changes.mailbox_changed("Bob@Example.org", "inbox")
    assert r.line() == b"* %d EXISTS" % (exists + 1)
    assert world.clock.seconds() == now  # the poll timer never had to fire
    r.send(b"DONE\r\n")
    assert tagged(r.response(b"i")).startswith(b"i OK")


def test_a_change_of_another_folder_or_user_wakes_nobody(world):
    r, _ = idle_on_inbox(world)
    world.deliver(BOB, simple("found by the poll only"))
    world.changes.mailbox_changed(BOB, "Sent")
    world.changes.mailbox_changed("alice@example.org", "INBOX")
    assert r.pending() == b""


def test_an_append_in_another_session_wakes_idle_at_once(world):
    r, exists = idle_on_inbox(world)
    other = world.connect(login_as=BOB)
    message = simple("appended")
    resp = other.cmd(b"a APPEND INBOX {%d+}\r\n" % len(message) + message)
    assert tagged(resp).startswith(b"a OK")
    assert r.line() == b"* %d EXISTS" % (exists + 1)


def test_a_delivery_through_the_store_is_published(tmp_path):
    seen: list[tuple[str, str]] = []
    store = MailStore(str(tmp_path / "mail"))
    store.on_delivery = lambda user, folder: seen.append((user, folder))
    source = tmp_path / "message"
    source.write_bytes(simple("queued"))
    account = store.account("Bob@example.org")
    account.deliver_once(b"", str(source), when=1.0, unique="Q1N0")
    account.deliver_once(b"", str(source), when=1.0, unique="Q1N0", recheck=True)  # found
    account.deliver_once(b"", str(source), when=1.0, unique="Q1N1", folder="Junk")
    assert seen == [(BOB, "INBOX"), (BOB, "Junk")]


def test_disable_ends_the_imap_sessions_of_that_account_only(world):
    cache = LoginCache(300, world.clock)
    cache.remember(BOB, b"tag", "stored")
    world.changes.follow_directory(cache)
    idle, _ = idle_on_inbox(world)
    plain = world.connect(login_as=BOB)
    alice = world.connect(login_as="alice@example.org")
    world.changes.bus.publish(DIRECTORY, "disable bob@example.org")
    for r in (idle, plain):
        assert r.line() == b"* BYE account disabled"
        assert r.disconnected
    assert not alice.disconnected and len(cache) == 0
    idle.close()
    plain.close()
    assert world.changes.sessions.of(BOB) == []  # closed sessions leave the registry


def test_a_session_running_a_command_gets_bye_after_it(world):
    r = world.connect(login_as=BOB)
    r.cmd(b"s SELECT INBOX")
    server = r.proto
    server.busy = True  # as while a FETCH streams its literals
    server.end_session("account removed")
    assert r.pending() == b""
    server.busy = False
    server.done()
    assert r.line() == b"* BYE account removed" and r.disconnected


def test_passwd_keeps_the_sessions_and_forgets_the_cache(world):
    cache = LoginCache(300, world.clock)
    cache.remember(BOB, b"tag", "stored")
    world.changes.follow_directory(cache)
    r = world.connect(login_as=BOB)
    world.changes.bus.publish(DIRECTORY, "passwd bob@example.org")
    assert len(cache) == 0 and not r.disconnected
    assert tagged(r.cmd(b"n NOOP")).startswith(b"n OK")


def test_disable_ends_a_pop3_session(tmp_path):
    pop = Pop3World(str(tmp_path / "mail"))
    hub = ChangeHub(LocalChangeBus(), ThreadlessReactor())
    hub.follow_directory(LoginCache(0, pop.clock))
    pop.factories["pop3s"] = pop3_factory(pop.config, pop.directory, pop.store, InlinePool(),
                                          None, pop.clock, implicit_tls=True, changes=hub)
    client = pop.login(USERS[0])
    other = pop.login(USERS[1])
    assert len(hub.sessions.of(USERS[0])) == 1
    hub.bus.publish(DIRECTORY, f"remove {USERS[0]}")
    assert client.closed() and not other.closed()
    client.disconnect()
    assert hub.sessions.of(USERS[0]) == []


def test_mailbox_payloads():
    assert parse_mailbox_payload(mailbox_payload("Bob@Example.org", "inbox")) == (BOB, "INBOX")
    assert parse_mailbox_payload(mailbox_payload(BOB, "Ünïcode/Sub")) == (BOB, "Ünïcode/Sub")
    assert parse_mailbox_payload("not json") is None
    assert parse_mailbox_payload("[1, 2]") is None


class RecordingStore:
    notifies = True

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, str]]] = []

    def notify(self, items: list[tuple[str, str]]) -> None:
        self.batches.append(items)


def test_notifies_are_batched_per_reactor_turn_and_own_ones_skipped():
    clock = task.Clock()
    clock.callFromThread = lambda fn, *a: fn(*a)  # type: ignore[attr-defined]
    store = RecordingStore()
    bus = PostgresChangeBus(store, InlinePool(), clock)
    local: list[str] = []
    bus.subscribe(MAILBOX, local.append)
    for _ in range(3):
        bus.publish(MAILBOX, "x")  # delivered here at once, each time
    bus.publish(DIRECTORY, "disable bob@example.org")
    assert local == ["x", "x", "x"] and store.batches == []
    clock.advance(0)
    assert store.batches == [[(PG_PREFIX + MAILBOX, f"{bus.origin} x"),
                              (PG_PREFIX + DIRECTORY, f"{bus.origin} disable bob@example.org")]]
    bus._received(PG_PREFIX + MAILBOX, f"{bus.origin} x")  # our own, back from PostgreSQL
    bus._received(PG_PREFIX + MAILBOX, "0123456789abcdef y")  # another instance's
    bus._received(PG_PREFIX + MAILBOX, "cli z")
    assert local == ["x", "x", "x", "y", "z"]


def test_an_oversized_payload_stays_local():
    clock = task.Clock()
    store = RecordingStore()
    bus = PostgresChangeBus(store, InlinePool(), clock)
    local: list[str] = []
    bus.subscribe(MAILBOX, local.append)
    bus.publish(MAILBOX, "x" * 8000)
    clock.advance(0)
    assert len(local) == 1 and store.batches == []


def test_a_failing_subscriber_does_not_stop_the_others():
    bus = LocalChangeBus()
    seen: list[str] = []

    def broken(payload: str) -> None:
        raise RuntimeError("bug")
    bus.subscribe(MAILBOX, broken)
    cancel = bus.subscribe(MAILBOX, seen.append)
    bus.publish(MAILBOX, "a")
    cancel()
    bus.publish(MAILBOX, "b")
    assert seen == ["a"]

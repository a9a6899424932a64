"""Change notifications: what one part of the server, or another instance, tells the others
(docs/design/imap.md "IDLE", docs/design/directory.md "Changes between instances").

    bus.publish(channel, payload)              on the reactor thread: every subscriber of this
                                               process at once, and with PostgreSQL every other
                                               instance on the database (NOTIFY)
    bus.subscribe(channel, callback) -> cancel callback(payload) on the reactor thread

Two channels. `mailbox` (payload: mailbox_payload(user, folder)): a message was delivered,
appended, copied or moved into a folder, or its flags or messages changed; IDLE sessions on that
folder refresh at once. `directory` (payload: "<action> <address>", action passwd, disable or
remove): `mailsuite user ...` changed an account; every instance forgets its cached logins and,
for disable and remove, ends its open sessions.

`LocalChangeBus` serves one process (SQLite: other processes are not told, and IDLE's poll
finds their changes). `PostgresChangeBus` adds LISTEN/NOTIFY: one dedicated connection per
process in a thread of its own, reconnected with backoff when it drops; while it is down,
IDLE's poll is the fallback. NOTIFYs go out through the db pool, one transaction per reactor
turn for whatever was published meanwhile.

`ChangeHub` is what the protocols of one process get (service.py makes it): the bus, the
logged-in sessions by user (`SessionRegistry`) and the folders IDLE sessions wait on.
"""
from __future__ import annotations

import functools
import json
import secrets
import threading
from typing import Any, Callable, Optional, Protocol

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsuite.mailbox.names import canonical_name

log = Logger()

MAILBOX, DIRECTORY = "mailbox", "directory"
CHANNELS = (MAILBOX, DIRECTORY)
PG_PREFIX = "mailsuite_"  # PostgreSQL channel = prefix + channel
MAX_PAYLOAD = 7999  # octets: PostgreSQL refuses a NOTIFY payload of 8000 or more
CLI_ORIGIN = "cli"  # the origin of a change made by `mailsuite user ...`
RECONNECT_FIRST, RECONNECT_MAX = 0.5, 30.0  # seconds between LISTEN reconnection attempts
LISTEN_WAKE = 1.0  # seconds the listening thread waits for a notification before looking up

Callback = Callable[[str], None]


class ChangeBus(Protocol):
    def publish(self, channel: str, payload: str) -> None:
        ...

    def subscribe(self, channel: str, callback: Callback) -> Callable[[], None]:
        ...


class SessionLike(Protocol):
    def end_session(self, reason: str) -> None:
        """Say goodbye in the protocol's framing and close (IMAP: `* BYE`)."""


# -- payloads ---------------------------------------------------------------------------------
def folder_key(user: str, folder: str) -> tuple[str, str]:
    try:
        folder = canonical_name(folder)
    except Exception:  # a name no folder can have: it only has to match itself
        pass
    return user.lower(), folder


# Every STORE, EXPUNGE and APPEND publishes one, and the hub parses it back at once: both are
# pure functions of a few strings that repeat (the same users and folders), kept in a bounded
# cache.
@functools.lru_cache(maxsize=256)
def mailbox_payload(user: str, folder: str) -> str:
    return json.dumps(list(folder_key(user, folder)), ensure_ascii=False)


@functools.lru_cache(maxsize=256)
def parse_mailbox_payload(payload: str) -> tuple[str, str] | None:
    try:
        user, folder = json.loads(payload)
    except (ValueError, TypeError):
        return None
    if not isinstance(user, str) or not isinstance(folder, str):
        return None
    return user, folder


def wire_payload(origin: str, payload: str) -> str:
    return f"{origin} {payload}"


def notify_directory_change(store: Any, action: str, address: str) -> None:
    """From `mailsuite user passwd|disable|remove` (another process, no reactor): tell the
    running instances through the database at once. Nothing on SQLite."""
    store.notify([(PG_PREFIX + DIRECTORY, wire_payload(CLI_ORIGIN, f"{action} {address}"))])


# -- the buses --------------------------------------------------------------------------------
class LocalChangeBus:
    """Subscribers of this process, called at once on the reactor thread."""

    def __init__(self) -> None:
        self._subscribers: dict[str, list[Callback]] = {}

    def publish(self, channel: str, payload: str) -> None:
        self.deliver(channel, payload)

    def subscribe(self, channel: str, callback: Callback) -> Callable[[], None]:
        self._subscribers.setdefault(channel, []).append(callback)

        def cancel() -> None:
            callbacks = self._subscribers.get(channel, [])
            if callback in callbacks:
                callbacks.remove(callback)
        return cancel

    def deliver(self, channel: str, payload: str) -> None:
        for callback in list(self._subscribers.get(channel, ())):
            try:
                callback(payload)
            except Exception:
                log.failure("change notification {channel} {payload!r} failed", channel=channel,
                            payload=payload[:200])


class PostgresChangeBus(service.Service):
    """`LocalChangeBus` plus PostgreSQL LISTEN/NOTIFY between instances.

    `store` is the DirectoryStore (`notify(items)`, `listen_connection()`), `db` the pool its
    NOTIFYs run in. Each process has a random origin, sent with every payload, so that its own
    notifications coming back are not delivered twice."""

    def __init__(self, store: Any, db: Any, reactor: Any):
        self.local = LocalChangeBus()
        self.store = store
        self.db = db
        self.reactor = reactor
        self.origin = secrets.token_hex(8)
        self.listening = False  # the LISTEN connection is up (for tests and the log)
        self._pending: dict[tuple[str, str], None] = {}
        self._flush_call: Any = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._notify_failures = 0

    def subscribe(self, channel: str, callback: Callback) -> Callable[[], None]:
        return self.local.subscribe(channel, callback)

    def publish(self, channel: str, payload: str) -> None:
        self.local.deliver(channel, payload)
        wire = wire_payload(self.origin, payload)
        if len(wire.encode("utf-8", "surrogateescape")) > MAX_PAYLOAD:
            log.warn("change notification {channel} too long for NOTIFY ({n} characters): "
                     "other instances will find it by polling", channel=channel, n=len(wire))
            return
        self._pending[(PG_PREFIX + channel, wire)] = None
        if self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        items, self._pending = list(self._pending), {}
        if items:
            self.db.run(self.store.notify, items).addCallbacks(self._notified,
                                                               self._notify_failed)

    def _notified(self, _: Any) -> None:
        if self._notify_failures:
            log.info("change notifications sent again ({n} batches were lost)",
                     n=self._notify_failures)
        self._notify_failures = 0

    def _notify_failed(self, failure: Failure) -> None:
        self._notify_failures += 1
        if self._notify_failures == 1:
            log.warn("change notifications not sent: {error}; other instances fall back to "
                     "polling", error=failure.getErrorMessage()[:200])

    # -- the listening thread -------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self._stop.clear()
        self._thread = threading.Thread(target=self._listen_forever, name="mailsuite-listen",
                                        daemon=True)
        self._thread.start()

    def stopService(self) -> Any:
        super().stopService()
        self._stop.set()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
            self._flush_call = None
        return defer.succeed(None)

    def _listen_forever(self) -> None:
        """The thread: LISTEN on every channel, hand each notification to the reactor, and
        reconnect (0.5 s, doubling up to 30 s) when the connection fails."""
        wait = RECONNECT_FIRST
        while not self._stop.is_set():
            conn = None
            try:
                conn = self.store.listen_connection()
                for channel in CHANNELS:
                    conn.execute(f'LISTEN "{PG_PREFIX}{channel}"')
                self.reactor.callFromThread(self._up)
                wait = RECONNECT_FIRST
                while not self._stop.is_set():
                    for note in conn.notifies(timeout=LISTEN_WAKE):
                        self._received(note.channel, note.payload)
            except Exception as e:  # the connection, whatever failed: try again later
                if not self._stop.is_set():
                    self.reactor.callFromThread(self._down, f"{type(e).__name__}: {e}", wait)
            finally:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass
            self._stop.wait(wait)
            wait = min(wait * 2, RECONNECT_MAX)

    def _received(self, channel: str, payload: str) -> None:
        """In the thread: skip our own notifications, hand the others to the reactor."""
        origin, _, body = payload.partition(" ")
        if origin == self.origin or not channel.startswith(PG_PREFIX):
            return
        self.reactor.callFromThread(self.local.deliver, channel[len(PG_PREFIX):], body)

    def _up(self) -> None:
        log.info("listening for changes from other instances (PostgreSQL LISTEN)")
        self.listening = True

    def _down(self, error: str, wait: float) -> None:
        if self.listening or wait == RECONNECT_FIRST:
            log.warn("change notifications from other instances interrupted: {error}; "
                     "reconnecting, IDLE polls meanwhile", error=error.splitlines()[0][:200])
        self.listening = False


def make_change_bus(store: Any, db: Any, reactor: Any) -> LocalChangeBus | PostgresChangeBus:
    """The bus of one process: with NOTIFY if its database has it (PostgreSQL)."""
    if store.notifies:
        return PostgresChangeBus(store, db, reactor)
    return LocalChangeBus()


# -- what the protocols use -------------------------------------------------------------------
class SessionRegistry:
    """The logged-in IMAP and POP3 sessions of this process by user, so that a disabled or
    removed account's sessions can be ended everywhere at once."""

    def __init__(self) -> None:
        self._by_user: dict[str, set[SessionLike]] = {}

    def add(self, user: str, session: SessionLike) -> None:
        self._by_user.setdefault(user.lower(), set()).add(session)

    def remove(self, user: str, session: SessionLike) -> None:
        sessions = self._by_user.get(user.lower())
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._by_user[user.lower()]

    def of(self, user: str) -> list[SessionLike]:
        return list(self._by_user.get(user.lower(), ()))

    def end_sessions(self, user: str, reason: str) -> int:
        sessions = self.of(user)
        for session in sessions:
            try:
                session.end_session(reason)
            except Exception:
                log.failure("ending a session of {user} failed", user=user)
        return len(sessions)


class ChangeHub:
    """The change notifications of one process, as the protocols use them."""

    def __init__(self, bus: ChangeBus, reactor: Any):
        self.bus = bus
        self.reactor = reactor
        self.sessions = SessionRegistry()
        self._watchers: dict[tuple[str, str], list[Callable[[], None]]] = {}
        bus.subscribe(MAILBOX, self._mailbox_changed)

    # -- mailbox --------------------------------------------------------------------------------
    def mailbox_changed(self, user: str, folder: str) -> None:
        """On the reactor thread: `folder` of `user` has changed."""
        self.bus.publish(MAILBOX, mailbox_payload(user, folder))

    def mailbox_changed_in_thread(self, user: str, folder: str) -> None:
        """The same from any thread (the mailbox store's delivery, in the io pool)."""
        self.reactor.callFromThread(self.mailbox_changed, user, folder)

    def watch_folder(self, user: str, folder: str,
                     callback: Callable[[], None]) -> Callable[[], None]:
        """callback() at each change of the folder, until the returned cancel is called."""
        key = folder_key(user, folder)
        self._watchers.setdefault(key, []).append(callback)

        def cancel() -> None:
            callbacks = self._watchers.get(key)
            if callbacks and callback in callbacks:
                callbacks.remove(callback)
                if not callbacks:
                    del self._watchers[key]
        return cancel

    def _mailbox_changed(self, payload: str) -> None:
        key = parse_mailbox_payload(payload)
        for callback in list(self._watchers.get(key, ())) if key else ():
            callback()

    # -- directory ------------------------------------------------------------------------------
    def follow_directory(self, login_cache: Any, lookup_caches: tuple = ()) -> None:
        """Act on `mailsuite user passwd|disable|remove` made anywhere: forget the account's
        cached logins and everything `lookup_caches` hold, and end its sessions unless only its
        password changed."""
        def changed(payload: str) -> None:
            action, _, address = payload.partition(" ")
            if not address:
                return
            login_cache.forget(address.lower())
            for cache in lookup_caches:
                cache.clear()
            if action in ("disable", "remove"):
                reason = "account disabled" if action == "disable" else "account removed"
                n = self.sessions.end_sessions(address, reason)
                log.info("{address}: {reason} by the administrator; {n} open sessions ended",
                         address=address, reason=reason, n=n)
        self.bus.subscribe(DIRECTORY, changed)

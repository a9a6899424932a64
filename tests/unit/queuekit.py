"""Test helpers for the delivery path: a queue runner built from fakes, a fake clock and an inline
pool, plus the fake agents and notifier (they never fail and remember everything).

A plain module, not a conftest: the unit tests and the multi-process scenario import it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from mailsuite import maillog
from mailsuite.config import Config
from mailsuite.delivery.local import LocalAgent
from mailsuite.directory.api import Route
from mailsuite.mailbox.store import MailStore
from mailsuite.pools import InlinePool, WorkPool
from mailsuite.queue.runner import QueueRunner
from mailsuite.queue.spool import DeliveryResult, QueueEntry, Recipient, Spool

ALICE = "alice@example.org"
BOB = "bob@example.org"
HOSTNAME = "mx.test.example"


def make_config(data_dir: str, **queue: Any) -> Config:
    config = Config()
    config.server.data_dir = data_dir
    config.server.hostname = HOSTNAME
    for key, value in queue.items():
        setattr(config.queue, key, value)
    return config


# -- fakes -----------------------------------------------------------------------------------------
@dataclass
class FakeAgent:
    """A DeliveryAgent that answers from `outcome` (default: sent) and remembers every call."""

    outcome: Callable[[QueueEntry, Recipient, int], DeliveryResult] | None = None
    calls: list[list[str]] = field(default_factory=list)
    message_present: list[bool] = field(default_factory=list)

    def deliver(self, entry: QueueEntry, recipients: Sequence[Recipient],
                message_path: str) -> defer.Deferred:
        self.calls.append([r.address for r in recipients])
        self.message_present.append(os.path.exists(message_path))
        n = len(self.calls)
        return defer.succeed([self.outcome(entry, r, n) if self.outcome
                              else DeliveryResult(r.address, "sent", "250 2.0.0 ok",
                                                  remote_mta="mx.far.example")
                              for r in recipients])


def always(status: str, detail: str, enhanced: str = "") -> Callable[..., DeliveryResult]:
    def outcome(entry: QueueEntry, rcpt: Recipient, n: int) -> DeliveryResult:
        return DeliveryResult(rcpt.address, status, detail, remote_mta="mx.far.example",
                              enhanced=enhanced)
    return outcome


@dataclass
class Told:
    """One call of the fake notifier."""

    kind: str  # "bounce" | "delay"
    entry: QueueEntry
    recipients: list[Recipient]
    message_present: bool


@dataclass
class FakeNotifier:
    """A BounceNotifier that remembers what it was asked and returns `reply` (a Notification,
    None, or a Deferred firing with one)."""

    reply: Any = None
    told: list[Told] = field(default_factory=list)

    def bounce(self, entry: QueueEntry, recipients: Sequence[Recipient],
               message_path: str) -> defer.Deferred:
        return self._tell("bounce", entry, recipients, message_path)

    def delay(self, entry: QueueEntry, recipients: Sequence[Recipient],
              message_path: str) -> defer.Deferred:
        return self._tell("delay", entry, recipients, message_path)

    def _tell(self, kind: str, entry: QueueEntry, recipients: Sequence[Recipient],
              message_path: str) -> defer.Deferred:
        self.told.append(Told(kind, entry, list(recipients), os.path.exists(message_path)))
        return defer.maybeDeferred(lambda: self.reply)

    def of(self, kind: str) -> list[Told]:
        return [t for t in self.told if t.kind == kind]


# -- the runner ----------------------------------------------------------------------------------
@dataclass
class Kit:
    """A runner on a fake clock with an inline pool, a real spool and real Maildirs."""

    config: Config
    clock: task.Clock
    runner: QueueRunner
    spool: Spool
    store: MailStore
    remote: FakeAgent | None
    notifier: FakeNotifier

    def advance(self, seconds: float, step: float = 0.1) -> None:
        """Move the fake clock forward in steps, so every timer on the way fires in order."""
        self.clock.advance(0)  # what is due now, first
        remaining = seconds
        while remaining > 1e-9:
            self.clock.advance(min(step, remaining))
            remaining -= step

    def messages(self, address: str) -> list[str]:
        return maildir_messages(self.store, address)

    def exists(self, queue_id: str) -> bool:
        return os.path.exists(self.spool.envelope_path(queue_id))

    def stop(self) -> None:
        if self.runner.running:
            self.runner.stopService()


def build_runner(config: Config, io: WorkPool, clock: IReactorTime, remote: Any = None,
                 notifier: Any = None) -> QueueRunner:
    """What service.py builds, with the given pool, clock, remote agent and notifier."""
    store = MailStore(config.mail_dir)
    return QueueRunner(Spool(config.queue_dir), config.queue, io=io, clock=clock,
                       local=LocalAgent(store, io, config.hostname), remote=remote,
                       notifier=notifier or FakeNotifier())


def make_kit(data_dir: str, remote: FakeAgent | None = None, notifier: FakeNotifier | None = None,
             start_at: float = 1_800_000_000.0, **queue: Any) -> Kit:
    config = make_config(data_dir, **queue)
    os.makedirs(config.queue_dir, exist_ok=True)
    clock = task.Clock()
    clock.advance(start_at)  # envelopes hold epoch seconds: start at a realistic time
    notifier = notifier or FakeNotifier()
    runner = build_runner(config, InlinePool(), clock, remote=remote, notifier=notifier)
    return Kit(config=config, clock=clock, runner=runner, spool=runner.spool,
               store=MailStore(config.mail_dir), remote=remote, notifier=notifier)


def started(data_dir: str, request: Any, **kw: Any) -> Kit:
    """make_kit, started (its first scan done), stopped at the end of the test."""
    kit = make_kit(data_dir, **kw)
    request.addfinalizer(kit.stop)
    kit.runner.startService()
    kit.advance(0)
    return kit


def submit(kit: Kit, sender: str, recipients: list[tuple[str, Route]], data: bytes,
           meta: dict | None = None) -> str:
    """Submit and return the queue id (the inline pool fires at once)."""
    result: list[Any] = []
    kit.runner.submit(sender, recipients, data, meta or {}).addBoth(result.append)
    [value] = result
    if isinstance(value, Failure):
        value.raiseException()
    return value


# -- routes, messages, Maildirs, the mail log --------------------------------------------------
def local_route(*mailboxes: str, address: str | None = None) -> Route:
    return Route(address=address or mailboxes[0], hosted=True, mailboxes=tuple(mailboxes))


def remote_route(address: str) -> Route:
    return Route(address=address, hosted=False)


def message(subject: str = "hello", received: int = 1, body: bytes = b"Hi there.\r\n") -> bytes:
    trace = b"".join(b"Received: from relay%d.example by mx.test.example; "
                     b"Sat, 28 Nov 2026 01:00:00 +0000\r\n" % i for i in range(received))
    return (trace + b"From: Carol <carol@remote.example>\r\nTo: alice@example.org\r\n"
            b"Subject: " + subject.encode() + b"\r\nMessage-ID: <" + subject.encode()
            + b"@remote.example>\r\n\r\n" + body)


def maildir_messages(store: MailStore, address: str) -> list[str]:
    root = store.account(address).path
    found = []
    for sub in ("new", "cur"):
        d = os.path.join(root, sub)
        if os.path.isdir(d):
            found += [os.path.join(d, n) for n in sorted(os.listdir(d))]
    return found


def break_maildir(store: MailStore, address: str) -> str:
    """A regular FILE where new/ should be: even root cannot deliver into that."""
    maildir = store.account(address).path
    for sub in ("cur", "tmp"):
        os.makedirs(os.path.join(maildir, sub), exist_ok=True)
    with open(os.path.join(maildir, "new"), "w"):
        pass
    return maildir


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class MailLog:
    """Captures the mail log lines (and their levels) while installed."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.errors: list[str] = []

    def __call__(self, event: dict) -> None:
        if event.get("log_namespace") != maillog.NAMESPACE:
            return
        text = formatEvent(event)
        self.lines.append(text)
        if event.get("log_level") in (LogLevel.error, LogLevel.critical):
            self.errors.append(text)

    def install(self) -> "MailLog":
        globalLogPublisher.addObserver(self)
        return self

    def remove(self) -> None:
        globalLogPublisher.removeObserver(self)

    def of(self, queue_id: str) -> list[str]:
        return [line for line in self.lines if line.startswith(f"queue_id={queue_id} ")]


def spool_files(directory: str) -> list[str]:
    """The files of a spool directory, sorted (incoming/ and instances/ are directories)."""
    return sorted(n for n in os.listdir(directory)
                  if not os.path.isdir(os.path.join(directory, n)))

"""Environment faults on the delivery path (full disk, I/O errors, no file descriptors left, a
Maildir that resolves outside mail_dir): a deferral or a later retry, ONE log line each, never a
traceback, and the message stays in the spool."""
from __future__ import annotations

import errno
import os

import pytest
from twisted.internet import defer
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from mailsuite.directory.records import DirectoryUnavailable
from mailsuite.mailbox import maildir as maildir_module
from mailsuite.queue.agents import Notification
from mailsuite.queue.spool import QueueEntry, Recipient, Spool, new_queue_id
from tests.unit.queuekit import (ALICE, FakeAgent, FakeNotifier, Kit, Told, always, local_route,
                                 make_kit, message, remote_route, submit)

CAROL = "carol@remote.example"


class AllLogs:
    """Every log event while installed: (level, text, has a traceback)."""

    def __init__(self) -> None:
        self.events: list[tuple[LogLevel, str, bool]] = []

    def __call__(self, event: dict) -> None:
        self.events.append((event.get("log_level"), formatEvent(event),
                            "log_failure" in event))

    def errors(self) -> list[str]:
        return [t for level, t, _ in self.events if level in (LogLevel.error, LogLevel.critical)]

    def tracebacks(self) -> list[str]:
        return [t for _, t, failure in self.events if failure]

    def matching(self, text: str) -> list[str]:
        return [t for _, t, _ in self.events if text in t]


@pytest.fixture
def logs():
    observer = AllLogs()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


@pytest.fixture
def make(tmp_path, request):
    def factory(**kw) -> Kit:
        kit = make_kit(str(tmp_path / "data"), **kw)
        request.addfinalizer(kit.stop)
        kit.runner.startService()
        kit.advance(0)
        return kit
    return factory


@pytest.mark.parametrize("code,reply", [(errno.ENOSPC, "452 4.3.1"), (errno.EDQUOT, "452 4.3.1"),
                                        (errno.EIO, "451 4.3.0"), (errno.EROFS, "451 4.3.0")])
def test_write_faults_defer_with_one_line(make, logs, monkeypatch, code, reply):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(maildir_module, "write_all", fail)  # the write into tmp/ fails
    kit = make(retry_schedule=[1])
    qid = submit(kit, CAROL, [(ALICE, local_route(ALICE))], message("fault"))
    kit.advance(0)
    [r] = kit.spool.load(qid).recipients
    assert (r.state, r.attempts) == ("pending", 1)
    assert r.last_error.startswith(reply) and r.last_error.endswith(os.strerror(code))
    [line] = [t for t in logs.matching(f"queue_id={qid} ") if "status=deferred" in t]
    assert reply in line
    assert logs.errors() == [] and logs.tracebacks() == []
    maildir = kit.store.account(ALICE).path
    assert os.listdir(os.path.join(maildir, "tmp")) == []
    monkeypatch.undo()
    kit.advance(1.1)  # the disk has room again
    assert len(kit.messages(ALICE)) == 1
    assert not kit.exists(qid)


def test_symlinked_domain_dir_defers_and_writes_nothing(make, logs, tmp_path):
    kit = make(retry_schedule=[1])
    elsewhere = tmp_path / "elsewhere"
    os.makedirs(elsewhere)
    os.makedirs(kit.config.mail_dir, exist_ok=True)
    os.symlink(elsewhere, os.path.join(kit.config.mail_dir, "example.org"))
    qid = submit(kit, CAROL, [(ALICE, local_route(ALICE))], message("escape"))
    kit.advance(0)
    [r] = kit.spool.load(qid).recipients
    assert r.state == "pending" and r.last_error.startswith("451 4.3.0 mailbox path leaves")
    assert len([t for t in logs.matching(f"queue_id={qid} ") if "status=deferred" in t]) == 1
    assert logs.errors() == [] and logs.tracebacks() == []
    assert os.listdir(elsewhere) == []


def test_scan_out_of_file_descriptors_logs_one_line_and_retries(make, logs, monkeypatch):
    kit = make(scan_interval=1)
    real_ids = Spool.ids
    calls = []

    def ids(self):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_ids(self)
    monkeypatch.setattr(Spool, "ids", ids)
    # An entry another process left: only a scan can find it.
    kit.spool.ensure()
    entry = QueueEntry(new_queue_id(kit.clock.seconds()), CAROL,
                       [Recipient(ALICE, ALICE, True)], kit.clock.seconds())
    kit.spool.store(entry, message("left"))
    kit.advance(1.05)
    [line] = logs.matching("queue scan failed")
    assert "Too many open files (EMFILE)" in line
    assert logs.tracebacks() == [] and logs.errors() == []
    kit.advance(1.0)
    assert len(kit.messages(ALICE)) == 1
    assert not kit.exists(entry.id)


def test_attempt_out_of_file_descriptors_is_one_line(make, logs, monkeypatch):
    kit = make(scan_interval=1)
    real_claim = Spool.claim
    calls = []

    def claim(self, queue_id):
        calls.append(queue_id)
        if len(calls) == 1:
            raise OSError(errno.ENFILE, "Too many open files in system")
        return real_claim(self, queue_id)
    monkeypatch.setattr(Spool, "claim", claim)
    qid = submit(kit, CAROL, [(ALICE, local_route(ALICE))], message("enfile"))
    kit.advance(0)
    [line] = logs.matching(f"queue_id={qid} status=retry-later")
    assert "Too many open files in system (ENFILE)" in line
    assert logs.tracebacks() == [] and logs.errors() == []
    kit.advance(1.1)
    assert len(kit.messages(ALICE)) == 1


def test_start_up_fault_is_retried(tmp_path, logs, monkeypatch, request):
    kit = make_kit(str(tmp_path / "data"), scan_interval=1)
    request.addfinalizer(kit.stop)
    real = Spool.ensure
    calls = []

    def ensure(self):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        real(self)
    monkeypatch.setattr(Spool, "ensure", ensure)
    kit.runner.startService()
    kit.advance(0)
    [line] = logs.matching("queue start-up failed")
    assert "EMFILE" in line and logs.tracebacks() == []
    kit.advance(1.1)
    qid = submit(kit, CAROL, [(ALICE, local_route(ALICE))], message("after"))
    kit.advance(0)
    assert len(kit.messages(ALICE)) == 1 and not kit.exists(qid)


class FlakyNotifier(FakeNotifier):
    """Raises `fault` for the first `failures` bounces, then answers like FakeNotifier."""

    def __init__(self, fault: Exception, failures: int = 1):
        super().__init__(reply=Notification(recipients=[(CAROL, None)], data=b"DSN\r\n"))
        self.fault = fault
        self.failures = failures

    def bounce(self, entry, recipients, message_path):
        if self.failures:
            self.failures -= 1
            self.told.append(Told("bounce-failed", entry, list(recipients), True))
            return defer.fail(self.fault)
        return super().bounce(entry, recipients, message_path)


@pytest.mark.parametrize("fault", [DirectoryUnavailable("database is down"),
                                   OSError(errno.ENOSPC, "No space left on device")])
def test_a_bounce_held_back_by_the_environment_is_sent_later(make, logs, fault):
    """The recipient bounced, but the DSN could not be built or queued (database down, disk
    full): one line, the entry stays, and the bounce is queued at the next retry."""
    remote = FakeAgent(outcome=always("bounced", "550 5.1.1 no such user", "5.1.1"))
    notifier = FlakyNotifier(fault)
    kit = make(remote=remote, notifier=notifier, retry_schedule=[2])
    qid = submit(kit, CAROL, [("nobody@far.example", remote_route("nobody@far.example"))],
                 message("bounce"))
    kit.advance(0)
    assert kit.exists(qid)
    entry = kit.spool.load(qid)
    assert entry.bounce_pending == [0] and entry.recipients[0].state == "bounced"
    [line] = logs.matching(f"queue_id={qid} status=dsn-failed")
    assert str(fault.args[-1]) in line
    assert logs.tracebacks() == [] and logs.errors() == []
    kit.advance(2.1)
    assert [t.kind for t in notifier.told] == ["bounce-failed", "bounce"]
    assert notifier.told[1].recipients[0].address == "nobody@far.example"
    assert len(logs.matching(f"queue_id={qid} status=dsn-queued")) == 1
    assert not kit.exists(qid)
    # The recipient itself is not attempted again (the other call carries the DSN to carol).
    assert remote.calls == [["nobody@far.example"], [CAROL]]

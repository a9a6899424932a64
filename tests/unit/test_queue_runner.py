"""The queue runner in memory: a fake clock, an inline pool, fake remote agent and notifier, a
real spool and real Maildirs on tmp_path. Time only moves when a test advances the clock, so
"nothing happened before the retry time" is checked, not slept for."""
from __future__ import annotations

import os

import pytest
from twisted.internet import defer

from mailsuite.directory.api import Route
from mailsuite.queue.agents import Notification
from mailsuite.queue.runner import KICK_POLL, NO_REMOTE, QueueRunner
from mailsuite.queue.spool import DeliveryResult, QueueEntry, Recipient, new_queue_id
from tests.unit.queuekit import (ALICE, BOB, FakeAgent, FakeNotifier, Kit, MailLog, always,
                                 break_maildir, local_route, make_kit, message, read,
                                 remote_route, spool_files, submit)

CAROL = "carol@remote.example"


@pytest.fixture
def mail_log():
    log = MailLog().install()
    yield log
    log.remove()


@pytest.fixture
def make(tmp_path, request):
    """make(**queue settings, remote=..., notifier=...) -> a started Kit."""
    def factory(start: bool = True, **kw) -> Kit:
        kit = make_kit(str(tmp_path / "data"), **kw)
        request.addfinalizer(kit.stop)
        if start:
            kit.runner.startService()
            kit.advance(0)
        return kit
    return factory


def left(kit: Kit, *held: bool, subject: str = "left") -> list[QueueEntry]:
    """Entries in the spool before the runner starts (a previous run, another process)."""
    kit.spool.ensure()
    entries = []
    for i, is_held in enumerate(held):
        e = QueueEntry(new_queue_id(kit.clock.seconds()), CAROL, [Recipient(ALICE, ALICE, True)],
                       kit.clock.seconds(), held=is_held)
        kit.spool.store(e, message(f"{subject}{i}"))
        entries.append(e)
    return entries


def test_the_runner_takes_its_parts_typed_and_imports_no_agent():
    import inspect

    import mailsuite.queue.runner as runner

    params = inspect.signature(QueueRunner.__init__).parameters
    assert list(params) == ["self", "spool", "settings", "io", "clock", "local", "remote",
                            "notifier", "group"]
    source = inspect.getsource(runner)
    assert "mailsuite.delivery" not in source and "mailsuite.courier" not in source


# -- local delivery ----------------------------------------------------------------------------
def test_submit_delivers_locally_and_removes_entry(make, mail_log):
    kit = make()
    qid = submit(kit, CAROL, [("Alice+news@Example.org", local_route(ALICE)),
                              (BOB, local_route(BOB))], message("s1"),
                 {"client_ip": "192.0.2.7", "protocol": "ESMTP"})
    kit.advance(0)
    [a] = kit.messages(ALICE)
    [b] = kit.messages(BOB)
    assert read(a).startswith(b"Return-Path: <carol@remote.example>\r\n"
                              b"Delivered-To: alice@example.org\r\nReceived: ")
    assert read(a).endswith(message("s1"))
    assert b"Delivered-To: bob@example.org\r\n" in read(b)
    assert spool_files(kit.config.queue_dir) == []
    lines = mail_log.of(qid)
    assert lines[0].startswith(f"queue_id={qid} from=<carol@remote.example> size="), lines
    assert "nrcpt=2 client=192.0.2.7 protocol=ESMTP status=queued" in lines[0]
    sent = [line for line in lines if "status=sent" in line]
    assert len(sent) == 2, lines
    assert sent[0].startswith(f"queue_id={qid} from=<carol@remote.example> to=<alice@example.org> "
                              "status=sent delay=0.0s relay=local attempts=1 "
                              'detail="250 2.0.0 delivered to maildir as ')
    assert sent[0].endswith('" orig_to=<Alice+news@Example.org>')
    assert lines[-1] == f"queue_id={qid} status=removed"


def test_duplicates_collapsed_and_aliases_expanded(make):
    kit = make()
    team = local_route(ALICE, BOB, address="team@example.org")
    submit(kit, CAROL, [("team@example.org", team), (ALICE, local_route(ALICE))],
           message("dup"))
    kit.advance(0)
    assert len(kit.messages(BOB)) == 1
    assert len(kit.messages(ALICE)) == 1


def test_failed_local_delivery_is_retried_not_dropped(make, mail_log):
    kit = make(retry_schedule=[1])
    maildir = break_maildir(kit.store, ALICE)
    qid = submit(kit, CAROL, [(ALICE, local_route(ALICE))], message("retry"))
    kit.advance(0)
    [r] = kit.spool.load(qid).recipients
    assert (r.state, r.attempts) == ("pending", 1)
    assert "451 4.3.0 cannot write Maildir" in r.last_error
    assert r.next_attempt == kit.clock.seconds() + 1
    assert os.listdir(os.path.join(maildir, "tmp")) == []
    [deferred] = [line for line in mail_log.of(qid) if "status=deferred" in line]
    assert "relay=local attempts=1" in deferred
    # Repair the Maildir: nothing is attempted before the retry time, then it is delivered.
    os.unlink(os.path.join(maildir, "new"))
    kit.advance(0.9)
    assert kit.messages(ALICE) == []
    assert kit.spool.load(qid).recipients[0].attempts == 1
    kit.advance(0.2)
    [path] = kit.messages(ALICE)
    assert read(path).endswith(message("retry"))
    assert not kit.exists(qid)


def test_retry_schedule_steps_then_repeats_its_last_value(make):
    kit = make(retry_schedule=[1, 3])
    break_maildir(kit.store, ALICE)
    qid = submit(kit, CAROL, [(ALICE, local_route(ALICE))], message("steps"))
    kit.advance(0)
    t0 = kit.clock.seconds()
    times = []
    for _ in range(4):
        r = kit.spool.load(qid).recipients[0]
        times.append(r.next_attempt - t0)
        kit.clock.advance(r.next_attempt - kit.clock.seconds())  # exactly the retry time
    assert [round(t, 6) for t in times] == [1.0, 4.0, 7.0, 10.0]
    assert kit.spool.load(qid).recipients[0].attempts == 5


def test_disk_full_is_452_4_3_1(make, monkeypatch):
    import errno

    from mailsuite.mailbox import maildir as maildir_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(maildir_module, "write_all", full)  # the write into tmp/ fails
    kit = make()
    qid = submit(kit, CAROL, [(ALICE, local_route(ALICE))], message("full"))
    kit.advance(0)
    r = kit.spool.load(qid).recipients[0]
    assert r.state == "pending"
    assert r.last_error.startswith("452 4.3.1 cannot write Maildir ")
    assert r.last_error.endswith(": No space left on device")


# -- bounces and warnings ------------------------------------------------------------------------
def test_max_age_bounces_and_tells_the_notifier(make, mail_log):
    kit = make(retry_schedule=[0.2], max_age=1)
    break_maildir(kit.store, ALICE)
    qid = submit(kit, CAROL, [(ALICE, local_route(ALICE))], message("old"))
    kit.advance(0.9)
    assert kit.notifier.told == []  # not before max_age
    kit.advance(0.4)
    [told] = kit.notifier.told
    assert (told.kind, told.entry.id) == ("bounce", qid)
    assert [r.address for r in told.recipients] == [ALICE]
    assert told.recipients[0].state == "bounced"
    assert "gave up" in told.recipients[0].last_error
    assert told.recipients[0].attempts > 1
    # The message file is still there while the notifier runs (the DSN quotes its headers)...
    assert told.message_present
    # ...and gone afterwards, with the entry.
    assert not os.path.exists(kit.spool.message_path(qid))
    kit.advance(2)
    assert len(kit.notifier.told) == 1
    [bounced] = [line for line in mail_log.of(qid) if "status=bounced" in line]
    assert "gave up: in the queue longer than 1s" in bounced


def test_permanent_failure_bounces_at_once_with_message_present(make):
    hook = defer.Deferred()
    remote = FakeAgent(always("bounced", "550 5.1.1 no such user", "5.1.1"))
    kit = make(remote=remote, notifier=FakeNotifier(reply=hook))
    qid = submit(kit, ALICE, [("x@far.example", remote_route("x@far.example"))],
                 message("5xx"))
    kit.advance(0)
    [told] = kit.notifier.told
    assert (told.recipients[0].last_error, told.message_present) == (
        "550 5.1.1 no such user", True)
    assert kit.exists(qid)  # a Deferred from the notifier is waited for
    hook.callback(None)
    assert not kit.exists(qid)


def test_the_notification_is_queued_from_the_null_sender(make, mail_log):
    dsn = Notification(recipients=[(ALICE, local_route(ALICE))],
                       data=b"Subject: Undelivered Mail\r\n\r\nsorry\r\n",
                       meta={"protocol": "DSN"})
    remote = FakeAgent(always("bounced", "550 5.1.1 no such user", "5.1.1"))
    kit = make(remote=remote, notifier=FakeNotifier(reply=dsn))
    qid = submit(kit, ALICE, [("x@far.example", remote_route("x@far.example"))], message("b"))
    kit.advance(0)
    [queued] = [line for line in mail_log.of(qid) if "status=dsn-queued" in line]
    assert "action=failed to=<alice@example.org>" in queued
    dsn_id = queued.split(" dsn=")[1].split()[0]
    [line] = [line for line in mail_log.of(dsn_id) if "status=queued" in line]
    assert "from=<>" in line and "protocol=DSN" in line
    kit.advance(0)
    [path] = kit.messages(ALICE)
    assert read(path).startswith(b"Return-Path: <>\r\nDelivered-To: alice@example.org\r\n")
    assert not kit.exists(qid) and not kit.exists(dsn_id)


def test_a_failing_notifier_is_logged_and_the_entry_still_finishes(make, mail_log):
    remote = FakeAgent(always("bounced", "550 5.1.1 no such user", "5.1.1"))
    kit = make(remote=remote, notifier=FakeNotifier(reply=defer.fail(RuntimeError("no"))))
    qid = submit(kit, ALICE, [("x@far.example", remote_route("x@far.example"))], message("f"))
    kit.advance(0)
    assert any("status=dsn-failed action=failed" in line for line in mail_log.of(qid))
    assert not kit.exists(qid)


def test_no_bounce_for_null_sender(make, mail_log):
    kit = make(retry_schedule=[0.2], max_age=0.5)
    break_maildir(kit.store, ALICE)
    qid = submit(kit, "", [(ALICE, local_route(ALICE))], message("dsn"))
    kit.advance(1)
    assert not kit.exists(qid)
    assert kit.notifier.told == []
    [skipped] = [line for line in mail_log.of(qid) if "status=dsn-skipped" in line]
    assert 'detail="no bounce for the null sender <>"' in skipped


def test_delay_warning_once(make):
    kit = make(retry_schedule=[0.2], delay_warning=0.3)
    break_maildir(kit.store, ALICE)
    qid = submit(kit, CAROL, [(ALICE, local_route(ALICE))], message("slow"))
    kit.advance(0.2)
    assert kit.notifier.told == []  # not before delay_warning
    kit.advance(1.0)
    assert kit.spool.load(qid).recipients[0].attempts >= 5
    assert [[r.address for r in t.recipients] for t in kit.notifier.of("delay")] == [[ALICE]]
    assert kit.spool.load(qid).warned


def test_no_delay_warning_for_null_sender(make):
    kit = make(retry_schedule=[0.2], delay_warning=0.3)
    break_maildir(kit.store, ALICE)
    submit(kit, "", [(ALICE, local_route(ALICE))], message("slow"))
    kit.advance(1.0)
    assert kit.notifier.told == []


def test_mail_loop_bounces_with_5_4_6(make):
    kit = make(max_received_headers=5)
    qid = submit(kit, CAROL, [(ALICE, local_route(ALICE))], message("loop", received=6))
    kit.advance(0)
    assert not kit.exists(qid)
    assert kit.messages(ALICE) == []
    [told] = kit.notifier.told
    [r] = told.recipients
    assert "5.4.6" in r.last_error
    # At the limit it is still delivered.
    submit(kit, CAROL, [(ALICE, local_route(ALICE))], message("ok", received=5))
    kit.advance(0)
    assert len(kit.messages(ALICE)) == 1


# -- remote recipients ---------------------------------------------------------------------------
def test_remote_without_agent_waits_in_queue(make):
    kit = make()
    qid = submit(kit, ALICE, [("x@far.example", remote_route("x@far.example")),
                              (BOB, local_route(BOB))], message("r"))
    kit.advance(0)
    entry = kit.spool.load(qid)
    [remote] = [r for r in entry.recipients if not r.local]
    [local] = [r for r in entry.recipients if r.local]
    assert (remote.state, remote.attempts, remote.last_error) == ("pending", 1, NO_REMOTE)
    assert local.state == "sent"


def test_remote_agent_gets_only_remote_recipients_and_deferrals_retry(make, mail_log):
    def outcome(entry, rcpt, n):
        if n == 1:
            return DeliveryResult(rcpt.address, "deferred", "451 4.7.1 try later",
                                  remote_mta="mx.far.example")
        return DeliveryResult(rcpt.address, "sent", "250 ok", remote_mta="mx.far.example")
    remote = FakeAgent(outcome)
    kit = make(retry_schedule=[0.3], remote=remote)
    qid = submit(kit, ALICE, [("x@far.example", remote_route("x@far.example")),
                              (BOB, local_route(BOB))], message("r2"))
    kit.advance(0)
    assert remote.calls == [["x@far.example"]]
    kit.advance(0.25)
    assert remote.calls == [["x@far.example"]]  # nothing before the retry time
    kit.advance(0.1)
    assert remote.calls == [["x@far.example"], ["x@far.example"]]
    assert not kit.exists(qid)
    assert len(kit.messages(BOB)) == 1  # once, not per attempt
    [deferred] = [line for line in mail_log.of(qid) if "status=deferred" in line]
    assert "relay=mx.far.example" in deferred and 'detail="451 4.7.1 try later"' in deferred


def test_a_crashing_agent_defers_and_never_loses_the_entry(make):
    class Broken:
        def deliver(self, entry, recipients, message_path):
            raise RuntimeError("bug")
    kit = make(remote=Broken())
    qid = submit(kit, ALICE, [("x@far.example", remote_route("x@far.example"))], message("c"))
    kit.advance(0)
    [r] = kit.spool.load(qid).recipients
    assert (r.state, r.last_error) == ("pending", "451 4.3.0 remote delivery error: bug")


# -- hold, kick, restart, claims, damage -----------------------------------------------------------
def test_entries_left_in_spool_are_delivered_at_start_and_held_ones_skipped(make):
    kit = make(start=False)
    entries = left(kit, False, True, False)
    kit.runner.startService()
    kit.advance(0)
    assert len(kit.messages(ALICE)) == 2
    kit.advance(60)  # two more scans
    assert kit.spool.ids() == [entries[1].id]
    assert len(kit.messages(ALICE)) == 2
    # kick() does not override hold either; releasing (as the CLI does) delivers promptly.
    kit.runner.kick(entries[1].id)
    assert kit.spool.ids() == [entries[1].id]
    claim = kit.spool.claim_wait(entries[1].id)
    e = kit.spool.load(entries[1].id)
    e.held = False
    kit.spool.save(e)
    claim.release()
    kit.spool.kick()
    kit.advance(KICK_POLL + 0.1)
    assert len(kit.messages(ALICE)) == 3


def test_kick_ignores_retry_time(make):
    kit = make(retry_schedule=[3600])
    maildir = break_maildir(kit.store, ALICE)
    qid = submit(kit, CAROL, [(ALICE, local_route(ALICE))], message("k"))
    kit.advance(0)
    assert kit.spool.load(qid).recipients[0].attempts == 1
    os.unlink(os.path.join(maildir, "new"))
    done = []
    kit.runner.kick(qid).addCallback(done.append)
    assert done == [None]
    assert len(kit.messages(ALICE)) == 1
    assert not kit.exists(qid)


def test_entry_claimed_elsewhere_is_not_touched(make):
    kit = make(start=False, scan_interval=0.2)
    [e] = left(kit, False, subject="claimed")
    claim = kit.spool.claim(e.id)  # as another process working on it would
    kit.runner.startService()
    kit.advance(0.8)
    assert kit.messages(ALICE) == []
    claim.release()
    kit.advance(0.3)
    assert len(kit.messages(ALICE)) == 1


def test_damaged_entries_are_reported_and_do_not_block_others(make, mail_log):
    kit = make(start=False, scan_interval=0.2)
    ids = [e.id for e in left(kit, False, False, False, subject="d")]
    with open(kit.spool.envelope_path(ids[0]), "w") as f:
        f.write("{broken")
    os.unlink(kit.spool.message_path(ids[1]))
    kit.runner.startService()
    kit.advance(0)
    assert len(kit.messages(ALICE)) == 1
    kit.advance(1.0)  # several scans
    assert sorted(kit.spool.ids()) == sorted(ids[:2])  # left for the admin
    errors = mail_log.errors
    assert len([e for e in errors if ids[0] in e]) == 1, errors  # once, not per scan
    assert len([e for e in errors if ids[1] in e and "without message file" in e]) == 1, errors
    assert all(e.startswith("queue_id=") and "status=damaged" in e for e in errors)


def test_submit_without_recipients_fails(make):
    kit = make()
    nobody = Route(address="nobody@example.org", hosted=True)  # hosted, no such user
    with pytest.raises(ValueError):
        submit(kit, "a@b.example", [("nobody@example.org", nobody)], b"x\r\n")


def test_stop_cancels_every_timer(make):
    kit = make(retry_schedule=[10])
    break_maildir(kit.store, ALICE)
    submit(kit, CAROL, [(ALICE, local_route(ALICE))], message("stop"))
    kit.advance(0)
    assert kit.clock.getDelayedCalls()
    kit.runner.stopService()
    assert kit.clock.getDelayedCalls() == []


def test_an_entry_submitted_while_a_scan_runs_is_not_forgotten_by_its_answer(make):
    """A scan lists the spool in the io pool; an entry submitted after the listing, whose
    answer the reactor handles before it starts the entry, stays due (not until scan_interval)."""
    remote = FakeAgent()
    kit = make(remote=remote, scan_interval=300)
    held: list[tuple[defer.Deferred, object]] = []
    scan_blocking = kit.runner._scan_blocking

    def listed_now_answered_later():
        d = defer.Deferred()
        held.append((d, scan_blocking()))
        return d

    kit.runner._scan_blocking = listed_now_answered_later
    kit.runner._scan()  # what a peer's death or the admin's kick starts
    [(answer, listing)] = held
    qid = submit(kit, ALICE, [("x@far.example", remote_route("x@far.example"))], message("s"))
    answer.callback(listing)  # the reactor takes the answer before its next turn
    kit.advance(5)
    assert remote.calls == [["x@far.example"]]
    assert not kit.exists(qid)

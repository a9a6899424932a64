"""The queue runner on a real reactor, real thread pools and real files."""
from __future__ import annotations

import os
import shutil
import tempfile
import time

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from mailsuite.directory.api import Route
from mailsuite.queue.spool import DeliveryResult, QueueEntry, Recipient, new_queue_id
from tests.test_queue_support import (local_route, maildir_messages, make_suite, message, read,
                                      remote_route, start, stop, wait_for, wait_idle)

ALICE = "alice@example.org"
BOB = "bob@example.org"


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


class RunnerTestCase(unittest.TestCase):
    timeout = 30

    def make(self, **queue) -> object:
        data_dir = tempfile.mkdtemp(prefix="mailsuite-queue-")
        self.addCleanup(shutil.rmtree, data_dir, True)
        suite = make_suite(data_dir, **queue)
        self.addCleanup(stop, suite)  # cleanups run last-in first-out: stop, then remove
        return suite

    def capture_log(self) -> list[str]:
        from twisted.logger import formatEvent

        lines: list[str] = []

        def observer(event):
            if event.get("log_namespace") == "mailsuite.queue":
                lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return lines

    def break_maildir(self, suite, address: str) -> str:
        """A regular FILE where new/ should be: even root cannot deliver into that."""
        maildir = suite.config.maildir_for(address)
        for sub in ("cur", "tmp"):
            os.makedirs(os.path.join(maildir, sub), exist_ok=True)
        with open(os.path.join(maildir, "new"), "w"):
            pass
        return maildir

    # -- local delivery ------------------------------------------------------------------------
    @defer.inlineCallbacks
    def test_submit_delivers_locally_and_removes_entry(self):
        suite = self.make()
        lines = self.capture_log()
        start(suite)
        qid = yield suite.queue.submit("carol@remote.example",
                                       [("Alice+news@Example.org", local_route(ALICE)),
                                        (BOB, local_route(BOB))],
                                       message("s1"), {"client_ip": "192.0.2.7"})
        yield wait_for(lambda: not os.path.exists(suite.queue.spool.envelope_path(qid)))
        yield wait_idle(suite)  # log lines are emitted from the reactor after the io job
        [a] = maildir_messages(suite.config, ALICE)
        [b] = maildir_messages(suite.config, BOB)
        self.assertTrue(read(a).startswith(b"Return-Path: <carol@remote.example>\r\n"
                                           b"Delivered-To: alice@example.org\r\nReceived: "))
        self.assertTrue(read(a).endswith(message("s1")))
        self.assertIn(b"Delivered-To: bob@example.org\r\n", read(b))
        self.assertEqual(os.listdir(suite.config.queue_dir), [])
        sent = [line for line in lines if f"queue_id={qid}" in line and "status=sent" in line]
        self.assertEqual(len(sent), 2, lines)
        self.assertRegex(sent[0], r"from=<carol@remote\.example> to=<alice@example\.org> "
                                  r"status=sent delay=\d+\.\ds relay=local attempts=1 "
                                  r'detail="250 2\.0\.0 .*" orig_to=<Alice\+news@Example\.org>')

    @defer.inlineCallbacks
    def test_duplicates_collapsed_and_aliases_expanded(self):
        suite = self.make()
        start(suite)
        team = local_route(ALICE, BOB, address="team@example.org")
        yield suite.queue.submit("carol@remote.example",
                                 [("team@example.org", team), ("alice@example.org",
                                                               local_route(ALICE))],
                                 message("dup"), {})
        yield wait_for(lambda: len(maildir_messages(suite.config, BOB)) == 1)
        yield wait_idle(suite)
        self.assertEqual(len(maildir_messages(suite.config, ALICE)), 1)

    @defer.inlineCallbacks
    def test_failed_local_delivery_is_retried_not_dropped(self):
        suite = self.make(retry_schedule=[1])
        start(suite)
        maildir = self.break_maildir(suite, ALICE)
        qid = yield suite.queue.submit("carol@remote.example", [(ALICE, local_route(ALICE))],
                                       message("retry"), {})

        def deferred_once():
            entry = suite.queue.spool.load(qid)
            return entry.recipients[0].attempts >= 1 and entry
        entry = yield wait_for(deferred_once)
        r = entry.recipients[0]
        self.assertEqual(r.state, "pending")
        self.assertIn("4.3.0 cannot write Maildir", r.last_error)
        self.assertGreater(r.next_attempt, time.time() - 1)
        self.assertEqual(os.listdir(os.path.join(maildir, "tmp")), [])
        # Repair the Maildir: the next scheduled attempt delivers.
        os.unlink(os.path.join(maildir, "new"))
        yield wait_for(lambda: maildir_messages(suite.config, ALICE), timeout=10)
        yield wait_for(lambda: not os.path.exists(suite.queue.spool.envelope_path(qid)))
        [path] = maildir_messages(suite.config, ALICE)
        self.assertTrue(read(path).endswith(message("retry")))

    # -- bounces and warnings ------------------------------------------------------------------
    @defer.inlineCallbacks
    def test_max_age_bounces_and_calls_on_bounce(self):
        suite = self.make(retry_schedule=[0.2], max_age=1)
        bounced: list[tuple[QueueEntry, list[Recipient]]] = []
        suite.queue.on_bounce = lambda entry, rcpts: bounced.append((entry, rcpts))
        start(suite)
        self.break_maildir(suite, ALICE)
        qid = yield suite.queue.submit("carol@remote.example", [(ALICE, local_route(ALICE))],
                                       message("old"), {})
        yield wait_for(lambda: bounced, timeout=10)
        [(entry, rcpts)] = bounced
        self.assertEqual(entry.id, qid)
        self.assertEqual([r.address for r in rcpts], [ALICE])
        self.assertEqual(rcpts[0].state, "bounced")
        self.assertIn("gave up", rcpts[0].last_error)
        self.assertGreater(rcpts[0].attempts, 1)
        # The message file is still there while the hook runs (the DSN quotes its headers)...
        yield wait_for(lambda: not os.path.exists(suite.queue.spool.message_path(qid)))
        self.assertEqual(len(bounced), 1)

    @defer.inlineCallbacks
    def test_permanent_failure_bounces_at_once_with_message_present(self):
        suite = self.make()
        seen: list[tuple[str, bool]] = []

        class Agent:
            def deliver(self, entry, recipients, message_path):
                return defer.succeed([DeliveryResult(r.address, "bounced",
                                                     "550 5.1.1 no such user",
                                                     remote_mta="mx.far.example",
                                                     enhanced="5.1.1") for r in recipients])

        def on_bounce(entry, rcpts):
            seen.append((rcpts[0].last_error, os.path.exists(
                suite.queue.spool.message_path(entry.id))))
            return sleep(0.05)  # a Deferred hook is waited for
        suite.queue.remote_agent = Agent()
        suite.queue.on_bounce = on_bounce
        start(suite)
        qid = yield suite.queue.submit("alice@example.org",
                                       [("x@far.example", remote_route("x@far.example"))],
                                       message("5xx"), {})
        yield wait_for(lambda: not os.path.exists(suite.queue.spool.envelope_path(qid)))
        self.assertEqual(seen, [("550 5.1.1 no such user", True)])

    @defer.inlineCallbacks
    def test_no_bounce_for_null_sender(self):
        suite = self.make(retry_schedule=[0.2], max_age=0.5)
        bounced = []
        suite.queue.on_bounce = lambda entry, rcpts: bounced.append(entry)
        start(suite)
        self.break_maildir(suite, ALICE)
        qid = yield suite.queue.submit("", [(ALICE, local_route(ALICE))], message("dsn"), {})
        yield wait_for(lambda: not os.path.exists(suite.queue.spool.envelope_path(qid)))
        self.assertEqual(bounced, [])

    @defer.inlineCallbacks
    def test_delay_warning_once(self):
        suite = self.make(retry_schedule=[0.2], delay_warning=0.3)
        warnings = []
        suite.queue.on_delay = lambda entry, rcpts: warnings.append([r.address for r in rcpts])
        start(suite)
        self.break_maildir(suite, ALICE)
        qid = yield suite.queue.submit("carol@remote.example", [(ALICE, local_route(ALICE))],
                                       message("slow"), {})
        yield wait_for(lambda: suite.queue.spool.load(qid).recipients[0].attempts >= 5)
        self.assertEqual(warnings, [[ALICE]])
        self.assertTrue(suite.queue.spool.load(qid).warned)

    @defer.inlineCallbacks
    def test_mail_loop_bounces_with_5_4_6(self):
        suite = self.make(max_received_headers=5)
        bounced = []
        suite.queue.on_bounce = lambda entry, rcpts: bounced.extend(rcpts)
        start(suite)
        qid = yield suite.queue.submit("carol@remote.example", [(ALICE, local_route(ALICE))],
                                       message("loop", received=6), {})
        yield wait_for(lambda: not os.path.exists(suite.queue.spool.envelope_path(qid)))
        self.assertEqual(maildir_messages(suite.config, ALICE), [])
        [r] = bounced
        self.assertIn("5.4.6", r.last_error)
        # At the limit it is still delivered.
        yield suite.queue.submit("carol@remote.example", [(ALICE, local_route(ALICE))],
                                 message("ok", received=5), {})
        yield wait_for(lambda: maildir_messages(suite.config, ALICE))

    # -- remote recipients ---------------------------------------------------------------------
    @defer.inlineCallbacks
    def test_remote_without_agent_waits_in_queue(self):
        suite = self.make()
        start(suite)
        qid = yield suite.queue.submit("alice@example.org",
                                       [("x@far.example", remote_route("x@far.example")),
                                        (BOB, local_route(BOB))], message("r"), {})
        yield wait_for(lambda: suite.queue.spool.load(qid).recipients[0].attempts == 1)
        entry = suite.queue.spool.load(qid)
        remote = [r for r in entry.recipients if not r.local][0]
        local = [r for r in entry.recipients if r.local][0]
        self.assertEqual((remote.state, remote.last_error),
                         ("pending", "451 4.3.2 no remote delivery configured"))
        self.assertEqual(local.state, "sent")

    @defer.inlineCallbacks
    def test_remote_agent_gets_only_remote_recipients_and_deferrals_retry(self):
        suite = self.make(retry_schedule=[0.3])
        calls: list[list[str]] = []

        class Agent:
            def deliver(self, entry, recipients, message_path):
                calls.append([r.address for r in recipients])
                status = "deferred" if len(calls) == 1 else "sent"
                return defer.succeed([DeliveryResult(r.address, status, "451 4.7.1 try later"
                                                     if status == "deferred" else "250 ok",
                                                     remote_mta="mx.far.example")
                                      for r in recipients])
        suite.queue.remote_agent = Agent()
        start(suite)
        qid = yield suite.queue.submit(ALICE, [("x@far.example", remote_route("x@far.example")),
                                               (BOB, local_route(BOB))], message("r2"), {})
        yield wait_for(lambda: not os.path.exists(suite.queue.spool.envelope_path(qid)))
        self.assertEqual(calls, [["x@far.example"], ["x@far.example"]])
        self.assertEqual(len(maildir_messages(suite.config, BOB)), 1)  # once, not per attempt

    # -- hold, kick, restart -------------------------------------------------------------------
    @defer.inlineCallbacks
    def test_entries_left_in_spool_are_delivered_at_start_and_held_ones_skipped(self):
        suite = self.make()
        spool = suite.queue.spool
        spool.ensure()
        entries = []
        for i, held in enumerate([False, True, False]):
            e = QueueEntry(new_queue_id(), "carol@remote.example",
                           [Recipient(ALICE, ALICE, True)], time.time(), held=held)
            spool.store(e, message(f"left{i}"))
            entries.append(e)
        start(suite)
        yield wait_for(lambda: len(maildir_messages(suite.config, ALICE)) == 2)
        yield sleep(0.5)
        yield wait_idle(suite)
        self.assertEqual(spool.ids(), [entries[1].id])
        self.assertEqual(len(maildir_messages(suite.config, ALICE)), 2)
        # kick() does not override hold either; releasing (as the CLI does) delivers promptly.
        yield suite.queue.kick(entries[1].id)
        self.assertEqual(spool.ids(), [entries[1].id])
        claim = spool.claim_wait(entries[1].id)
        e = spool.load(entries[1].id)
        e.held = False
        spool.save(e)
        claim.release()
        spool.kick()
        began = time.monotonic()
        yield wait_for(lambda: len(maildir_messages(suite.config, ALICE)) == 3, timeout=5)
        self.assertLess(time.monotonic() - began, 2.5)

    @defer.inlineCallbacks
    def test_kick_ignores_retry_time(self):
        suite = self.make(retry_schedule=[3600])
        start(suite)
        maildir = self.break_maildir(suite, ALICE)
        qid = yield suite.queue.submit("carol@remote.example", [(ALICE, local_route(ALICE))],
                                       message("k"), {})
        yield wait_for(lambda: suite.queue.spool.load(qid).recipients[0].attempts == 1)
        yield wait_idle(suite)
        os.unlink(os.path.join(maildir, "new"))
        yield suite.queue.kick(qid)
        self.assertEqual(len(maildir_messages(suite.config, ALICE)), 1)
        self.assertFalse(os.path.exists(suite.queue.spool.envelope_path(qid)))

    @defer.inlineCallbacks
    def test_entry_claimed_elsewhere_is_not_touched(self):
        suite = self.make(scan_interval=0.2)
        spool = suite.queue.spool
        spool.ensure()
        e = QueueEntry(new_queue_id(), "carol@remote.example", [Recipient(ALICE, ALICE, True)],
                       time.time())
        spool.store(e, message("claimed"))
        claim = spool.claim(e.id)  # as another process working on it would
        start(suite)
        yield sleep(0.8)
        self.assertEqual(maildir_messages(suite.config, ALICE), [])
        claim.release()
        yield wait_for(lambda: maildir_messages(suite.config, ALICE), timeout=10)

    @defer.inlineCallbacks
    def test_damaged_entries_are_reported_and_do_not_block_others(self):
        suite = self.make(scan_interval=0.2)
        errors: list[str] = []

        def observer(event):
            if event.get("log_namespace") == "mailsuite.queue" and event.get("log_level") \
                    and event["log_level"].name == "error":
                from twisted.logger import formatEvent

                errors.append(formatEvent(event))
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        spool = suite.queue.spool
        spool.ensure()
        ids = []
        for i in range(3):
            e = QueueEntry(new_queue_id(), "c@r.example", [Recipient(ALICE, ALICE, True)],
                           time.time())
            spool.store(e, message(f"d{i}"))
            ids.append(e.id)
        with open(spool.envelope_path(ids[0]), "w") as f:
            f.write("{broken")
        os.unlink(spool.message_path(ids[1]))
        start(suite)
        yield wait_for(lambda: maildir_messages(suite.config, ALICE))
        yield sleep(1.0)  # several scans
        self.assertEqual(sorted(spool.ids()), sorted(ids[:2]))  # left for the admin
        self.assertEqual(len([e for e in errors if ids[0] in e]), 1, errors)  # once, not per scan
        self.assertEqual(len([e for e in errors if ids[1] in e and "without message file" in e]),
                         1, errors)

    def test_submit_without_recipients_fails(self):
        suite = self.make()
        start(suite)
        nobody = Route(address="nobody@example.org", hosted=True)  # hosted, no such user
        d = suite.queue.submit("a@b.example", [("nobody@example.org", nobody)], b"x\r\n", {})
        return self.assertFailure(d, ValueError)

"""Group commit and delivery at spool time (docs/design/queue.md, "Group commit", "Delivery at
spool time"): messages that arrive together share one directory fsync, none is acknowledged
before it, and a failed fsync fails every one of them and leaves nothing behind.

A hand-driven io pool plays the io threads; the spool and the Maildirs are real, on tmp_path.
"""
from __future__ import annotations

import errno
import os

import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from mailsuite.mailbox.maildir import delivery_marker
from mailsuite.queue.commit import GroupCommit
from mailsuite.queue.runner import QueueRunner
from tests.unit.queuekit import (ALICE, BOB, MailLog, build_runner, local_route, make_config,
                                 maildir_messages, message, read, remote_route)
from tests.unit.manualpool import ManualPool

CAROL = "carol@remote.example"


class Syncs:
    """The fsync function the group commit calls: counts, and fails while `error` is set."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.error: OSError | None = None
        self.during: list = []  # callables run inside the next fsync (a request that arrives)

    def __call__(self, directory: str) -> None:
        self.calls.append(directory)
        while self.during:
            self.during.pop(0)()
        if self.error is not None:
            raise self.error


def outcomes(d: defer.Deferred) -> list:
    seen: list = []
    d.addBoth(seen.append)
    return seen


# -- GroupCommit alone -------------------------------------------------------------------------
def test_requests_made_before_the_fsync_starts_share_it():
    pool, syncs = ManualPool(), Syncs()
    group = GroupCommit(pool, syncs)
    seen = [outcomes(group.sync(["/m/new"])) for _ in range(3)]
    assert pool.names() == ["_fsync"]  # one job for the three
    assert seen == [[], [], []]  # nobody is told before the fsync is done
    pool.drain()
    assert seen == [[None], [None], [None]]
    assert syncs.calls == ["/m/new"] and group.fsyncs == 1


def test_a_request_that_arrives_during_the_fsync_waits_for_the_next_one():
    pool, syncs = ManualPool(), Syncs()
    group = GroupCommit(pool, syncs)
    first = outcomes(group.sync(["/m/new"]))
    late: list = []
    syncs.during.append(lambda: late.append(outcomes(group.sync(["/m/new"]))))
    pool.step()
    assert first == [None]
    assert late == [[]]  # its rename may have come after that fsync began
    pool.drain()
    assert late == [[None]] and syncs.calls == ["/m/new", "/m/new"]


def test_a_failed_fsync_fails_every_request_it_covered_and_the_next_batch_tries_again():
    pool, syncs = ManualPool(), Syncs()
    group = GroupCommit(pool, syncs)
    syncs.error = OSError(errno.EIO, "Input/output error")
    batch = [outcomes(group.sync(["/m/new", "/q"])) for _ in range(2)]
    pool.drain()
    assert all(len(s) == 1 and isinstance(s[0], Failure) and s[0].check(OSError)
               for s in batch), batch
    syncs.error = None
    after = outcomes(group.sync(["/m/new"]))
    pool.drain()
    assert after == [None]


# -- through the runner ------------------------------------------------------------------------
def runner_on(tmp_path, pool: ManualPool, syncs: Syncs) -> QueueRunner:
    config = make_config(str(tmp_path / "data"))
    os.makedirs(config.queue_dir, exist_ok=True)
    clock = task.Clock()
    clock.advance(1_800_000_000)
    runner = build_runner(config, pool, clock)
    runner.group = GroupCommit(pool, syncs)
    return runner


def staged(runner: QueueRunner, data: bytes) -> str:
    directory = runner.spool.ensure_incoming()
    path = os.path.join(directory, f"{os.getpid()}.{os.urandom(8).hex()}")
    with open(path, "wb") as f:
        f.write(data)
    return path


def submit_file(runner: QueueRunner, recipients, data: bytes) -> tuple[str, list]:
    path = staged(runner, data)
    return path, outcomes(runner.submit_file(CAROL, recipients, path, len(data), {}))


def spool_entries(runner: QueueRunner) -> list[str]:
    return runner.spool.ids()


def test_messages_arriving_together_share_one_fsync_and_are_never_spooled(tmp_path):
    pool, syncs = ManualPool(), Syncs()
    runner = runner_on(tmp_path, pool, syncs)
    log = MailLog().install()
    try:
        sent = [submit_file(runner, [(ALICE, local_route(ALICE))], message(f"m{i}"))
                for i in range(3)]
        for _ in range(3):
            pool.step()  # the three io jobs write their copies ...
        assert [s for _, s in sent] == [[], [], []]  # ... and nobody has a 250 yet
        pool.drain()
    finally:
        log.remove()
    ids = [s[0] for _, s in sent]
    assert all(isinstance(i, str) for i in ids), ids
    store = runner.local.mailstore
    copies = maildir_messages(store, ALICE)
    assert len(copies) == 3 and syncs.calls == [os.path.dirname(copies[0])]
    assert spool_entries(runner) == [] and not any(os.path.exists(p) for p, _ in sent)
    # The copies carry the queue's exactly-once names (docs/design/maildir.md).
    entry_names = sorted(os.path.basename(c) for c in copies)
    for queue_id in ids:
        marker = delivery_marker(runner.clock.seconds(), f"Q{queue_id}N0")
        assert sum(n.startswith(marker) for n in entry_names) == 1
        lines = log.of(queue_id)
        assert ["status=queued" in lines[0], "status=sent" in lines[1],
                "status=removed" in lines[2]] == [True, True, True], lines
        assert "attempts=1 " in lines[1] and "relay=local " in lines[1]


def test_a_failed_fsync_fails_the_whole_batch_and_leaves_nothing(tmp_path):
    pool, syncs = ManualPool(), Syncs()
    runner = runner_on(tmp_path, pool, syncs)
    syncs.error = OSError(errno.EIO, "Input/output error")
    sent = [submit_file(runner, [(ALICE, local_route(ALICE))], message("a")),
            submit_file(runner, [(ALICE, local_route(ALICE)), (BOB, local_route(BOB))],
                        message("b")),
            submit_file(runner, [(CAROL, remote_route(CAROL))], message("c"))]
    pool.drain()
    for _, seen in sent:
        assert len(seen) == 1 and isinstance(seen[0], Failure) and seen[0].check(OSError), seen
    store = runner.local.mailstore
    assert maildir_messages(store, ALICE) == [] and maildir_messages(store, BOB) == []
    assert spool_entries(runner) == []  # the remote one was taken back too


def test_remote_recipients_are_spooled_and_share_the_spool_directory_fsync(tmp_path):
    pool, syncs = ManualPool(), Syncs()
    runner = runner_on(tmp_path, pool, syncs)
    sent = [submit_file(runner, [(CAROL, remote_route(CAROL))], message(f"r{i}"))
            for i in range(2)]
    for _ in range(2):
        pool.step()
    pool.step()  # the one fsync
    assert sorted(s[0] for _, s in sent) == spool_entries(runner)
    assert syncs.calls == [runner.spool.directory]


def test_a_copy_that_fails_at_spool_time_spools_the_entry_with_the_others_recorded(tmp_path):
    from tests.unit.queuekit import break_maildir

    pool, syncs = ManualPool(), Syncs()
    runner = runner_on(tmp_path, pool, syncs)
    store = runner.local.mailstore
    break_maildir(store, BOB)
    _, seen = submit_file(runner, [(ALICE, local_route(ALICE)), (BOB, local_route(BOB))],
                          message("half"))
    pool.drain()
    [queue_id] = seen
    entry = runner.spool.load(queue_id)
    assert [(r.address, r.state) for r in entry.recipients] == [(ALICE, "sent"), (BOB, "pending")]
    assert len(maildir_messages(store, ALICE)) == 1
    assert read(runner.spool.message_path(queue_id)).endswith(message("half"))


@pytest.mark.parametrize("recipients", [[ALICE], [ALICE, BOB]])
def test_spool_time_delivery_writes_what_the_queue_would(tmp_path, recipients):
    pool, syncs = ManualPool(), Syncs()
    runner = runner_on(tmp_path, pool, syncs)
    _, seen = submit_file(runner, [(r, local_route(r)) for r in recipients], message("same"))
    pool.drain()
    store = runner.local.mailstore
    for address in recipients:
        [copy] = maildir_messages(store, address)
        data = read(copy)
        assert data.startswith(f"Return-Path: <{CAROL}>\r\nDelivered-To: {address}\r\n".encode())
        assert data.endswith(message("same"))


def test_a_partial_delivery_whose_spooling_fails_takes_its_copies_back(tmp_path, monkeypatch):
    """Bob's copy fails and the spool is full: no 250, and Alice's copy is not left behind
    for the client's next try to double."""
    from mailsuite.queue.spool import Spool
    from tests.unit.queuekit import break_maildir

    pool, syncs = ManualPool(), Syncs()
    runner = runner_on(tmp_path, pool, syncs)
    store = runner.local.mailstore
    break_maildir(store, BOB)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Spool, "store_file", full)
    path, seen = submit_file(runner, [(ALICE, local_route(ALICE)), (BOB, local_route(BOB))],
                             message("full"))
    pool.drain()
    assert len(seen) == 1 and isinstance(seen[0], Failure) and seen[0].check(OSError)
    assert maildir_messages(store, ALICE) == [] and spool_entries(runner) == []
    assert os.path.exists(path)  # left to the caller, which removes it


def test_the_spool_time_envelopes_of_a_batch_go_after_one_log_flush(tmp_path, monkeypatch):
    """docs/design/queue.md, "The mail log": each envelope beside a staged file stays until
    the lines of its copies are written; the messages accepted together share that flush
    and the io job that removes their envelopes."""
    from mailsuite import maillog

    pool, syncs = ManualPool(), Syncs()
    runner = runner_on(tmp_path, pool, syncs)
    flushes: list[defer.Deferred] = []
    monkeypatch.setattr(maillog, "sync", lambda: flushes.append(defer.Deferred()) or flushes[-1])
    sent = [submit_file(runner, [(ALICE, local_route(ALICE))], message(f"m{i}"))
            for i in range(3)]
    pool.drain()  # the copies and their directory fsync: three 250s
    assert all(isinstance(s[0], str) for _, s in sent)

    def envelopes() -> list[str]:  # the files kept for reuse are empty
        directory = runner.spool.ensure_incoming()
        return [n for n in os.listdir(directory)
                if n.endswith(".env") and os.path.getsize(os.path.join(directory, n))]

    assert len(envelopes()) == 3 and flushes == []
    runner.clock.advance(0)
    assert len(flushes) == 1 and pool.jobs == []  # nothing removed before the lines are out
    flushes[0].callback(None)
    assert pool.names() == ["clear_sidecars"]
    pool.drain()
    assert envelopes() == []


def test_spool_time_envelope_files_are_reused_and_removed_at_a_clean_stop(tmp_path):
    """One file per delivery in flight, emptied and reused, not one created and unlinked per
    message; a clean stop removes them."""
    pool, syncs = ManualPool(), Syncs()
    runner = runner_on(tmp_path, pool, syncs)
    directory = runner.spool.ensure_incoming()
    for round_ in range(3):
        for i in range(2):
            submit_in_memory(runner, [(ALICE, local_route(ALICE))], message(f"{round_}.{i}"))
        pool.drain()
        runner.clock.advance(0)  # the log flush (the test's log is synchronous) and clear
        pool.drain()
        files = sorted(n for n in os.listdir(directory) if n.endswith(".env"))
        assert len(files) == 2 and all(
            os.path.getsize(os.path.join(directory, n)) == 0 for n in files)
        if round_ == 0:
            first = files
        assert files == first
    assert runner.spool.leftovers() == []  # empty ones are nothing to show
    runner.spool.close_sidecars()
    assert os.listdir(directory) == []


# -- a message still in memory at the final dot (smtp/staging.py, then_data) -------------------
def submit_in_memory(runner: QueueRunner, recipients, data: bytes) -> list:
    from mailsuite.smtp.staging import StagedMessage

    message_ = StagedMessage(runner.io, runner.incoming_dir, lambda over: None)
    message_.write_last(data)
    return outcomes(runner.submit_file(CAROL, recipients, message_, len(data), {}))


@pytest.mark.parametrize("recipients", [[ALICE], [ALICE, BOB]])
def test_a_message_in_memory_is_delivered_from_memory_without_a_staged_file(tmp_path,
                                                                            recipients):
    pool, syncs = ManualPool(), Syncs()
    runner = runner_on(tmp_path, pool, syncs)
    seen = submit_in_memory(runner, [(r, local_route(r)) for r in recipients], message("mem"))
    assert [job[0].func.__name__ for job in pool.jobs] == ["_store_data_blocking"]
    pool.step()
    incoming = os.listdir(runner.incoming_dir)
    assert len(incoming) == 1 and incoming[0].endswith(".env")  # no staged message file
    pool.drain()
    assert isinstance(seen[0], str) and spool_entries(runner) == []
    store = runner.local.mailstore
    for address in recipients:
        [copy] = maildir_messages(store, address)
        data = read(copy)
        assert data.startswith(f"Return-Path: <{CAROL}>\r\nDelivered-To: {address}\r\n".encode())
        assert data.endswith(message("mem"))


def test_a_message_in_memory_with_a_failed_copy_is_spooled_from_memory(tmp_path):
    from tests.unit.queuekit import break_maildir

    pool, syncs = ManualPool(), Syncs()
    runner = runner_on(tmp_path, pool, syncs)
    break_maildir(runner.local.mailstore, BOB)
    seen = submit_in_memory(runner, [(ALICE, local_route(ALICE)), (BOB, local_route(BOB))],
                            message("half"))
    pool.drain()
    [queue_id] = seen
    entry = runner.spool.load(queue_id)
    assert [(r.address, r.state) for r in entry.recipients] == [(ALICE, "sent"), (BOB, "pending")]
    assert read(runner.spool.message_path(queue_id)) == message("half")


def test_a_message_in_memory_whose_fsync_fails_leaves_nothing(tmp_path):
    pool, syncs = ManualPool(), Syncs()
    runner = runner_on(tmp_path, pool, syncs)
    syncs.error = OSError(errno.EIO, "Input/output error")
    sent = [submit_in_memory(runner, [(ALICE, local_route(ALICE))], message("a")),
            submit_in_memory(runner, [(CAROL, remote_route(CAROL))], message("c"))]
    pool.drain()
    for seen in sent:
        assert len(seen) == 1 and isinstance(seen[0], Failure) and seen[0].check(OSError), seen
    assert maildir_messages(runner.local.mailstore, ALICE) == []
    assert spool_entries(runner) == []
    assert [n for n in os.listdir(runner.incoming_dir) if not n.endswith(".env")] == []


def test_a_spool_time_envelope_in_use_at_the_stop_is_closed_only_when_given_back(tmp_path):
    """The stop must not close a descriptor an io job still writes to (its number could be
    reused by another open): the file in use is closed and removed when its job is done."""
    from mailsuite.queue.spool import QueueEntry, Recipient, Spool

    spool = Spool(str(tmp_path / "queue"))
    entry = QueueEntry("6b49d200000004600aa", CAROL, [Recipient(ALICE, ALICE, True)], 1.0)
    idle, busy = spool.write_sidecar(entry), spool.write_sidecar(entry)
    spool.clear_sidecars([idle])
    spool.close_sidecars()
    assert not os.path.exists(idle.path) and os.path.getsize(busy.path) > 0
    os.fstat(busy.fd)  # still open
    spool.clear_sidecars([busy])
    assert not os.path.exists(busy.path)

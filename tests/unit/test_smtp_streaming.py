"""DATA streams to a staged file through a bounded buffer (docs/design/smtp.md, "DATA"): what is
on disk, when the client is paused, what is removed, and how the real queue takes a staged file
over. In memory with a hand-driven io pool; the spool is real, on tmp_path."""
from __future__ import annotations

import os

import pytest

from twisted.internet import defer, task

from mailsuite.config import QueueSection
from mailsuite.directory.api import Route
from mailsuite.pools import InlinePool
from mailsuite.queue.runner import QueueRunner
from mailsuite.queue.spool import Spool
from mailsuite.smtp import staging
from tests.unit.smtpkit import World
from tests.unit.manualpool import ManualPool

LIMITS = {"max_message_size": 64 * 1024 * 1024}


def start_data(c, rcpt=b"alice@example.org"):
    c.ehlo()
    c.send(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<" + rcpt + b">\r\nDATA\r\n")
    assert [c.code() for _ in range(3)] == [250, 250, 354]


def test_body_is_on_disk_while_it_arrives_not_in_memory(tmp_path):
    world = World(limits=LIMITS, queue_dir=str(tmp_path))
    c = world.connect("mx")
    start_data(c)
    line = b"x" * 998 + b"\r\n"
    for _ in range(2000):  # 2 MB
        c.send(line * 1)
    (name,) = world.queue.staged()
    on_disk = os.path.getsize(tmp_path / name)
    assert on_disk > 1_900_000  # written as it came, minus at most one unflushed buffer
    proto = c.proto
    assert len(proto._out) <= 64 * 1024 and len(proto._buffer) < 1000
    c.send(b".\r\n")
    assert c.code() == 250
    (msg,) = world.queue.messages
    assert msg.data.startswith(b"Received: ") and msg.data.endswith(line * 3)
    assert msg.data.count(line) == 2000
    assert world.queue.staged() == []  # taken over by the queue


def test_slow_disk_pauses_the_client_and_resumes_it(tmp_path, monkeypatch):
    monkeypatch.setattr(staging, "BUDGET", staging.MemoryBudget(0))  # every byte to the disk
    io = ManualPool()
    world = World(limits=LIMITS, queue_dir=str(tmp_path), io=io)
    c = world.connect("mx")
    start_data(c)
    chunk = (b"y" * 78 + b"\r\n") * 800  # 64000 octets, as TCP would deliver it
    sent = 0
    while c.transport.producerState != "paused":
        c.send(chunk)
        sent += len(chunk)
        assert sent < 2 * 1024 * 1024, "never paused"
    staged = c.proto._staged
    assert staged.backlog > staging.HIGH_WATER
    assert staged.backlog < staging.HIGH_WATER + 2 * len(chunk)
    c.send(chunk)  # what was in flight still arrives; it is kept, not lost
    io.drain()
    assert c.transport.producerState == "producing"
    assert staged.backlog == 0
    c.send(b".\r\n")
    io.drain()
    assert c.code() == 250
    assert world.queue.messages[0].data.count(b"y" * 78 + b"\r\n") == sent // 80 + 800


def test_idle_timer_does_not_run_while_we_are_the_slow_one(tmp_path):
    io = ManualPool()
    world = World(limits={**LIMITS, "smtp_timeout": 5}, queue_dir=str(tmp_path), io=io)
    c = world.connect("mx")
    start_data(c)
    while c.transport.producerState != "paused":
        c.send(b"z" * 998 + b"\r\n")
    c.wait(20)  # the disk is stuck for longer than the idle timeout
    assert not c.transport.disconnecting
    io.drain()
    c.send(b".\r\n")
    io.drain()
    assert c.code() == 250


def test_received_header_is_written_first_and_submission_headers_follow_the_fields(tmp_path):
    world = World(queue_dir=str(tmp_path))
    c = world.connect("submissions")
    c.ehlo()
    c.send(b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHNlY3JldC1wdy0x\r\n")
    assert c.code() == 235
    c.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    assert [c.code() for _ in range(3)] == [250, 250, 354]
    c.send(b"From: alice@example.org\r\nSubject: s\r\n\r\nbody\r\n.\r\n")
    assert c.code() == 250
    data = world.queue.messages[0].data
    head, body = data.split(b"\r\n\r\n", 1)
    fields = head.split(b"\r\n")
    assert fields[0].startswith(b"Received: from client.example")
    assert fields[3:5] == [b"From: alice@example.org", b"Subject: s"]
    assert fields[5].startswith(b"Message-ID: <") and fields[6].startswith(b"Date: ")
    assert body == b"body\r\n"


def test_message_without_body_gets_its_added_headers_at_the_end(tmp_path):
    world = World(queue_dir=str(tmp_path))
    c = world.connect("submissions")
    c.ehlo()
    c.send(b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHNlY3JldC1wdy0x\r\n")
    assert c.code() == 235
    c.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    assert [c.code() for _ in range(3)] == [250, 250, 354]
    c.send(b"Subject: only\r\nMessage-ID: <a@b>\r\n.\r\n")
    assert c.code() == 250
    data = world.queue.messages[0].data
    assert data.endswith(b"Subject: only\r\nMessage-ID: <a@b>\r\nDate: " +
                         data.rsplit(b"Date: ", 1)[1])
    assert data.count(b"Message-ID") == 1


def test_too_big_message_removes_the_staged_file_at_once(tmp_path):
    world = World(limits={"max_message_size": 100_000}, queue_dir=str(tmp_path))
    c = world.connect("mx")
    start_data(c)
    for _ in range(200):
        c.send(b"a" * 998 + b"\r\n")
    assert world.queue.staged() == []  # gone as soon as the limit was passed
    assert c.proto._staged is None
    c.send(b".\r\n")
    assert c.reply()[0].startswith(b"552 5.3.4")
    assert world.queue.messages == []


def test_disconnect_during_data_removes_the_staged_file(tmp_path):
    world = World(limits=LIMITS, queue_dir=str(tmp_path))
    c = world.connect("mx")
    start_data(c)
    c.send(b"Subject: half\r\n\r\n" + b"b" * 500 + b"\r\n")
    c.proto._flush_out()
    assert len(world.queue.staged()) == 1
    c.disconnect()
    assert world.queue.staged() == []
    assert world.queue.messages == []


def test_disconnect_with_a_write_in_flight_removes_the_file_after_it(tmp_path):
    io = ManualPool()
    world = World(limits=LIMITS, queue_dir=str(tmp_path), io=io)
    c = world.connect("mx")
    start_data(c)
    io.step()  # the open
    c.send(b"q" * 900 + b"\r\n")
    c.proto._flush_out()  # a write job is now queued
    c.disconnect()
    io.drain()
    assert world.queue.staged() == []


def test_refused_message_and_rset_leave_no_staged_file(tmp_path):
    world = World(queue_dir=str(tmp_path))
    c = world.connect("mx")
    start_data(c)
    c.send(b"Subject: bad\r\n\r\nnul\0here\r\n.\r\n")
    assert c.reply()[0].startswith(b"550 5.6.0")
    c.send(b"RSET\r\n")
    assert c.code() == 250
    assert world.queue.staged() == [] and world.queue.messages == []


def test_queue_failure_leaves_no_staged_file_and_enospc_is_452(tmp_path):
    world = World(queue_dir=str(tmp_path))
    world.queue.fail_with = OSError(28, "No space left on device")
    c = world.connect("mx")
    start_data(c)
    c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert c.reply()[0].startswith(b"452 4.3.1")
    assert world.queue.staged() == []
    world.queue.fail_with = OSError(5, "Input/output error")
    c.send(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert [c.code() for _ in range(3)] == [250, 250, 354]
    c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert c.reply()[0].startswith(b"451 4.3.0")
    assert world.queue.staged() == []


def test_staged_file_that_cannot_be_written_is_a_temporary_error(tmp_path):
    # The incoming directory is a file: open fails like a broken disk.
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    world = World(queue_dir=str(blocker))
    c = world.connect("mx")
    start_data(c)
    c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert c.reply()[0][:3] in (b"451", b"452")
    c.send(b"NOOP\r\n")
    assert c.code() == 250


def test_write_error_midway_is_temporary_and_removes_the_file(tmp_path, monkeypatch):
    world = World(limits=LIMITS, queue_dir=str(tmp_path))
    c = world.connect("mx")
    start_data(c)

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(staging, "write_all", full)
    c.send(b"w" * 998 + b"\r\n" * 1)
    c.send((b"w" * 998 + b"\r\n") * 100)
    c.send(b".\r\n")
    assert c.reply()[0].startswith(b"452 4.3.1")
    assert world.queue.staged() == []


# -- the queue side: Spool.store_file and QueueRunner.submit_file ------------------------------
class _Agent:
    def deliver(self, entry, recipients, path):
        return defer.succeed([])


def _runner(tmp_path):
    spool = Spool(str(tmp_path / "queue"))
    return QueueRunner(spool, QueueSection(), io=InlinePool(), clock=task.Clock(),
                       local=_Agent(), remote=None, notifier=_Agent()), spool


def test_submit_file_takes_the_staged_file_over_durably(tmp_path, monkeypatch):
    runner, spool = _runner(tmp_path)
    os.makedirs(runner.incoming_dir)
    staged = os.path.join(runner.incoming_dir, f"{os.getpid()}.abc")
    with open(staged, "wb") as f:
        f.write(b"Subject: s\r\n\r\nbody\r\n")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    ids = []
    runner.submit_file("x@remote.example", [("a@remote.example", None)], staged, 21,
                       {"client_ip": "1.2.3.4"}).addCallback(ids.append)
    (queue_id,) = ids
    assert not os.path.exists(staged)
    assert open(spool.message_path(queue_id), "rb").read() == b"Subject: s\r\n\r\nbody\r\n"
    assert spool.load(queue_id).recipients[0].address == "a@remote.example"
    assert len(synced) >= 3  # the message, the envelope, the directory


def test_submit_file_failure_leaves_the_staged_file_for_the_caller(tmp_path, monkeypatch):
    runner, spool = _runner(tmp_path)
    os.makedirs(runner.incoming_dir)
    staged = os.path.join(runner.incoming_dir, f"{os.getpid()}.abc")
    with open(staged, "wb") as f:
        f.write(b"x\r\n")

    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("mailsuite.queue.spool.write_file_durably", broken)
    errors = []
    runner.submit_file("x@remote.example", [("a@remote.example", Route("a", hosted=False))],
                       staged, 3, {}).addErrback(errors.append)
    assert errors and errors[0].check(OSError)
    assert os.path.exists(staged) and spool.ids() == []


def test_start_up_removes_staged_files_of_dead_processes_only(tmp_path):
    spool = Spool(str(tmp_path / "queue"))
    incoming = spool.ensure_incoming()
    mine = os.path.join(incoming, f"{os.getpid()}.leftover")  # a previous run had our pid
    dead = os.path.join(incoming, "999999999.x")
    alive = os.path.join(incoming, f"{os.getppid()}.y")  # a live process still receiving
    junk = os.path.join(incoming, "junk")
    for path in (mine, dead, alive, junk):
        open(path, "wb").close()
    removed = spool.clean_incoming()
    assert sorted(os.path.basename(r) for r in removed) == sorted(
        os.path.basename(p) for p in (mine, dead, junk))
    assert os.listdir(incoming) == [os.path.basename(alive)]
    assert spool.ids() == []


def job_name(job: tuple) -> str:
    """A staging job's function; "+then" when the queue's take-over runs in the same job."""
    fn, args = job[0], job[1]
    if fn is staging._and_then:
        return args[0].__name__ + "+then"
    return getattr(fn, "func", fn).__name__  # the queue's then_data is a partial


def test_a_small_message_is_staged_by_one_io_job(tmp_path):
    """Nothing is created at DATA; at the final dot one job creates, writes, closes and hands
    the file to the queue."""
    io = ManualPool()
    world = World(limits=LIMITS, queue_dir=str(tmp_path), io=io)
    c = world.connect("mx")
    start_data(c)
    assert io.jobs == [] and world.queue.staged() == []
    c.send(b"Subject: small\r\n\r\nbody\r\n.\r\n")
    assert [job_name(job) for job in io.jobs] == ["_create+then"]
    io.drain()
    assert c.code() == 250
    assert world.queue.messages[0].data.endswith(b"Subject: small\r\n\r\nbody\r\n")


BODIES = [
    b"plain\r\nlines\r\n",
    b".leading dot\r\n..two dots\r\nmiddle\r\n.\r\n".replace(b".\r\n", b"..\r\n"),
    b"a" * 997 + b"\r\nok\r\n",  # the longest line allowed (998 + CRLF)
    b"a" * 999 + b"\r\nok\r\n",  # one too long: 500 5.5.2
    b"nul \0 here\r\n",  # 550 5.6.0
    b"bare\nlf\r\nbare\rcr\r\n",  # 550 5.6.0
    b"cr before crlf\r\r\nok\r\n",  # a bare CR too
    b"ends in lf\n\r\n",
    b"..\r\n.x\r\n. \r\n",  # stuffed lines that are not the terminator
    b"x\r\n" * 5000,  # over the size limit below: 552 5.3.4
]


@pytest.mark.parametrize("body", BODIES)
def test_a_body_in_one_piece_is_taken_exactly_like_one_byte_at_a_time(tmp_path, body):
    """The body block fast path (DataTransfer._body_block) and the line rules agree."""
    outcomes = []
    for size in (1 << 20, 1):
        world = World(limits={"max_message_size": 8000}, queue_dir=str(tmp_path / str(size)))
        c = world.connect("mx")
        start_data(c)
        data = b"Subject: s\r\n\r\n" + body + b".\r\n"
        for i in range(0, len(data), size):
            c.send(data[i:i + size])
        reply = c.reply()[0]
        stored = [m.data.split(b"\r\n\r\n", 1)[1] for m in world.queue.messages]
        outcomes.append((reply[:9], stored))
    assert outcomes[0] == outcomes[1]
    if outcomes[0][0].startswith(b"250"):
        unstuffed = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n"
                             for line in body.split(b"\r\n")[:-1])
        assert outcomes[0][1] == [unstuffed]
    else:
        assert outcomes[0][1] == []


def test_a_message_over_one_chunk_writes_its_last_bytes_and_closes_in_one_job(tmp_path):
    io = ManualPool()
    world = World(limits=LIMITS, queue_dir=str(tmp_path), io=io)
    c = world.connect("mx")
    start_data(c)
    c.send(b"Subject: big\r\n\r\n" + (b"b" * 78 + b"\r\n") * 1300 + b".\r\n")
    ran = []
    while io.jobs:
        ran.append(job_name(io.jobs[0]))
        io.step()
    assert ran == ["_create", "_write_close+then"]
    assert c.code() == 250
    assert world.queue.messages[0].data.count(b"b" * 78 + b"\r\n") == 1300


def _staged(runner: QueueRunner, data: bytes, io) -> staging.StagedMessage:
    message = staging.StagedMessage(io, runner.spool.ensure_incoming(), lambda over: None)
    message.write_last(data)
    return message


def test_a_staged_message_is_taken_over_in_the_job_that_completes_it(tmp_path):
    """submit_file(StagedMessage): create, write, close and the spool's take-over (fsync,
    rename, envelope) are one io job; the directory fsync follows (group commit)."""
    io = ManualPool()
    spool = Spool(str(tmp_path / "queue"))
    runner = QueueRunner(spool, QueueSection(), io=io, clock=task.Clock(), local=_Agent(),
                         remote=None, notifier=_Agent())
    message = staging.StagedMessage(io, runner.spool.ensure_incoming(), lambda over: None)
    message.write(b"Subject: s\r\n\r\n")  # on disk before the end of DATA
    io.step()
    message.write_last(b"body\r\n")
    ids: list = []
    runner.submit_file("x@remote.example", [("a@remote.example", Route("a", hosted=False))],
                       message, message.size, {}).addCallback(ids.append)
    assert [job_name(job) for job in io.jobs] == ["_write_close+then"]
    io.step()
    assert io.names() == ["_fsync"] and ids == []  # no 250 before the directory fsync
    io.drain()
    (queue_id,) = ids
    assert open(spool.message_path(queue_id), "rb").read() == b"Subject: s\r\n\r\nbody\r\n"
    assert os.listdir(runner.incoming_dir) == []


def test_a_message_still_in_memory_is_spooled_by_one_job_without_a_staged_file(tmp_path):
    """A message under one chunk, all in memory at the final dot: the queue's job gets the
    bytes (then_data) and makes the only staged file it needs to spool the entry."""
    io = ManualPool()
    spool = Spool(str(tmp_path / "queue"))
    runner = QueueRunner(spool, QueueSection(), io=io, clock=task.Clock(), local=_Agent(),
                         remote=None, notifier=_Agent())
    message = _staged(runner, b"Subject: s\r\n\r\nbody\r\n", io)
    ids: list = []
    runner.submit_file("x@remote.example", [("a@remote.example", Route("a", hosted=False))],
                       message, message.size, {}).addCallback(ids.append)
    assert [job_name(job) for job in io.jobs] == ["_store_data_blocking"]
    io.step()
    assert io.names() == ["_fsync"] and ids == []  # no 250 before the directory fsync
    io.drain()
    (queue_id,) = ids
    assert open(spool.message_path(queue_id), "rb").read() == b"Subject: s\r\n\r\nbody\r\n"
    assert os.listdir(runner.incoming_dir) == [] and message.path is None


def test_a_failed_take_over_from_memory_leaves_no_file(tmp_path, monkeypatch):
    runner, spool = _runner(tmp_path)
    message = _staged(runner, b"x\r\n", InlinePool())

    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("mailsuite.queue.spool.write_file_durably", broken)
    errors: list = []
    runner.submit_file("x@remote.example", [("a@remote.example", Route("a", hosted=False))],
                       message, message.size, {}).addErrback(errors.append)
    assert errors and errors[0].check(OSError) and message.error is None
    assert os.listdir(runner.incoming_dir) == [] and spool.ids() == []
    message.discard()
    assert os.listdir(runner.incoming_dir) == []


def test_a_failed_take_over_leaves_the_staged_file_for_discard(tmp_path, monkeypatch):
    runner, spool = _runner(tmp_path)
    message = staging.StagedMessage(InlinePool(), runner.spool.ensure_incoming(),
                                    lambda over: None)
    message.write(b"x\r\n")  # on disk before the end of DATA

    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("mailsuite.queue.spool.write_file_durably", broken)
    errors: list = []
    runner.submit_file("x@remote.example", [("a@remote.example", Route("a", hosted=False))],
                       message, message.size, {}).addErrback(errors.append)
    assert errors and errors[0].check(OSError) and message.error is None
    assert os.listdir(runner.incoming_dir) == [os.path.basename(message.path)]
    message.discard()
    assert os.listdir(runner.incoming_dir) == [] and spool.ids() == []


def test_the_first_staged_file_creates_the_incoming_directory(tmp_path):
    directory = tmp_path / "incoming" / "host"
    message = staging.StagedMessage(InlinePool(), str(directory), lambda over: None)
    message.write_last(b"x\r\n")
    paths: list = []
    message.finish().addCallback(paths.append)
    assert paths == [message.path] and open(paths[0], "rb").read() == b"x\r\n"
    assert oct(os.stat(directory).st_mode & 0o777) == "0o700"


# -- messages kept in memory to the final dot (staging.MemoryBudget) -------------------------
def _memory_runner(tmp_path, io) -> tuple[QueueRunner, Spool]:
    spool = Spool(str(tmp_path / "queue"))
    return QueueRunner(spool, QueueSection(), io=io, clock=task.Clock(), local=_Agent(),
                       remote=None, notifier=_Agent()), spool


def test_a_message_within_the_budget_is_never_staged(tmp_path, monkeypatch):
    """100 KiB, over one chunk: kept in memory while it arrives, and the queue's one job gets
    its bytes; the budget is given back at the end."""
    budget = staging.MemoryBudget(1024 * 1024)
    monkeypatch.setattr(staging, "BUDGET", budget)
    io = ManualPool()
    runner, spool = _memory_runner(tmp_path, io)
    message = staging.StagedMessage(io, runner.spool.ensure_incoming(), lambda over: None)
    body = (b"m" * 98 + b"\r\n") * 1024
    for i in range(0, len(body), 65536):
        assert message.hold(min(len(body), i + 65536))
    assert budget.used == len(body) and io.jobs == []
    message.write_last(body)
    ids: list = []
    runner.submit_file("x@remote.example", [("a@remote.example", Route("a", hosted=False))],
                       message, message.size, {}).addCallback(ids.append)
    assert [job_name(job) for job in io.jobs] == ["_store_data_blocking"]
    io.drain()
    (queue_id,) = ids
    assert open(spool.message_path(queue_id), "rb").read() == body
    assert os.listdir(runner.incoming_dir) == [] and budget.used == 0


def test_memory_is_refused_past_the_message_limit_and_past_the_budget(tmp_path, monkeypatch):
    budget = staging.MemoryBudget(staging.MEMORY_PER_MESSAGE + 1000)
    monkeypatch.setattr(staging, "BUDGET", budget)
    directory = str(tmp_path / "incoming")
    one = staging.StagedMessage(InlinePool(), directory, lambda over: None)
    two = staging.StagedMessage(InlinePool(), directory, lambda over: None)
    assert one.hold(staging.MEMORY_PER_MESSAGE)
    assert not one.hold(staging.MEMORY_PER_MESSAGE + 1)  # one message's limit
    assert two.hold(1000) and not two.hold(1001)  # the process's budget
    assert budget.used == staging.MEMORY_PER_MESSAGE + 1000
    one.write(b"x" * 10)  # the caller writes instead: its hold ends
    assert budget.used == 1000 and not one.hold(20)  # and does not come back
    two.discard()
    assert budget.used == 0


def test_smtp_keeps_a_message_in_memory_only_while_the_budget_allows(tmp_path, monkeypatch):
    """Two clients send 200 KiB each; the budget holds one: the first message is never
    staged, the second goes to disk as it arrives. Both are accepted whole, and a client
    that leaves mid-DATA gives its memory back."""
    budget = staging.MemoryBudget(300 * 1024)
    monkeypatch.setattr(staging, "BUDGET", budget)
    world = World(limits=LIMITS, queue_dir=str(tmp_path))
    first, second = world.connect("mx"), world.connect("mx")
    start_data(first)
    start_data(second)
    line = b"k" * 98 + b"\r\n"
    for _ in range(2048):
        first.send(line)
    for _ in range(2048):
        second.send(line)
    assert len(world.queue.staged()) == 1 and first.proto._staged.path is None
    assert budget.used > 200 * 1024
    for c in (first, second):
        c.send(b".\r\n")
        assert c.code() == 250
    assert [m.data.count(line) for m in world.queue.messages] == [2048, 2048]
    assert budget.used == 0 and world.queue.staged() == []
    third = world.connect("mx")
    start_data(third)
    third.send(line * 1000)
    assert budget.used > 0 and world.queue.staged() == []
    third.disconnect()
    assert budget.used == 0

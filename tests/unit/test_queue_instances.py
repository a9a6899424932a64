"""Several processes on one spool (docs/design/queue.md, "Instances"): a dead peer is noticed by
its free liveness lock and its files are taken over at once; an entry another process may have
delivered is looked for before writing; every delivery's log line reaches the OS before the
envelope records it. Other processes are played by files and locks (no subprocess); the
end-to-end kill -9 is tests/scenario/test_queue_takeover.py.
"""
from __future__ import annotations

import fcntl
import os

import pytest
from twisted.internet import task
from twisted.logger import formatEvent, globalLogPublisher

from mailsuite import logwriter
from mailsuite.logwriter import BufferedLogObserver
from mailsuite.queue.instances import Instances
from mailsuite.queue.spool import QueueEntry, Recipient, Spool, entry_to_json, new_queue_id
from tests.unit.queuekit import (ALICE, MailLog, local_route, make_kit, message, read,
                                 started, submit)

CAROL = "carol@remote.example"
PEER = "otherhost.4242"


@pytest.fixture
def mail_log():
    log = MailLog().install()
    yield log
    log.remove()


def dead_peer(queue_dir: str) -> str:
    """A peer that died: its lock file is there, nobody holds the lock."""
    directory = os.path.join(queue_dir, "instances")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, PEER + ".lock")
    open(path, "w").close()
    return path


def test_a_held_lock_is_alive_a_free_one_is_reaped_once(tmp_path):
    ours = Instances(str(tmp_path), "here.1")
    ours.register()
    path = dead_peer(str(tmp_path / ".."))  # not this directory: nothing there yet
    os.rename(path, str(tmp_path / (PEER + ".lock")))
    live = os.open(str(tmp_path / "there.7.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(live, fcntl.LOCK_EX)  # another open file description: another process
    try:
        assert ours.alive("there.7") and not ours.alive(PEER) and ours.alive("here.1")
        assert ours.reap() == [PEER]
        assert ours.reap() == []  # reported once: its lock file is gone
        assert sorted(ours.names()) == ["here.1", "there.7"]
    finally:
        os.close(live)
        ours.unregister()
    assert not os.path.exists(ours.lock_path("here.1"))


def test_a_dead_peers_files_are_taken_over_at_once_not_at_the_next_scan(tmp_path, request,
                                                                          mail_log):
    kit = started(str(tmp_path / "data"), request, scan_interval=300)
    # What the peer left: a staged file, and an entry it had claimed (its claim died with it).
    staged_dir = os.path.join(kit.spool.incoming_root, "otherhost")
    os.makedirs(staged_dir)
    staged = os.path.join(staged_dir, "4242.0123456789abcdef")
    open(staged, "wb").close()
    entry = QueueEntry(new_queue_id(kit.clock.seconds()), CAROL,
                       [Recipient(ALICE, ALICE, True)], kit.clock.seconds())
    Spool(kit.config.queue_dir).store(entry, message("left behind"))
    kit.advance(0.5)
    assert kit.exists(entry.id) and os.path.exists(staged)  # alive, as far as we know
    dead_peer(kit.config.queue_dir)
    kit.advance(1.5)  # one look at the locks, far less than scan_interval
    assert not os.path.exists(staged)
    assert not kit.exists(entry.id)
    [copy] = kit.messages(ALICE)
    assert read(copy).endswith(message("left behind"))
    assert any("status=instance-gone" in line and PEER in line for line in mail_log.lines)


def test_a_copy_another_process_wrote_is_found_though_we_submitted_the_entry(
        tmp_path, monkeypatch, request):
    """We spooled the entry (so we vouch for it); another process claimed it first, wrote the
    copy and died before the envelope update; a reader moved the copy to cur/. Our attempt
    must look, not write a second copy."""
    data_dir = str(tmp_path / "data")
    ours = make_kit(data_dir)
    request.addfinalizer(ours.stop)
    qid = submit(ours, CAROL, [(ALICE, local_route(ALICE))], message("raced"))  # not started

    def killed(*args, **kwargs):
        raise RuntimeError("killed before the envelope update")

    monkeypatch.setattr(Spool, "save", killed)
    monkeypatch.setattr(Spool, "remove", killed)
    other = started(data_dir, request)  # its first scan finds the entry and delivers it
    [copy] = other.messages(ALICE)
    assert ours.exists(qid)
    other.stop()
    monkeypatch.undo()
    maildir = os.path.dirname(os.path.dirname(copy))
    os.rename(copy, os.path.join(maildir, "cur", os.path.basename(copy) + ":2,S"))
    ours.runner.startService()
    ours.advance(0)
    assert not ours.exists(qid)
    assert len(ours.messages(ALICE)) == 1


def test_a_delivery_line_reaches_the_log_before_the_envelope_records_it(
        tmp_path, monkeypatch, request):
    written: list[str] = []
    observer = BufferedLogObserver(lambda e: written.append(formatEvent(e)), task.Clock())
    observer.start()  # buffered, and its own clock never runs: only a flush writes
    globalLogPublisher.addObserver(observer)
    logwriter._ACTIVE.append(observer)
    request.addfinalizer(lambda: (globalLogPublisher.removeObserver(observer),
                                  logwriter._ACTIVE.remove(observer)))
    seen_at_removal: list[str] = []
    real_remove = Spool.remove

    def remove(spool, queue_id):
        seen_at_removal.extend(written)
        return real_remove(spool, queue_id)

    monkeypatch.setattr(Spool, "remove", remove)
    kit = started(str(tmp_path / "data"), request)
    qid = submit(kit, CAROL, [(ALICE, local_route(ALICE))], message("logged"))
    kit.advance(0)
    assert not kit.exists(qid)
    assert any(f"queue_id={qid}" in line and "status=sent" in line
               for line in seen_at_removal), seen_at_removal


def test_spool_time_copies_of_a_dead_process_get_their_log_line(tmp_path, request, mail_log):
    """The peer delivered at spool time and died before its lines were written: its envelope
    beside the staged file names the copies; the one taking over logs those it finds."""
    data_dir = str(tmp_path / "data")
    writer = make_kit(data_dir)
    request.addfinalizer(writer.stop)
    entry = QueueEntry(new_queue_id(writer.clock.seconds()), CAROL,
                       [Recipient(ALICE, ALICE, True)], writer.clock.seconds())
    staged_dir = os.path.join(writer.spool.incoming_root, "otherhost")
    os.makedirs(staged_dir)
    staged = os.path.join(staged_dir, "4242.0123456789abcdef")
    with open(staged, "wb") as f:
        f.write(message("unlogged"))
    with open(staged + ".env", "wb") as f:
        f.write(entry_to_json(entry))
    writer.runner.local.deliver_now(entry, staged)  # the copy, written by "the peer"
    dead_peer(writer.config.queue_dir)
    kit = started(data_dir, request)
    assert os.listdir(staged_dir) == []
    sent = [line for line in mail_log.of(entry.id) if "status=sent" in line]
    assert len(sent) == 1 and "already in maildir" in sent[0], mail_log.of(entry.id)
    assert len(kit.messages(ALICE)) == 1


def test_empty_spool_time_envelope_files_of_a_dead_process_go_without_a_line(
        tmp_path, request, mail_log):
    """A process keeps its spool-time envelope files for reuse, empty between deliveries:
    the one taking over removes those without a cleanup line, and logs the copies a full
    one names."""
    data_dir = str(tmp_path / "data")
    writer = make_kit(data_dir)
    request.addfinalizer(writer.stop)
    entry = QueueEntry(new_queue_id(writer.clock.seconds()), CAROL,
                       [Recipient(ALICE, ALICE, True)], writer.clock.seconds())
    staged_dir = os.path.join(writer.spool.incoming_root, "otherhost")
    os.makedirs(staged_dir)
    for name in ("4242.00000000000000aa.env", "4242.00000000000000bb.env"):
        open(os.path.join(staged_dir, name), "wb").close()
    with open(os.path.join(staged_dir, "4242.00000000000000cc.env"), "wb") as f:
        f.write(entry_to_json(entry, compact=True))
    writer.runner.local.deliver_now(entry, None, message("unlogged"))  # by "the peer"
    dead_peer(writer.config.queue_dir)
    kit = started(data_dir, request)
    assert os.listdir(staged_dir) == []
    sent = [line for line in mail_log.of(entry.id) if "status=sent" in line]
    assert len(sent) == 1 and "already in maildir" in sent[0], mail_log.of(entry.id)
    cleanup = [line for line in mail_log.lines if "status=cleanup" in line]
    assert len(cleanup) == 1 and "00000000000000cc.env" in cleanup[0], cleanup
    assert len(kit.messages(ALICE)) == 1

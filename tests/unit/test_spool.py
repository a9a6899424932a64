"""The spool on real files in tmp_path: durable atomic writes, JSON envelopes, claims within one
process. (Claims between processes: tests/scenario/test_spool_processes.py.)"""
from __future__ import annotations

import fcntl
import json
import os
import time

import pytest

from mailsuite.queue import spool as spool_module
from mailsuite.queue.spool import (QueueEntry, Recipient, Spool, SpoolError, entry_from_json,
                                   entry_to_json, new_queue_id, read_head, valid_queue_id)
from tests.unit.queuekit import spool_files

DATA = b"Received: from x by y\r\nSubject: test\r\n\r\nbody line\r\n.\r\n"


def make_entry(**kw) -> QueueEntry:
    fields = dict(id=new_queue_id(), sender="carol@remote.example",
                  recipients=[Recipient("alice@example.org", "Alice+news@example.org", True),
                              Recipient("dave@far.example", "dave@far.example", False)],
                  created=time.time(), meta={"client_ip": "192.0.2.1", "helo": "x",
                                             "auth_user": None, "protocol": "ESMTPS"})
    fields.update(kw)
    return QueueEntry(**fields)


@pytest.fixture
def spool(tmp_path) -> Spool:
    s = Spool(str(tmp_path / "queue"))
    s.ensure()
    return s


def test_store_and_load_round_trip(spool):
    entry = make_entry()
    spool.store(entry, DATA)
    assert spool.ids() == [entry.id]
    assert spool.load(entry.id) == entry
    with open(spool.message_path(entry.id), "rb") as f:
        assert f.read() == DATA  # byte for byte, CRLF kept
    # Only the two final files: no tmp left behind.
    assert spool_files(spool.directory) == sorted([entry.id + ".eml", entry.id + ".json"])


def test_envelope_is_plain_json(spool):
    entry = make_entry()
    spool.store(entry, DATA)
    with open(spool.envelope_path(entry.id), "rb") as f:
        data = json.load(f)  # not pickle: readable by anything, never executes code
    assert data["version"] == 1
    assert data["sender"] == "carol@remote.example"
    assert data["recipients"][0]["original"] == "Alice+news@example.org"
    assert entry_from_json(entry_to_json(entry)) == entry


def test_store_fsyncs_files_and_directory_before_returning(spool, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    entry = make_entry()
    spool.store(entry, DATA)
    # Both files were fsynced before any name in the spool pointed at them (the message as
    # staged in incoming/, the envelope under its tmp name), then the directory.
    assert any(p.startswith(spool.incoming_dir + "/") for p in synced)
    assert any(p.endswith(".tmp") and f".{entry.id}.json." in p for p in synced)
    assert synced[-1] == spool.directory


def test_save_replaces_envelope_atomically(spool):
    entry = make_entry()
    spool.store(entry, DATA)
    inode = os.stat(spool.envelope_path(entry.id)).st_ino
    entry.recipients[0].state = "sent"
    spool.save(entry)
    assert os.stat(spool.envelope_path(entry.id)).st_ino != inode  # a new file renamed over
    assert spool.load(entry.id).recipients[0].state == "sent"


def test_failed_write_leaves_nothing(spool):
    def chunks():
        yield b"partial data"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        spool_module.write_file_durably(spool.directory, "x.eml", chunks())
    assert spool_files(spool.directory) == []


def test_unknown_and_malformed_ids(spool):
    with pytest.raises(SpoolError, match="no queue entry"):
        spool.load("0123456789abcdef")
    with pytest.raises(SpoolError):
        spool.load("../../etc/passwd")  # never a path outside the spool
    assert not valid_queue_id("../x")
    assert spool.claim("../x") is None


def test_damaged_envelope_is_reported_not_crashing(spool):
    entry = make_entry()
    spool.store(entry, DATA)
    with open(spool.envelope_path(entry.id), "w") as f:
        f.write("{not json")
    with pytest.raises(SpoolError, match="damaged"):
        spool.load(entry.id)
    assert spool.entries() == []


def test_ids_are_unique_and_time_ordered():
    ids = [new_queue_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert all(valid_queue_id(i) for i in ids)
    assert new_queue_id(1000.0) < new_queue_id(2000.0)


def test_remove(spool):
    entry = make_entry()
    spool.store(entry, DATA)
    spool.remove(entry.id)
    assert spool_files(spool.directory) == []
    assert spool.ids() == []


def test_claim_is_exclusive_within_a_process(spool):
    entry = make_entry()
    spool.store(entry, DATA)
    claim = spool.claim(entry.id)
    assert claim is not None
    assert spool.claim(entry.id) is None  # flock is per open file: a second open conflicts
    claim.release()
    again = spool.claim(entry.id)
    assert again is not None
    again.release()


def test_claim_after_removal_by_the_previous_holder_fails(spool):
    entry = make_entry()
    spool.store(entry, DATA)
    first = spool.claim(entry.id)
    # Someone opened the message file before the holder finished (as a racing process would).
    fd = os.open(spool.message_path(entry.id), os.O_RDONLY)
    try:
        spool.remove(entry.id)
        first.release()
        assert spool.claim(entry.id) is None  # gone: no claim, no second delivery
    finally:
        os.close(fd)


def test_cleanup_removes_leftovers_whose_writer_is_gone(spool):
    """A message without envelope or a temporary file is removed at once when no process holds
    its entry's lock (its writer is gone), kept while one does, whatever its age."""
    entry = make_entry()
    spool.store(entry, DATA)
    d = spool.directory
    gone, writing = "6b0a0000000000000000a", "6b0a0000000000000000b"
    for name in (f".{gone}.json.1234.tmp", f".{writing}.json.5678.tmp", gone + ".eml",
                 writing + ".eml"):
        with open(os.path.join(d, name), "wb") as f:
            f.write(b"x")
    os.utime(spool.message_path(entry.id), (0, 0))  # old, but has its envelope: kept
    fd = os.open(os.path.join(d, writing + ".eml"), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a writer at work (store_file holds this)
        removed = spool.cleanup()
        assert sorted(removed) == [f".{gone}.json.1234.tmp", gone + ".eml"]
        assert spool.load(entry.id) == entry
        assert os.path.exists(os.path.join(d, f".{writing}.json.5678.tmp"))
        assert os.path.exists(os.path.join(d, writing + ".eml"))
    finally:
        os.close(fd)
    assert sorted(spool.cleanup()) == [f".{writing}.json.5678.tmp", writing + ".eml"]


def test_kick_changes_mtime(spool):
    assert spool.kick_mtime() == 0
    spool.kick()
    first = spool.kick_mtime()
    assert first != 0
    old = time.time() - 60  # an earlier kick, without waiting for the clock to move
    os.utime(spool.kick_path, (old, old))
    before = spool.kick_mtime()
    spool.kick()
    assert spool.kick_mtime() != before


@pytest.mark.parametrize("content, limit, head", [
    (b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore\r\n", 1024, b"A: 1\r\nB: 2\r\n"),
    (b"A: 1\r\nB: 2\r\n", 1024, b"A: 1\r\nB: 2\r\n"),  # all header, no body
    (b"A: 1\r\n" * 100 + b"\r\nbody\r\n", 60, (b"A: 1\r\n" * 100)[:60]),  # cut at the limit
    (b"\r\n\r\nbody\r\n", 1024, b"\r\n"),
    (b"", 1024, b""),
])
def test_read_head_is_the_header_section_within_the_limit(tmp_path, content, limit, head):
    path = tmp_path / "m"
    path.write_bytes(content)
    assert read_head(str(path), limit) == head


def test_the_compact_envelope_reads_back_the_same_and_meta_dataclasses_become_objects():
    from dataclasses import asdict

    from mailsuite.queue.spool import ENVELOPE_VERSION, DeliveryResult

    entry = make_entry()
    entry.meta.update({"verdicts": {"spf": "pass"}, "flags": ("$Junk",),
                       "result": DeliveryResult("a@b", "sent", "250 ok"), "when": 1.5})
    entry.bounce_pending = [0]
    # The spool's envelope file: the same text asdict gave before.
    assert entry_to_json(entry) == json.dumps({"version": ENVELOPE_VERSION, **asdict(entry)},
                                              indent=1, default=str).encode()
    compact = entry_to_json(entry, compact=True)
    assert b"\n" not in compact and json.loads(compact) == json.loads(entry_to_json(entry))
    assert entry_from_json(compact) == entry_from_json(entry_to_json(entry))


def test_read_head_finds_a_header_section_longer_than_one_read(tmp_path):
    from mailsuite.queue.spool import head_of, read_head

    header = b"".join(b"Received: from h%d\r\n" % i for i in range(3000))  # about 60 KiB
    message = header + b"\r\n" + b"x" * 100_000
    path = tmp_path / "m"
    path.write_bytes(message)
    assert read_head(str(path)) == header == head_of(message)
    assert read_head(str(path), limit=1000) == message[:1000] == head_of(message, 1000)

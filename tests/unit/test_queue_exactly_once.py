"""Local delivery happens once per (queue id, recipient), whatever crash comes between writing a
copy into the Maildir and recording it in the envelope (docs/design/queue.md, "Exactly once").

The crash is injected: Spool.save/remove raise `Crash` (the process "dies" after the rename into
new/ and before the envelope update), then a fresh runner on the same directories plays the
restarted process. The end-to-end kill -9 is tests/scenario/test_crash.py.
"""
from __future__ import annotations

import errno
import os

import pytest

from mailsuite import safeio as safeio_module
from mailsuite.mailbox import maildir as maildir_module
from mailsuite.queue.spool import Spool
from tests.unit.queuekit import (ALICE, BOB, Kit, MailLog, local_route, message, read,
                                 started, submit)

CAROL = "carol@remote.example"


class Crash(Exception):
    """The process dies here: nothing after this point happens."""


@pytest.fixture
def mail_log():
    log = MailLog().install()
    yield log
    log.remove()


def crash_before_envelope_update(monkeypatch) -> None:
    def crash(*args, **kwargs):
        raise Crash("killed before the envelope was updated")
    monkeypatch.setattr(Spool, "save", crash)
    monkeypatch.setattr(Spool, "remove", crash)


def restart(kit: Kit, monkeypatch, request) -> Kit:
    """The dead process is gone; a new one starts on the same spool and Maildirs."""
    kit.stop()
    monkeypatch.undo()
    return started(os.path.dirname(kit.config.queue_dir), request)


def test_crash_after_rename_then_restart_delivers_once(tmp_path, monkeypatch, request, mail_log):
    kit = started(str(tmp_path / "data"), request)
    crash_before_envelope_update(monkeypatch)
    qid = submit(kit, CAROL, [(ALICE, local_route(ALICE))], message("once"))
    kit.advance(0)
    [first] = kit.messages(ALICE)  # written, renamed into new/ ...
    assert kit.spool.load(qid).recipients[0].attempts == 0  # ... and not recorded
    kit = restart(kit, monkeypatch, request)
    assert kit.messages(ALICE) == [first]
    assert read(first).endswith(message("once"))
    assert not kit.exists(qid)
    # The dead attempt logged its delivery; the restarted one says it found that copy.
    sent = [line for line in mail_log.of(qid) if "status=sent" in line]
    assert len(sent) == 2 and "already in maildir" in sent[-1], sent


def test_copy_moved_to_cur_by_a_reader_is_found(tmp_path, monkeypatch, request):
    """An IMAP client saw (and flagged) the copy before the restarted queue got to it."""
    kit = started(str(tmp_path / "data"), request)
    crash_before_envelope_update(monkeypatch)
    submit(kit, CAROL, [(ALICE, local_route(ALICE))], message("seen"))
    kit.advance(0)
    [first] = kit.messages(ALICE)
    maildir = os.path.dirname(os.path.dirname(first))
    seen = os.path.join(maildir, "cur", os.path.basename(first) + ":2,S")
    os.rename(first, seen)
    kit = restart(kit, monkeypatch, request)
    assert kit.messages(ALICE) == [seen]


def test_crash_between_two_recipients(tmp_path, monkeypatch, request):
    """The first recipient's copy is durable, the second's rename is not yet fsynced."""
    kit = started(str(tmp_path / "data"), request)
    crash_before_envelope_update(monkeypatch)
    calls = []
    real = maildir_module.fsync_dir

    def fsync_dir(path):
        calls.append(path)
        if len(calls) == 2:
            raise Crash("killed after the second rename")
        real(path)
    monkeypatch.setattr(maildir_module, "fsync_dir", fsync_dir)
    qid = submit(kit, CAROL, [(ALICE, local_route(ALICE)), (BOB, local_route(BOB))],
                 message("two"))
    kit.advance(0)
    assert len(kit.messages(ALICE)) == len(kit.messages(BOB)) == 1
    kit = restart(kit, monkeypatch, request)
    assert len(kit.messages(ALICE)) == len(kit.messages(BOB)) == 1
    assert not kit.exists(qid)


def test_same_process_envelope_write_fails_then_retry_finds_the_copy(tmp_path, monkeypatch,
                                                                     request, mail_log):
    """Disk full on the envelope after the Maildir write: one log line, and the retry by the
    same process (which now cannot vouch for the entry) does not deliver again."""
    kit = started(str(tmp_path / "data"), request, scan_interval=1)
    real_remove = Spool.remove
    failures = []

    def remove(self, queue_id):
        if not failures:
            failures.append(queue_id)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_remove(self, queue_id)
    monkeypatch.setattr(Spool, "remove", remove)
    qid = submit(kit, CAROL, [(ALICE, local_route(ALICE))], message("enospc"))
    kit.advance(0)
    [first] = kit.messages(ALICE)
    os.rename(first, first.replace("/new/", "/cur/") + ":2,")
    assert kit.exists(qid)
    kit.advance(1.5)
    assert len(kit.messages(ALICE)) == 1
    assert not kit.exists(qid)
    assert mail_log.errors == []
    [fault] = [line for line in mail_log.of(qid) if "status=retry-later" in line]
    assert "No space left on device (ENOSPC)" in fault


def test_the_normal_path_lists_no_directory(tmp_path, monkeypatch, request):
    """Entries submitted by this process are delivered without looking at new/ or cur/."""
    kit = started(str(tmp_path / "data"), request)
    listed = []
    real = os.listdir
    monkeypatch.setattr(maildir_module.os, "listdir",
                        lambda path=".": listed.append(path) or real(path))
    for i in range(3):
        submit(kit, CAROL, [(ALICE, local_route(ALICE))], message(f"n{i}"))
    kit.advance(0)
    assert [p for p in listed if "/mail/" in str(p)] == []
    assert len(kit.messages(ALICE)) == 3


def test_names_are_fixed_by_queue_id_and_recipient(tmp_path, request):
    kit = started(str(tmp_path / "data"), request)
    qid = submit(kit, CAROL, [(ALICE, local_route(ALICE)), (BOB, local_route(BOB))],
                 message("names"))
    kit.advance(0)
    [a] = kit.messages(ALICE)
    [b] = kit.messages(BOB)
    assert f"Q{qid}N0." in os.path.basename(a)
    assert f"Q{qid}N1." in os.path.basename(b)
    assert os.path.basename(a).endswith(f",S={os.path.getsize(a)}")


def test_deliver_once_replaces_a_leftover_tmp_file(tmp_path, monkeypatch):
    """Where the filesystem has no unnamed files, a copy is written in tmp/ and renamed."""
    from mailsuite import safeio
    monkeypatch.setattr(safeio, "_unnamed_refused", True)
    src = tmp_path / "m.eml"
    src.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    maildir = str(tmp_path / "md")
    marker = maildir_module.delivery_marker(1_800_000_000.25, "Qabc123N0")
    maildir_module.make_maildir(maildir)
    leftover = os.path.join(maildir, "tmp", f"{marker}h,S=26")
    with open(leftover, "wb") as f:
        f.write(b"half")
    path, written = maildir_module.deliver_once(maildir, b"X: 1\r\n", str(src),
                                                when=1_800_000_000.25, unique="Qabc123N0",
                                                hostname="h")
    assert written and os.path.basename(path) == f"{marker}h,S=26"
    assert read(path) == b"X: 1\r\nSubject: x\r\n\r\nbody\r\n"
    assert os.listdir(os.path.join(maildir, "tmp")) == []
    again, written = maildir_module.deliver_once(maildir, b"X: 1\r\n", str(src),
                                                 when=1_800_000_000.25, unique="Qabc123N0",
                                                 hostname="other", recheck=True)
    assert (again, written) == (path, False)



needs_unnamed = pytest.mark.skipif(safeio_module._linkat is None,
                                   reason="no O_TMPFILE or /proc on this system")


@needs_unnamed
def test_deliver_once_writes_no_name_until_the_copy_is_complete(tmp_path, monkeypatch):
    """The copy is written unnamed in new/ and linked there after its fsync: an attempt that
    fails before (a crash) leaves nothing in tmp/ or new/."""
    src = tmp_path / "m.eml"
    src.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    maildir = str(tmp_path / "md")
    seen: list[list[str]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        seen.append([name for sub in ("new", "tmp")
                     for name in os.listdir(os.path.join(maildir, sub))])
        real_fsync(fd)

    monkeypatch.setattr(maildir_module.os, "fsync", fsync)
    monkeypatch.setattr(safeio_module, "link_unnamed",
                        lambda fd, path: (_ for _ in ()).throw(OSError(errno.EIO, "crash")))
    with pytest.raises(OSError):
        maildir_module.deliver_once(maildir, b"X: 1\r\n", str(src), when=1_800_000_000.25,
                                    unique="Qabc123N0", hostname="h")
    assert seen == [[]]  # the message's fsync happened with no name anywhere
    assert os.listdir(os.path.join(maildir, "new")) == []
    assert os.listdir(os.path.join(maildir, "tmp")) == []


@needs_unnamed
def test_deliver_once_keeps_the_complete_copy_of_a_crashed_attempt(tmp_path):
    """A name in new/ is only ever given to a complete file, so the same delivery finding its
    name taken keeps that copy (replacing it by the same bytes would change nothing)."""
    src = tmp_path / "m.eml"
    src.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    maildir = str(tmp_path / "md")
    kw = dict(when=1_800_000_000.25, unique="Qabc123N0", hostname="h")
    first, _ = maildir_module.deliver_once(maildir, b"X: 1\r\n", str(src), **kw)
    inode = os.stat(first).st_ino
    again, written = maildir_module.deliver_once(maildir, b"X: 1\r\n", str(src), **kw)
    assert (again, written) == (first, True)
    assert os.stat(again).st_ino == inode
    assert read(again) == b"X: 1\r\nSubject: x\r\n\r\nbody\r\n"
    assert sorted(os.listdir(os.path.join(maildir, "new"))) == [os.path.basename(first)]
    assert os.listdir(os.path.join(maildir, "tmp")) == []


@needs_unnamed
def test_a_fresh_delivery_never_replaces_a_taken_name(tmp_path, monkeypatch):
    """`deliver` picks another name when its first is taken, with or without unnamed files."""
    names = iter(["1.M1P1.h,S=9", "1.M1P1.h,S=9", "1.M2P1.h,S=9"])
    monkeypatch.setattr(maildir_module, "unique_key", lambda size, hostname=None: next(names))
    maildir = str(tmp_path / "md")
    a = maildir_module.deliver(maildir, b"", data=b"first\r\n\r\n")
    b = maildir_module.deliver(maildir, b"", data=b"second\r\n")
    assert os.path.basename(a) == "1.M1P1.h,S=9" and os.path.basename(b) == "1.M2P1.h,S=9"
    assert read(a) == b"first\r\n\r\n"

def test_a_maildir_is_made_once_and_again_when_it_was_removed(tmp_path, monkeypatch):
    """The second delivery into a Maildir skips make_maildir; one removed meanwhile (with
    its tmp/ or new/) is made again and the copy written, not lost."""
    import shutil

    src = tmp_path / "m.eml"
    src.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    maildir = str(tmp_path / "made-once")
    made: list[str] = []
    real = maildir_module.make_maildir
    monkeypatch.setattr(maildir_module, "make_maildir",
                        lambda path, subfolder=False: made.append(path) or real(path, subfolder))

    def deliver(n: int, **kw) -> str:
        path, written = maildir_module.deliver_once(maildir, b"X: 1\r\n", str(src),
                                                    when=1_800_000_000.0, unique=f"Qm{n}N0",
                                                    hostname="h", **kw)
        assert written and read(path) == b"X: 1\r\nSubject: x\r\n\r\nbody\r\n"
        return path

    deliver(1)
    deliver(2)
    assert made == [maildir]
    shutil.rmtree(os.path.join(maildir, "new"))
    assert os.path.dirname(deliver(3)) == os.path.join(maildir, "new")
    shutil.rmtree(maildir)
    deliver(4)
    assert made == [maildir] * 3
    assert deliver(5, letters="a").endswith(":2,a")  # into cur/, still made
    assert sorted(os.listdir(os.path.join(maildir, "tmp"))) == []


# -- delivery at spool time (docs/design/queue.md, "Delivery at spool time") -------------------
def submit_staged(kit: Kit, recipients, data: bytes) -> str:
    """What the SMTP server does at the end of DATA: a staged file handed to submit_file."""
    directory = kit.spool.ensure_incoming()
    path = os.path.join(directory, f"{os.getpid()}.{os.urandom(8).hex()}")
    with open(path, "wb") as f:
        f.write(data)
    seen: list = []
    kit.runner.submit_file(CAROL, recipients, path, len(data), {}).addBoth(seen.append)
    [value] = seen
    if not isinstance(value, str):
        value.raiseException()
    return value


def test_spool_time_copies_recorded_in_the_envelope_are_not_written_again(tmp_path, monkeypatch,
                                                                          request):
    """Bob's Maildir fails at spool time: the entry is spooled with Alice's copy recorded as
    sent; the process dies before any attempt; the next one delivers Bob only."""
    from tests.unit.queuekit import break_maildir

    kit = started(str(tmp_path / "data"), request)
    broken = break_maildir(kit.store, BOB)
    qid = submit_staged(kit, [(ALICE, local_route(ALICE)), (BOB, local_route(BOB))],
                        message("split"))
    [alice_copy] = kit.messages(ALICE)
    assert [r.state for r in kit.spool.load(qid).recipients] == ["sent", "pending"]
    kit.stop()  # dies before its attempt
    os.unlink(os.path.join(broken, "new"))
    os.makedirs(os.path.join(broken, "new"))
    kit = started(os.path.dirname(kit.config.queue_dir), request)
    assert kit.messages(ALICE) == [alice_copy]
    [bob_copy] = kit.messages(BOB)
    assert read(bob_copy).endswith(message("split"))
    assert not kit.exists(qid)


def test_a_crash_before_the_commit_acknowledges_nothing_and_spools_nothing(tmp_path, monkeypatch,
                                                                           request):
    """Killed between writing the copies and their directory fsync: no 250 was sent, and no
    spool entry exists that a restart could deliver a second time beside the client's retry."""
    kit = started(str(tmp_path / "data"), request)

    def crash(directory: str) -> None:
        raise Crash("killed before the directory fsync")

    monkeypatch.setattr(kit.runner.group, "_sync", crash)
    with pytest.raises(Crash):
        submit_staged(kit, [(ALICE, local_route(ALICE))], message("never acked"))
    kit = restart(kit, monkeypatch, request)
    assert kit.spool.ids() == []

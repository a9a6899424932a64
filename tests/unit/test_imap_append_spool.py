"""IMAP in memory: APPEND literals over `[imap] append_spool_threshold` go to a file in the
account's tmp/ as they arrive, reading pauses while the disk is behind, and disk faults give
NO [OVERQUOTA] / NO [UNAVAILABLE] in one log line (docs/design/imap.md, "Lines and literals")."""
from __future__ import annotations

import errno
import os

from twisted.internet import defer
from twisted.logger import capturedLogs

from mailsuite.mailbox.store import Folder
from tests.unit.imapkit import simple, tagged, world  # noqa: F401


class QueuedPool:
    """A WorkPool whose calls wait until the test runs them (a slow disk)."""

    def __init__(self) -> None:
        self.calls: list[tuple[defer.Deferred, object, tuple, dict]] = []

    def run(self, fn, *args, **kwargs) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((d, fn, args, kwargs))
        return d

    def drain(self) -> None:
        while self.calls:
            d, fn, args, kwargs = self.calls.pop(0)
            defer.maybeDeferred(fn, *args, **kwargs).chainDeferred(d)


def _tmp_files(world) -> list[str]:
    tmp = os.path.join(world.maildir("alice@example.org"), "tmp")
    return [n for n in os.listdir(tmp)] if os.path.isdir(tmp) else []


def test_big_append_goes_through_a_file_not_memory(world):
    world.config.imap.append_spool_threshold = 4096
    c = world.connect()
    msg = simple("spooled", body="line of text\r\n" * 40000)  # ~560 KiB
    c.send(b"a APPEND INBOX {%d}\r\n" % len(msg))
    assert c.line().startswith(b"+")
    for i in range(0, len(msg) - 1000, 65536):
        c.send(msg[i:min(i + 65536, len(msg) - 1000)])
        assert len(c.proto.literal_buf) == 0
        assert c.proto.spool is not None and len(c.proto.spool.buffer) < 65536
    assert [n for n in _tmp_files(world) if n.startswith("imap-append.")]
    c.send(msg[len(msg) - 1000:] + b"\r\n")
    assert tagged(c.response(b"a")).startswith(b"a OK [APPENDUID")
    files = world.messages("alice@example.org")
    assert len(files) == 1 and open(files[0], "rb").read() == msg
    assert _tmp_files(world) == []


def test_reading_pauses_while_the_disk_is_behind(world):
    world.config.imap.append_spool_threshold = 4096
    c = world.connect()
    pool = QueuedPool()
    c.proto.pool = pool
    msg = simple("slow disk", body="y" * (900 * 1024) + "\r\n")
    c.send(b"a APPEND INBOX {%d+}\r\n" % len(msg) + msg[:600 * 1024])
    assert c.proto.paused  # more than the spool's buffer is waiting for the disk
    held = len(c.proto.spool.buffer) + c.proto.spool.in_flight
    assert held <= 600 * 1024
    pool.drain()
    assert not c.proto.paused
    c.send(msg[600 * 1024:] + b"\r\n")
    for _ in range(50):
        pool.drain()
        c.clock.advance(0)
    assert tagged(c.response(b"a")).startswith(b"a OK [APPENDUID")
    assert open(world.messages("alice@example.org")[0], "rb").read() == msg
    pool.drain()
    assert _tmp_files(world) == []


def test_connection_lost_mid_spooled_append_leaves_nothing(world):
    world.config.imap.append_spool_threshold = 4096
    c = world.connect()
    msg = simple("lost", body="z" * 300000 + "\r\n")
    c.send(b"a APPEND INBOX {%d+}\r\n" % len(msg) + msg[:200000])
    c.close()
    assert _tmp_files(world) == []
    assert world.messages("alice@example.org") == []


def _full_disk(err: int):
    def append_many(self, items, check=None, then=None):
        raise OSError(err, os.strerror(err))
    return append_many


def test_append_on_a_full_disk_is_overquota_in_one_line(world, monkeypatch):
    monkeypatch.setattr(Folder, "append_many", _full_disk(errno.ENOSPC))
    c = world.connect()
    msg = simple("full")
    with capturedLogs() as events:
        resp = c.cmd(b"a APPEND INBOX {%d+}\r\n" % len(msg) + msg)
    assert tagged(resp).startswith(b"a NO [OVERQUOTA]"), resp
    assert not [e for e in events if e.get("log_failure")]
    assert len([e for e in events if "failed" in e["log_format"]]) == 1
    assert tagged(c.cmd(b"b NOOP")).startswith(b"b OK")


def test_spooled_append_on_a_full_disk(world, monkeypatch):
    world.config.imap.append_spool_threshold = 4096
    c = world.connect()
    from mailsuite.imap import spool

    def full(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(spool.LiteralSpool, "_open", full)
    msg = simple("full", body="q" * 100000 + "\r\n")
    with capturedLogs() as events:
        resp = c.cmd(b"a APPEND INBOX {%d+}\r\n" % len(msg) + msg)
    assert tagged(resp).startswith(b"a NO [OVERQUOTA]"), resp
    assert not [e for e in events if e.get("log_failure")]


def test_other_store_errors_are_unavailable(world, monkeypatch):
    monkeypatch.setattr(Folder, "append_many", _full_disk(errno.EIO))
    c = world.connect()
    msg = simple("eio")
    with capturedLogs() as events:
        resp = c.cmd(b"a APPEND INBOX {%d+}\r\n" % len(msg) + msg)
    assert tagged(resp).startswith(b"a NO [UNAVAILABLE]"), resp
    assert not [e for e in events if e.get("log_failure")]


def test_store_unavailable_on_opening_a_folder_is_a_temporary_no(world, monkeypatch):
    """The store's StoreUnavailable is a MailboxError too: it must still answer UNAVAILABLE,
    not the NONEXISTENT/TRYCREATE a missing folder gets."""
    from mailsuite.mailbox.store import Account, StoreUnavailable

    def broken(self, name):
        raise StoreUnavailable(errno.EIO, "Input/output error")
    monkeypatch.setattr(Account, "folder", broken)
    c = world.connect()
    with capturedLogs() as events:
        for tag, command in ((b"a", b"a SELECT INBOX"), (b"b", b"b STATUS INBOX (MESSAGES)"),
                             (b"c", b"c APPEND INBOX {2+}\r\nhi")):
            resp = c.cmd(command)
            assert tagged(resp).startswith(tag + b" NO [UNAVAILABLE]"), resp
    assert not [e for e in events if e.get("log_failure")]


# -- keywords: a Maildir folder holds 26 ---------------------------------------------------------

def test_keywords_beyond_the_folders_room_are_refused(world):
    world.append("alice@example.org", "", simple("kw"))
    c = world.connect()
    resp = c.cmd(b"s SELECT INBOX")
    assert any(b"PERMANENTFLAGS" in line and b"\\*" in line for line in resp)
    kws = b" ".join(b"$k%d" % i for i in range(26))
    assert tagged(c.cmd(b"a STORE 1 +FLAGS (" + kws + b")")).startswith(b"a OK")
    resp = c.cmd(b"b STORE 1 +FLAGS ($k26)")
    assert tagged(resp).startswith(b"b NO [LIMIT]"), resp
    # Known keywords and system flags still work.
    assert tagged(c.cmd(b"c STORE 1 FLAGS (\\Seen $k3)")).startswith(b"c OK")
    assert tagged(c.cmd(b"d STORE 1 -FLAGS ($k3)")).startswith(b"d OK")
    msg = simple("kw2")
    resp = c.cmd(b"e APPEND INBOX ($new) {%d+}\r\n" % len(msg) + msg)
    assert tagged(resp).startswith(b"e NO [LIMIT]"), resp
    resp = c.cmd(b"f APPEND INBOX ($k1) {%d+}\r\n" % len(msg) + msg)
    assert tagged(resp).startswith(b"f OK")
    resp = c.cmd(b"g SELECT INBOX")
    perm = [line for line in resp if b"PERMANENTFLAGS" in line]
    assert perm and b"\\*" not in perm[0], perm


def test_copy_and_move_into_a_full_folder_refuse_keywords_it_cannot_hold(world):
    """A copy keeps its keywords: a destination without room gets NO [LIMIT], never a silent
    drop (and nothing is copied or moved)."""
    world.append("alice@example.org", "", simple("source"))
    world.append("alice@example.org", "Archive", simple("full"))
    c = world.connect()
    c.cmd(b"s SELECT Archive")
    kws = b" ".join(b"$k%d" % i for i in range(26))
    assert tagged(c.cmd(b"a STORE 1 +FLAGS (" + kws + b")")).startswith(b"a OK")
    c.cmd(b"t SELECT INBOX")
    assert tagged(c.cmd(b"b STORE 1 +FLAGS ($other)")).startswith(b"b OK")
    assert tagged(c.cmd(b"c COPY 1 Archive")).startswith(b"c NO [LIMIT]")
    assert tagged(c.cmd(b"d MOVE 1 Archive")).startswith(b"d NO [LIMIT]")
    assert tagged(c.cmd(b"e STORE 1 FLAGS ($k5)")).startswith(b"e OK")  # a known keyword
    assert tagged(c.cmd(b"f COPY 1 Archive")).startswith(b"f OK [COPYUID")
    resp = c.cmd(b"g STATUS Archive (MESSAGES)")
    assert any(b"MESSAGES 2" in line for line in resp), resp

"""The Maildir writer (mailsuite.mailbox) and the local delivery agent, on real files in
tmp_path, in this process. (Several writer processes: tests/scenario/test_maildir_processes.py.)"""
from __future__ import annotations

import errno
import os
import re
import threading

import pytest

from mailsuite import safeio
from mailsuite.delivery.local import LocalAgent, trace_headers
from mailsuite.mailbox.maildir import deliver as deliver_to_maildir
from mailsuite.mailbox.maildir import make_maildir as ensure_maildir
from mailsuite.mailbox.maildir import unique_key
from mailsuite.mailbox.store import MailStore
from mailsuite.pools import InlinePool
from mailsuite.queue.spool import QueueEntry, Recipient

NAME_RE = re.compile(r"^(\d+)\.M(\d{6})P(\d+)Q(\d+)R[0-9a-f]{8}\.([^/:]+),S=(\d+)$")
# A queue delivery's name is fixed by the entry: <created sec>.M<usec>Q<queue id>N<index>.
QUEUE_NAME_RE = re.compile(r"^(\d+)\.M(\d{6})Q([0-9a-f]+)N(\d+)\.([^/:]+),S=(\d+)$")
HEADER = b"Return-Path: <carol@remote.example>\r\nDelivered-To: alice@example.org\r\n"
BODY = b"Subject: test\r\n\r\nline one\r\nline two\r\n"


def test_delivery_writes_header_and_message_into_new(tmp_path):
    src = tmp_path / "msg.eml"
    src.write_bytes(BODY)
    maildir = str(tmp_path / "mail" / "example.org" / "alice")
    path = deliver_to_maildir(maildir, HEADER, message_path=str(src), hostname="mx.example")
    assert os.path.dirname(path) == os.path.join(maildir, "new")
    with open(path, "rb") as f:
        assert f.read() == HEADER + BODY
    m = NAME_RE.match(os.path.basename(path))
    assert m, path
    assert int(m.group(3)) == os.getpid()
    assert m.group(5) == "mx.example"
    assert int(m.group(6)) == os.path.getsize(path)  # S= is the final file size
    for sub in ("cur", "new", "tmp"):
        st = os.stat(os.path.join(maildir, sub))
        assert st.st_mode & 0o777 == 0o700
    assert os.listdir(os.path.join(maildir, "tmp")) == []


def test_delivery_from_bytes(tmp_path):
    path = deliver_to_maildir(str(tmp_path / "md"), HEADER, data=BODY)
    with open(path, "rb") as f:
        assert f.read() == HEADER + BODY


def test_hostname_is_escaped():
    name = unique_key(10, "bad/host:name")
    assert "/" not in name and ":" not in name
    assert r"bad\057host\072name" in name


@pytest.mark.parametrize("unnamed", [True, False], ids=["unnamed", "tmp-rename"])
def test_delivery_fsyncs_file_before_naming_it_and_new_dir_after(tmp_path, monkeypatch,
                                                                 unnamed):
    if unnamed and safeio._linkat is None:
        pytest.skip("no O_TMPFILE or /proc on this system")
    monkeypatch.setattr(safeio, "_unnamed_refused", not unnamed)
    events: list[str] = []
    real_fsync, real_rename, real_link = os.fsync, os.rename, safeio.link_unnamed

    def fsync(fd):
        events.append("fsync " + os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def rename(a, b):
        events.append(f"rename {a}")
        return real_rename(a, b)

    def link(fd, path):
        events.append(f"link {path}")
        return real_link(fd, path)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(safeio, "link_unnamed", link)
    maildir = str(tmp_path / "md")
    path = deliver_to_maildir(maildir, HEADER, data=BODY)
    name = os.path.basename(path)
    new = os.path.join(maildir, "new")
    if unnamed:  # an inode of new/ without a name until it is complete
        assert events[0].startswith(f"fsync {new}/#") and events[0].endswith(" (deleted)")
        assert events[1:] == [f"link {path}", f"fsync {new}"]
    else:
        tmp = os.path.join(maildir, "tmp", name)
        assert events == [f"fsync {tmp}", f"rename {tmp}", f"fsync {new}"]


def test_broken_maildir_fails_and_leaves_nothing(tmp_path):
    maildir = tmp_path / "md"
    ensure_maildir(str(maildir))
    os.rmdir(maildir / "new")
    (maildir / "new").write_bytes(b"")  # a FILE where new/ should be: root cannot write into it
    with pytest.raises(OSError):
        deliver_to_maildir(str(maildir), HEADER, data=BODY)
    assert os.listdir(maildir / "tmp") == []


def test_failure_after_tmp_created_cleans_tmp(tmp_path):
    maildir = tmp_path / "md"
    ensure_maildir(str(maildir))
    bad_source = tmp_path / "a-directory"
    bad_source.mkdir()
    with pytest.raises(OSError):
        # getsize works on a directory, open() for reading it fails after tmp/ has a file.
        deliver_to_maildir(str(maildir), HEADER, message_path=str(bad_source))
    assert os.listdir(maildir / "tmp") == []
    assert os.listdir(maildir / "new") == []


def test_disk_full_during_write_leaves_nothing(tmp_path, monkeypatch):
    """A short write and then EFBIG, as a file size limit (or a full disk) gives."""
    maildir = str(tmp_path / "md")
    ensure_maildir(maildir)
    real_write = os.write
    budget = [4096]

    def write(fd, data):
        if budget[0] <= 0:
            raise OSError(errno.EFBIG, "File too large")
        n = real_write(fd, bytes(data[:budget[0]]))
        budget[0] -= n
        return n
    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OSError) as raised:
        deliver_to_maildir(maildir, HEADER, data=b"x" * 100_000)
    assert raised.value.errno == errno.EFBIG
    assert os.listdir(os.path.join(maildir, "tmp")) == []
    assert os.listdir(os.path.join(maildir, "new")) == []


def test_names_unique_across_threads(tmp_path):
    maildir = str(tmp_path / "md")
    paths: list[str] = []
    lock = threading.Lock()

    def worker():
        mine = [deliver_to_maildir(maildir, HEADER, data=BODY) for _ in range(100)]
        with lock:
            paths.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(paths) == 800
    assert len(set(os.listdir(os.path.join(maildir, "new")))) == 800


def test_no_partial_file_is_ever_visible_in_new(tmp_path):
    """A reader polling new/ during large concurrent deliveries only ever sees complete files."""
    maildir = str(tmp_path / "md")
    ensure_maildir(maildir)
    new = os.path.join(maildir, "new")
    big = b"Subject: big\r\n\r\n" + b"0123456789abcdef" * 64 * 1024  # 1 MiB
    reading, stop = threading.Event(), threading.Event()
    seen: dict[str, int] = {}
    bad: list[str] = []

    def reader():
        # From before the first write until after the last: a loaded machine may not schedule
        # this thread while the writers run, so the last look comes after they are done.
        while True:
            last = stop.is_set()
            for name in os.listdir(new):
                if name in seen:
                    continue
                size = os.path.getsize(os.path.join(new, name))
                seen[name] = size
                expected = int(NAME_RE.match(name).group(6))
                if size != expected:
                    bad.append(f"{name}: {size} != {expected}")
            reading.set()
            if last:
                return

    def writer():
        reading.wait()
        for _ in range(5):
            deliver_to_maildir(maildir, HEADER, data=big)

    r = threading.Thread(target=reader)
    r.start()
    writers = [threading.Thread(target=writer) for _ in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    r.join()
    assert bad == []
    assert len(os.listdir(new)) == 20
    assert len(seen) == 20


# -- the local delivery agent -------------------------------------------------------------------
def deliver_with_agent(tmp_path, entry, src) -> list:
    store = MailStore(str(tmp_path / "mail"))
    results: list = []
    LocalAgent(store, InlinePool(), "mx.test.example").deliver(
        entry, entry.recipients, str(src)).addCallback(results.extend)
    return results


def test_agent_prepends_return_path_and_delivered_to(tmp_path):
    src = tmp_path / "m.eml"
    src.write_bytes(BODY)
    entry = QueueEntry("6b0a0000000000000000a", "carol@remote.example",
                       [Recipient("alice@example.org", "Alice+x@Example.org", True)], 0.0)
    [result] = deliver_with_agent(tmp_path, entry, src)
    assert result.status == "sent"
    assert result.detail.startswith("250 2.0.0")
    maildir = MailStore(str(tmp_path / "mail")).account("alice@example.org").path
    assert maildir == str(tmp_path / "mail" / "example.org" / "alice")
    [name] = os.listdir(os.path.join(maildir, "new"))
    assert QUEUE_NAME_RE.match(name).group(5) == "mx.test.example"
    with open(os.path.join(maildir, "new", name), "rb") as f:
        assert f.read() == (b"Return-Path: <carol@remote.example>\r\n"
                            b"Delivered-To: alice@example.org\r\n" + BODY)


def test_agent_defers_on_broken_maildir(tmp_path):
    maildir = MailStore(str(tmp_path / "mail")).account("alice@example.org").path
    os.makedirs(maildir)
    with open(os.path.join(maildir, "new"), "w"):
        pass
    src = tmp_path / "m.eml"
    src.write_bytes(BODY)
    entry = QueueEntry("6b0a0000000000000000a", "", [Recipient("alice@example.org", "a", True)], 0)
    [result] = deliver_with_agent(tmp_path, entry, src)
    assert result.status == "deferred"
    assert result.detail.startswith("451 4.3.0 cannot write Maildir")


def test_agent_defers_an_address_the_store_refuses(tmp_path):
    src = tmp_path / "m.eml"
    src.write_bytes(BODY)
    entry = QueueEntry("6b0a0000000000000000a", "", [Recipient("../x@example.org", "a", True)], 0)
    [result] = deliver_with_agent(tmp_path, entry, src)
    assert (result.status, result.enhanced) == ("deferred", "4.3.0")
    assert not os.path.exists(tmp_path / "x")


def test_null_sender_return_path_and_header_injection():
    assert trace_headers("", "bob@example.org") == (b"Return-Path: <>\r\n"
                                                    b"Delivered-To: bob@example.org\r\n")
    assert b"\nX-Evil" not in trace_headers("a\r\nX-Evil: 1@x", "bob@example.org")


def test_agent_files_a_quarantined_message_in_junk_with_its_keyword(tmp_path):
    """A trust verdict of "junk" (docs/design/trust.md) travels in the entry's meta: the copy
    lands in the Junk folder, already flagged $Junk, and IMAP sees the keyword."""
    src = tmp_path / "msg.eml"
    src.write_bytes(BODY)
    entry = QueueEntry("6b0a0000000000000000b", "carol@remote.example",
                       [Recipient("alice@example.org", "alice@example.org", True)], 0.0,
                       meta={"folder": "Junk", "flags": ["$Junk"]})
    [result] = deliver_with_agent(tmp_path, entry, src)
    assert result.status == "sent", result.detail
    store = MailStore(str(tmp_path / "mail"))
    account = store.account("alice@example.org")
    assert account.folder("INBOX").messages() == []
    [info] = account.folder("Junk").messages()
    assert "$Junk" in info.flags
    assert "Junk" in account.subscriptions()
    # A second attempt (after a crash) finds the copy instead of writing another.
    [again] = LocalAgent(store, InlinePool(), "mx.example")._deliver_all(
        entry, entry.recipients, str(src), True)
    assert "already in maildir" in again.detail
    assert len(account.folder("Junk").messages()) == 1


def test_agent_ignores_a_meta_folder_that_is_not_a_string(tmp_path):
    src = tmp_path / "msg.eml"
    src.write_bytes(BODY)
    entry = QueueEntry("6b0a0000000000000000c", "carol@remote.example",
                       [Recipient("alice@example.org", "alice@example.org", True)], 0.0,
                       meta={"folder": ["../../etc"], "flags": ["$Junk"]})
    [result] = deliver_with_agent(tmp_path, entry, src)
    assert result.status == "sent"
    store = MailStore(str(tmp_path / "mail"))
    assert len(store.account("alice@example.org").folder("INBOX").messages()) == 1


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_a_copy_from_a_file_is_byte_exact_with_or_without_copy_file_range(
        tmp_path, monkeypatch, kernel_copy):
    """The message file is copied in the kernel where it can be, by reads where the kernel
    or the filesystem refuses (EXDEV, ENOSYS, ...)."""
    from mailsuite.mailbox.maildir import deliver_once

    if not kernel_copy:
        def refuse(*args, **kwargs):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    source = tmp_path / "message"
    body = b"Subject: big\r\n\r\n" + os.urandom(3 * 1024 * 1024 + 17)  # over one chunk
    source.write_bytes(body)
    path, written = deliver_once(str(tmp_path / "md"), b"Delivered-To: a@b\r\n", str(source),
                                 when=1.5, unique="Q1N0", hostname="h")
    assert written and open(path, "rb").read() == b"Delivered-To: a@b\r\n" + body


def test_a_copy_from_memory_is_the_same_file_as_from_disk(tmp_path):
    from mailsuite.mailbox.maildir import deliver_once

    source = tmp_path / "message"
    source.write_bytes(b"Subject: s\r\n\r\nbody\r\n")
    on_disk, _ = deliver_once(str(tmp_path / "a"), b"H: 1\r\n", str(source), when=1.5,
                              unique="Q1N0", hostname="h")
    in_memory, _ = deliver_once(str(tmp_path / "b"), b"H: 1\r\n", None, when=1.5,
                                unique="Q1N0", hostname="h", data=source.read_bytes())
    assert os.path.basename(on_disk) == os.path.basename(in_memory)
    assert open(on_disk, "rb").read() == open(in_memory, "rb").read()

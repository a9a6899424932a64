"""The Maildir writer with several processes: names stay unique across processes, and a real
short write (a file size limit) in a child leaves nothing behind."""
from __future__ import annotations

import errno
import multiprocessing
import os
import re
import resource
import signal

from mailsuite.mailbox.maildir import deliver as deliver_to_maildir
from mailsuite.mailbox.maildir import make_maildir as ensure_maildir

NAME_RE = re.compile(r"^(\d+)\.M(\d{6})P(\d+)Q(\d+)R[0-9a-f]{8}\.([^/:]+),S=(\d+)$")
HEADER = b"Return-Path: <carol@remote.example>\r\nDelivered-To: alice@example.org\r\n"
BODY = b"Subject: test\r\n\r\nline one\r\nline two\r\n"


def _write_with_file_size_limit(maildir: str, result) -> None:
    # A real short write (EFBIG) as a full disk would give: the file size rlimit, with the
    # signal that would otherwise kill us ignored.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        deliver_to_maildir(maildir, HEADER, data=b"x" * 100_000)
        result.put("no error")
    except OSError as e:
        result.put(e.errno)


def test_disk_full_during_write_leaves_nothing(tmp_path):
    maildir = str(tmp_path / "md")
    ensure_maildir(maildir)
    ctx = multiprocessing.get_context("fork")
    result = ctx.Queue()
    child = ctx.Process(target=_write_with_file_size_limit, args=(maildir, result))
    child.start()
    child.join(20)
    assert result.get(timeout=5) == errno.EFBIG
    assert os.listdir(os.path.join(maildir, "tmp")) == []
    assert os.listdir(os.path.join(maildir, "new")) == []


def _deliver_many(maildir: str, n: int) -> None:
    for _ in range(n):
        deliver_to_maildir(maildir, HEADER, data=BODY)


def test_names_unique_across_processes(tmp_path):
    maildir = str(tmp_path / "md")
    ensure_maildir(maildir)
    ctx = multiprocessing.get_context("fork")
    children = [ctx.Process(target=_deliver_many, args=(maildir, 100)) for _ in range(4)]
    for c in children:
        c.start()
    for c in children:
        c.join(60)
        assert c.exitcode == 0
    names = os.listdir(os.path.join(maildir, "new"))
    assert len(names) == 400
    assert len({NAME_RE.match(n).group(3) for n in names}) == 4  # four pids

"""Opt-in benchmark of Folder.sync() on a large folder (MAILSUITE_BENCH=100000 to run):

    MAILSUITE_BENCH=100000 python -m pytest tests/unit/test_mailbox_bench.py -q -s

Prints the time of the first sync (new/ -> cur/, UID assignment, one stat per file), of later
syncs in the same process (unchanged, and after one delivery) and of the first sync in a fresh
process (what a new IMAP login pays: dovecot-uidlist + mailsuite-index, no per-file stat).
"""
from __future__ import annotations

import os
import time

import pytest

from mailsuite.mailbox.store import MailStore

N = int(os.environ.get("MAILSUITE_BENCH", "0"))
pytestmark = pytest.mark.skipif(N <= 0, reason="set MAILSUITE_BENCH=<messages> to run")


def test_sync_timing(tmp_path):
    account = MailStore(str(tmp_path)).account("bench@example.org")
    account.ensure_layout()
    body = b"From: a@example.net\r\nSubject: small\r\n\r\nhello\r\n"
    new = os.path.join(account.path, "new")
    for i in range(N):
        with open(os.path.join(new, f"{1700000000 + i}.M{i}P1Q{i}.host,S={len(body)}"), "wb") as f:
            f.write(body)
    inbox = account.folder("INBOX")
    results = {}

    def timed(label, fn):
        t = time.perf_counter()
        out = fn()
        results[label] = time.perf_counter() - t
        return out

    assert len(timed("first sync (new->cur, UIDs)", inbox.sync)) == N
    timed("second sync, same process", inbox.sync)
    old = time.time() - 2  # directory mtimes older than 1 s are trusted: date them back
    for sub in ("cur", "new"):
        os.utime(os.path.join(account.path, sub), (old, old))
    inbox.sync()
    timed("unchanged folder, same process", inbox.sync)
    del inbox
    account.store._recent.clear()  # drop the first store's cached state: measure one copy
    rss_before = _rss_kib()
    fresh = MailStore(str(tmp_path)).account("bench@example.org").folder("INBOX")
    assert len(timed("first sync in a fresh process", fresh.sync)) == N
    rss_after = _rss_kib()
    with open(os.path.join(new, "1800000000.M1P1Q1.host,S=5"), "wb") as f:
        f.write(b"hello")
    assert len(timed("sync after one delivery", fresh.sync)) == N + 1
    timed("set_flags one message", lambda: fresh.set_flags(5, ["\\Seen"]))
    timed("append one message", lambda: fresh.append(body))
    timed("expunge one message", lambda: fresh.expunge([7]))
    print()
    for label, seconds in results.items():
        print(f"{N} messages: {label}: {seconds * 1000:.1f} ms")
    print(f"{N} messages: resident memory of one cached folder state: "
          f"~{(rss_after - rss_before) / 1024:.0f} MiB")


def _rss_kib() -> int:
    import gc

    gc.collect()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0

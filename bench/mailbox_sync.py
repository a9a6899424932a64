#!/usr/bin/env python3
"""Benchmark of Folder.sync() on a large folder, in process (no server):

    python bench/mailbox_sync.py --messages 100000

Prints the time (and the CPU time of the process and of the helper that renames new/ -> cur/)
of the first sync (new/ -> cur/, UID assignment, no stat for names with ,S=), of later syncs in
the same process (unchanged, and after one delivery) and of the first sync in a fresh
process (what a new IMAP login pays: dovecot-uidlist + mailsuite-index, no per-file stat).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mailsuite.mailbox.store import MailStore  # noqa: E402


def measure(tmp_path: str, N: int) -> None:
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
        t, cpu = time.perf_counter(), _cpu()
        out = fn()
        results[label] = (time.perf_counter() - t, _cpu() - cpu)
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
    # CPU: user + system time of this process and its helpers, less noisy than wall time on a
    # shared machine (the renames of new/ -> cur/ are system time).
    for label, (seconds, cpu) in results.items():
        print(f"{N} messages: {label}: {seconds * 1000:.1f} ms (CPU {cpu * 1000:.1f} ms)")
    print(f"{N} messages: resident memory of one cached folder state: "
          f"~{(rss_after - rss_before) / 1024:.0f} MiB")


def _cpu() -> float:
    """CPU seconds of this process and of its waited-for children (the helper process that
    renames new/ -> cur/ in a first sync of a large folder, mailsuite/mailbox/moves.py)."""
    import resource

    return time.process_time() + sum(
        getattr(resource.getrusage(resource.RUSAGE_CHILDREN), f) for f in ("ru_utime", "ru_stime"))


def _rss_kib() -> int:
    import gc

    gc.collect()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        measure(tmp, args.messages)


if __name__ == "__main__":
    main()

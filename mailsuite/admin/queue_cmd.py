"""`mailsuite queue list|show|retry|delete|hold|release`: look at and steer the mail queue.

Works on the spool files directly, so it needs no running server, and takes the same flock as
the queue runner before changing an entry (a delivery in progress is waited for, briefly). The
actions themselves are mailsuite/queue/admin.py, shared with the admin dashboard.
A running server notices `retry` and `release` within about a second: they touch
`<queue_dir>/.kick`, which the runner polls (mailsuite/queue/runner.py, KICK_POLL).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from typing import Any

from mailsuite.admin.cli import CommandError
from mailsuite.queue import admin as actions
from mailsuite.queue.admin import QueueActionError, format_duration, format_next
from mailsuite.queue.spool import Spool, SpoolError

# Refusals the dispatcher reports as one line (unknown or damaged entries...).
ERRORS = (SpoolError, QueueActionError)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("queue", help="inspect and manage the mail queue")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("list", help="every queued message with its recipients' states")
    p.set_defaults(func=cmd_list)

    p = actions.add_parser("show", help="one entry: envelope and message headers")
    p.add_argument("id")
    p.set_defaults(func=cmd_show)

    p = actions.add_parser("retry", help="attempt delivery now (a running server acts within ~1s)")
    p.add_argument("id", nargs="?")
    p.add_argument("--all", action="store_true", help="every entry in the queue")
    p.set_defaults(func=cmd_retry)

    p = actions.add_parser("delete", help="remove an entry without delivering or bouncing it")
    p.add_argument("id")
    p.set_defaults(func=cmd_delete)

    p = actions.add_parser("hold", help="keep an entry in the queue without attempting it")
    p.add_argument("id")
    p.set_defaults(func=cmd_hold)

    p = actions.add_parser("release", help="undo hold: attempt the entry again")
    p.add_argument("id")
    p.set_defaults(func=cmd_release)


# -- commands ------------------------------------------------------------------------------------
def cmd_list(config: Any, args: argparse.Namespace) -> int:
    spool = Spool(config.queue_dir)
    now = time.time()
    found = actions.snapshot(spool, now)
    entries, damaged, leftovers = found.entries, found.damaged, found.leftovers
    if not entries and not damaged and not leftovers:
        print("queue is empty")
        return 0
    for problem in damaged:
        print(f"!! {problem}")
    for leftover in leftovers:
        print(describe_leftover(spool, leftover))
    for entry in entries:
        flags = "  [held]" if entry.held else ""
        print(f"{entry.id}  age {format_duration(now - entry.created)}  "
              f"from <{entry.sender}>{flags}")
        for r in entry.recipients:
            line = f"    {r.address}  {r.state}"
            if r.original.lower() != r.address.lower():
                line += f"  (rcpt {r.original})"
            if r.state == "pending":
                line += f"  attempts={r.attempts}  next attempt {format_next(r.next_attempt, now)}"
            if r.last_error:
                line += f"  last error: {r.last_error}"
            print(line)
    pending = found.pending()
    print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
          f"{pending} recipient{'' if pending == 1 else 's'} pending"
          + (f", {len(leftovers)} file{'' if len(leftovers) == 1 else 's'} not part of an entry"
             if leftovers else ""))
    return 0


# What each kind of leftover is, for the admin (docs/design/queue.md, "Instances").
_LEFTOVER = {
    "staged": "incomplete: a message being received (no 250 yet)",
    "spool-time": "delivered at spool time, its log lines maybe not written",
    "orphan": "orphaned: a message without envelope (no 250 was given for it)",
    "temporary": "incomplete: a file being written",
}


def describe_leftover(spool: Spool, leftover: Any) -> str:
    """One line: `~~ <path>  <what it is>  owner <instance> alive|dead  age <duration>`."""
    if leftover.owner:
        owner = f"owner {leftover.owner} {'alive' if leftover.alive else 'dead'}"
    else:
        owner = "writer alive" if leftover.alive else "writer dead"
    fate = "" if leftover.alive else "; the next running server removes it"
    return (f"~~ {os.path.relpath(leftover.path, spool.directory)}  "
            f"{_LEFTOVER.get(leftover.kind, leftover.kind)}  {owner}  "
            f"age {format_duration(leftover.age)}{fate}")


def cmd_show(config: Any, args: argparse.Namespace) -> int:
    spool = Spool(config.queue_dir)
    try:
        entry = spool.load(args.id)
        print(json.dumps(asdict(entry), indent=2, default=str))
    except SpoolError as e:
        if "damaged" not in str(e):
            raise CommandError(str(e)) from None
        print(f"!! {e}; raw envelope:")  # show what is there, so the admin can decide
        with open(spool.envelope_path(args.id), "rb") as f:
            print(f.read().decode("utf-8", errors="replace"))
    print()
    try:
        headers = spool.read_headers(args.id)
    except FileNotFoundError:
        raise CommandError(f"queue entry {args.id} has no message file") from None
    print(headers.decode("utf-8", errors="replace").replace("\r\n", "\n").rstrip("\n"))
    return 0


def cmd_retry(config: Any, args: argparse.Namespace) -> int:
    spool = Spool(config.queue_dir)
    if args.all == bool(args.id):
        raise CommandError("queue retry needs an entry id or --all (not both)")
    if args.all:
        count, held = actions.retry_all(spool)
    else:
        entry = actions.retry(spool, args.id)
        count, held = 1, [entry.id] if entry.held else []
    for queue_id in held:
        print(f"{queue_id}: held; `mailsuite queue release {queue_id}` to deliver it")
    print(f"{count} entr{'y' if count == 1 else 'ies'} due for delivery now")
    return 0


def cmd_delete(config: Any, args: argparse.Namespace) -> int:
    actions.delete(Spool(config.queue_dir), args.id)
    print(f"deleted {args.id}")
    return 0


def cmd_hold(config: Any, args: argparse.Namespace) -> int:
    actions.hold(Spool(config.queue_dir), args.id)
    print(f"held {args.id}")
    return 0


def cmd_release(config: Any, args: argparse.Namespace) -> int:
    actions.release(Spool(config.queue_dir), args.id)
    print(f"released {args.id}")
    return 0

"""`mailsuite trace QUEUE_ID | MESSAGE-ID | ADDRESS [--since 2h]`: the life of matching messages.

Read from the recorded events (docs/design/events.md), never from log text: every message whose
queue id, Message-ID, sender or recipient matches, grouped by queue id, oldest first, each
event on one line in time order: received (client, TLS, login, trust verdicts), queued (one per
recipient), each outbound transaction and delivery attempt (relay, the remote's answer), the DSN
it caused, and its removal; a local copy names its Maildir file, a remote one the id the remote
gave in its 250 answer. Works on SQLite and PostgreSQL alike.
"""
from __future__ import annotations

import argparse
import re
import time
from datetime import datetime, timezone
from typing import Any

from mailsuite.admin.cli import CommandError
from mailsuite.directory import DirectoryError, DirectoryStore
from mailsuite.events.store import Event, EventStore
from mailsuite.maillog import quote
from mailsuite.queue.spool import valid_queue_id

ERRORS = (DirectoryError,)

_SINCE = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Fields shown for each kind, in this order (the others are in the row for the dashboard).
_SHOWN = {
    "received": ("from", "client_ip", "helo", "listener", "protocol", "tls", "auth_user", "size",
                 "nrcpt", "verdicts", "folder"),
    "queued": ("to", "orig_to", "local"),
    "transaction": ("domain", "relay", "tls", "tls_info", "reused", "accepted"),
    "route-failed": ("domain", "relay", "detail"),
    "dsn": ("action", "dsn", "nrcpt"),
    "dsn-skipped": ("action", "detail"),
    "damaged": ("detail",),
    "removed": (),
}
_ATTEMPT = ("to", "orig_to", "relay", "remote_mta", "delay", "attempts", "maildir", "remote_id",
            "detail")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "trace", help="the life of a message: by queue id, Message-ID or address")
    parser.add_argument("what", metavar="QUEUE_ID|MESSAGE-ID|ADDRESS")
    parser.add_argument("--since", default=None, metavar="AGE",
                        help="only messages with an event this recent: 30m, 2h, 3d, 1w")
    parser.add_argument("--limit", type=int, default=50,
                        help="at most this many messages, the most recent (default 50)")
    parser.set_defaults(func=cmd_trace)


def cmd_trace(config: Any, args: argparse.Namespace) -> int:
    since = None if args.since is None else time.time() - parse_age(args.since)
    if args.limit < 1:
        raise CommandError("--limit must be 1 or more")
    store = DirectoryStore.from_config(config)
    try:
        store.prepare()
        events = EventStore(store)
        queue_ids = events.find(since=since, limit=args.limit, **matching(args.what))
        found = events.events(queue_ids)
    finally:
        store.close()
    if not found:
        within = f" in the last {args.since}" if args.since else ""
        raise CommandError(f"no recorded message matches {args.what}{within} (events are "
                           f"kept [events] retention_days = {config.events.retention_days:g})")
    print(format_trace(found))
    return 0


def parse_age(text: str) -> int:
    """Seconds of "30m", "2h", "3d", "1w" (or "45s")."""
    m = _SINCE.match(text.strip())
    if not m:
        raise CommandError(f"--since {text!r}: expected a number and a unit, e.g. 30m, 2h, 3d")
    return int(m.group(1)) * _UNITS[m.group(2)]


def matching(what: str) -> dict[str, list[str]]:
    """The `EventStore.find` arguments for what the admin typed."""
    text = what.strip()
    if valid_queue_id(text):
        return {"queue_ids": [text]}
    if text.startswith("<") and text.endswith(">") and len(text) > 2:
        return {"message_ids": [text]}
    if "@" in text:
        # user@example.org is an address, and the Message-ID <user@example.org> as well.
        return {"addresses": [text], "message_ids": [f"<{text}>"]}
    raise CommandError(f"{what!r} is not a queue id, a Message-ID (<...>) or an address")


def format_trace(events: list[Event]) -> str:
    """One block per queue id (in the order of their first event), one line per event."""
    groups: dict[str, list[Event]] = {}
    for event in events:
        groups.setdefault(event.queue_id, []).append(event)
    blocks = []
    for queue_id, group in groups.items():
        head = [queue_id]
        received = next((e for e in group if e.kind == "received"), None)
        if received is not None:
            if received.message_id:
                head.append(f"message-id={received.message_id}")
            head.append(f"from=<{received.fields.get('from', '')}>")
        lines = [" ".join(head)]
        lines += [f"  {_when(e.time)}  {e.kind:<12} {describe(e)}".rstrip() for e in group]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def describe(event: Event) -> str:
    """The fields of one event as `key=value` (mail log quoting), the shown ones in order."""
    keys = _SHOWN.get(event.kind, _ATTEMPT)
    parts = []
    for key in keys:
        value = event.fields.get(key)
        if value is None or value == "" or (key == "from" and event.kind == "received"):
            continue
        if key == "remote_mta" and value == event.fields.get("relay"):
            continue
        if key == "accepted":
            value = f"{value}/{event.fields.get('total', '?')}"
        parts.append(f"{_label(key)}={_value(key, value)}")
    return " ".join(parts)


def _label(key: str) -> str:
    return {"detail": "answer", "auth_user": "auth", "client_ip": "client"}.get(key, key)


def _value(key: str, value: Any) -> str:
    if key in ("to", "orig_to", "from"):
        return f"<{value}>"
    if key == "delay":
        return f"{float(value):.1f}s"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):  # the trust verdicts: spf=pass,dkim=none,...
        return quote(",".join(f"{k}={v}" for k, v in value.items()))
    return quote(value)


def _when(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"

"""`mailsuite limits show|reset`: the inbound limits as configured and as counted.

`show` prints the [ratelimit], [greylist] and [dnsbl] settings (a bad DNSBL site is refused in
one line, as at start-up), then the current rate windows from the directory (shared by every
instance on it: docs/design/trust-limits.md) and the greylist's counts. `reset KEY` forgets a
counter's windows, e.g. `mailsuite limits reset mx-conn:192.0.2.1` to let a client back in
before its window ends.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from mailsuite.admin.cli import CommandError
from mailsuite.admin.domain_cmd import directory_command
from mailsuite.directory import DirectoryError, DirectoryStore

ERRORS = (DirectoryError,)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("limits", help="rate limits, greylisting and DNSBLs")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("show", help="the configured limits and the current counters")
    p.set_defaults(func=cmd_show)

    p = actions.add_parser("reset", help="forget a rate counter (e.g. mx-conn:192.0.2.1)")
    p.add_argument("key")
    p.set_defaults(func=cmd_reset)


def cmd_show(config: Any, args: argparse.Namespace) -> int:
    from mailsuite.trust.dnsbl import parse_site  # validates the sites as start-up does

    sites = [parse_site(s) for s in config.dnsbl.sites]
    rate, grey, dnsbl = config.ratelimit, config.greylist, config.dnsbl
    print("[ratelimit]")
    print(f"  mx_connections_per_minute       {_limit(rate.mx_connections_per_minute)}"
          "  (per client address, IPv6 per /64)")
    print(f"  mx_recipients_per_minute        {_limit(rate.mx_recipients_per_minute)}")
    print(f"  submission_messages_per_hour    {_limit(rate.submission_messages_per_hour)}"
          "  (per user)")
    print(f"  submission_recipients_per_hour  {_limit(rate.submission_recipients_per_hour)}")
    print(f"  exempt_networks                 {', '.join(rate.exempt_networks) or '(none)'}")
    print("[greylist]")
    print(f"  enabled       {'yes' if grey.enabled else 'no'}")
    print(f"  delay         {grey.delay} s")
    print(f"  retry_window  {grey.retry_window} s")
    print(f"  pass_ttl      {grey.pass_ttl} s")
    print("[dnsbl]")
    print(f"  threshold     {dnsbl.threshold}")
    print(f"  timeout       {dnsbl.timeout:g} s")
    if not sites:
        print("  sites         (none)")
    for site in sites:
        print(f"  site          {site.text}  (weight {site.weight:+d}"
              f"{', allow list' if site.weight < 0 else ''})")
    store = DirectoryStore.from_config(config)  # as directory_command does
    try:
        store.prepare()
        _show_counters(store, config)
    finally:
        store.close()
    return 0


def _show_counters(store: DirectoryStore, config: Any) -> None:
    from mailsuite.trust.ratelimit import limit_for

    now = _now()
    counters = store.rate_counters(now)
    print(f"rate windows: {len(counters)}")
    for c in counters:
        known = limit_for(config.ratelimit, c.key)
        limit = str(known[0]) if known and known[0] else "-"
        print(f"  {c.key}  {c.count}/{limit}  window ends in {max(0, int(c.window_end - now))} s")
    counts = store.greylist_counts(now)
    print(f"greylist: {counts.pending} pending, {counts.passed} passed, "
          f"{counts.whitelisted} whitelisted network{'' if counts.whitelisted == 1 else 's'}")


@directory_command
def cmd_reset(store: DirectoryStore, args: argparse.Namespace) -> int:
    removed = store.rate_reset(args.key)
    if not removed:
        raise CommandError(f"no rate counter {args.key}")
    print(f"reset {args.key} ({removed} window{'' if removed == 1 else 's'} removed)")
    return 0


def _now() -> float:
    return time.time()  # the server's clock too (the reactor's seconds); tests replace this


def _limit(value: int) -> str:
    return str(value) if value > 0 else "off"

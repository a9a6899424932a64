"""`mailsuite reports dmarc|tls [DOMAIN]`, `reports import FILE...`, `reports send [--date D]`.

dmarc/tls show what other organisations reported about our domains (docs/design/reports.md):
who sends mail as us from which address, how much of it passes DMARC; how TLS went for the
sessions others opened to us. `import` reads report messages (or bare .xml/.json/.gz/.zip
files) from disk into the same tables. `send` builds and queues the reports of one day now,
as the server does daily; a running server delivers them within about a second (the spool's
.kick), and a report already sent for that day by anyone is not sent again.
"""
from __future__ import annotations

import argparse
import os
import time
from datetime import datetime
from typing import Any

from mailsuite.admin.cli import CommandError
from mailsuite.directory.records import DirectoryError
from mailsuite.reports.inbound import MAX_MESSAGE, ReportError

ERRORS = (DirectoryError, ReportError)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("reports", help="DMARC and TLS reports, received and sent")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("dmarc", help="received DMARC aggregate reports, per domain and "
                                         "source address")
    p.add_argument("domain", nargs="?")
    p.set_defaults(func=cmd_dmarc)

    p = actions.add_parser("tls", help="received TLS reports, per domain and result")
    p.add_argument("domain", nargs="?")
    p.set_defaults(func=cmd_tls)

    p = actions.add_parser("import", help="store the reports in these message or report files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_import)

    p = actions.add_parser("send", help="queue one day's reports now (default: yesterday, UTC)")
    p.add_argument("--date", help="YYYY-MM-DD (UTC)")
    p.set_defaults(func=cmd_send)


def _store(config: Any) -> Any:
    from mailsuite.directory.store import DirectoryStore
    from mailsuite.reports.store import ReportStore

    directory = DirectoryStore.from_config(config)
    directory.prepare()
    return ReportStore(directory)


# -- showing -------------------------------------------------------------------------------------
def cmd_dmarc(config: Any, args: argparse.Namespace) -> int:
    for domain, mine in _by_domain(_store(config).dmarc_summary(args.domain), "DMARC", args):
        total = sum(r.messages for r in mine)
        passed = sum(r.dmarc_pass for r in mine)
        print(f"{domain}: {total} messages, DMARC pass {_percent(passed, total)}, "
              f"fail {_percent(total - passed, total)}")
        print(f"  {'source address':<40} {'messages':>8} {'pass':>6} {'dkim':>6} {'spf':>6}"
              f"  reported by")
        for r in mine:
            print(f"  {r.source_ip:<40} {r.messages:>8} {_percent(r.dmarc_pass, r.messages):>6}"
                  f" {r.dkim_pass:>6} {r.spf_pass:>6}  {r.reporters}")
        failing = [r for r in mine if r.dmarc_pass < r.messages]
        if failing:
            print("  failing: " + ", ".join(f"{r.source_ip} ({r.messages - r.dmarc_pass} of "
                                            f"{r.messages})" for r in failing))
    return 0


def cmd_tls(config: Any, args: argparse.Namespace) -> int:
    for domain, mine in _by_domain(_store(config).tls_summary(args.domain), "TLS", args):
        ok = sum(r.sessions for r in mine if r.result_type == "success")
        failed = sum(r.sessions for r in mine if r.result_type != "success")
        print(f"{domain}: {ok} sessions ok, {failed} failed")
        print(f"  {'policy':<18} {'result':<28} {'sessions':>8}  reported by")
        for r in mine:
            print(f"  {r.policy_type:<18} {r.result_type:<28} {r.sessions:>8}  {r.reporters}")
    return 0


def _by_domain(rows: list[Any], kind: str, args: argparse.Namespace) -> list[tuple[str, list]]:
    """(domain, its rows) in order; says so when there is nothing to show."""
    if not rows:
        print(f"no {kind} reports" + (f" about {args.domain}" if args.domain else ""))
    return [(d, [r for r in rows if r.domain == d]) for d in dict.fromkeys(r.domain for r in rows)]


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


# -- import --------------------------------------------------------------------------------------
def cmd_import(config: Any, args: argparse.Namespace) -> int:
    from mailsuite.reports import ReceivedDmarc
    from mailsuite.reports.inbound import parse_report, reports_in_message, gunzip, unzip

    store = _store(config)
    problems = 0
    for path in args.files:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_MESSAGE + 1)
            name = path.lower()
            if name.endswith(".gz"):
                reports = [parse_report(gunzip(data))]
            elif name.endswith(".zip"):
                reports = [parse_report(unzip(data))]
            elif name.endswith((".xml", ".json")):
                reports = [parse_report(data)]
            else:
                reports = reports_in_message(data)
        except (OSError, ReportError) as e:
            print(f"{path}: not read: {getattr(e, 'strerror', None) or e}")
            problems += 1
            continue
        if not reports:
            print(f"{path}: no report in it")
        for report in reports:
            save = store.store_dmarc if isinstance(report, ReceivedDmarc) else store.store_tls
            fresh = save(report, time.time())
            print(f"{path}: {report.org_name} {report.report_id}: "
                  f"{'stored' if fresh else 'stored before'}")
    if problems:
        raise CommandError(f"{problems} of {len(args.files)} files could not be read")
    return 0


# -- send ----------------------------------------------------------------------------------------
def cmd_send(config: Any, args: argparse.Namespace) -> int:
    from mailsuite.reports.record import yesterday

    if not config.reports.sender:
        raise CommandError("[reports] sender is empty: set the address reports are sent from")
    day = args.date or yesterday()
    try:
        datetime.strptime(day, "%Y-%m-%d")
    except ValueError:
        raise CommandError(f"--date must be YYYY-MM-DD, not {day!r}")
    outcome = _run_on_reactor(lambda reactor, pools: _send(config, day, reactor, pools))
    if isinstance(outcome, BaseException):
        raise outcome
    for line in outcome or [f"nothing recorded for {day}: no report to send"]:
        print(line)
    return 0


def _send(config: Any, day: str, reactor: Any, pools: Any) -> Any:
    from mailsuite.courier.mx import make_resolver
    from mailsuite.reports.sender import ReportSender, SpoolSubmitter
    from mailsuite.trust.dns import DnsClient

    os.makedirs(config.queue_dir, mode=0o700, exist_ok=True)
    dns = DnsClient(make_resolver(config.courier.nameservers, reactor), reactor)
    sender = ReportSender(config, _store(config), pools.db, pools.io, dns,
                          SpoolSubmitter(config.queue_dir, pools.io, reactor), reactor)
    return sender.send_day(day)


def _run_on_reactor(work: Any) -> Any:
    """Run work(reactor, pools) -> Deferred on a reactor of its own; its result or exception.
    (The command needs DNS and the pools; the reactor is stopped before returning.)"""
    from twisted.internet import defer, reactor

    from mailsuite.pools import Pools

    pools = Pools(db_threads=1, reactor=reactor)
    result: list[Any] = []

    def start() -> None:
        d = defer.maybeDeferred(work, reactor, pools)
        d.addErrback(lambda f: f.value)
        d.addCallback(result.append)
        d.addBoth(lambda _: (pools.stopService(), reactor.stop()))

    pools.startService()
    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)
    return result[0] if result else CommandError("interrupted")

"""`mailsuite dns DOMAIN [--check [--nameserver HOST:PORT]]`: the DNS records to publish.

Without --check, prints them zone-file style, ready to paste. With --check, asks a resolver (with
twisted.names) for each record and prints one line per record: ok, missing, or wrong (expected vs
found); the exit status is 1 if anything is missing or wrong, 2 if the resolver did not answer.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from typing import Any

from mailsuite.admin.cli import CommandError
from mailsuite.autoconfig.records import DNSRecord, normalize_txt, records_for
from mailsuite.autoconfig.settings import valid_domain
from mailsuite.config import Config

QUERY_TIMEOUT = (1, 3)  # seconds per retry (twisted.names): a test or a LAN resolver is quick


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dns", help="print (or check) the DNS records a hosted domain needs",
        description="Print the DNS records to publish for DOMAIN (MX, SPF, DKIM, DMARC, "
                    "autoconfig, SRV, MTA-STS, TLS-RPT), or check them with --check.")
    parser.add_argument("domain", metavar="DOMAIN")
    parser.add_argument("--check", action="store_true",
                        help="query a resolver and report each record as ok, missing or wrong")
    parser.add_argument("--nameserver", metavar="HOST[:PORT]", default=None,
                        help="resolver to ask with --check (default: the system's resolvers)")
    parser.set_defaults(func=run)


def run(config: Config, args: argparse.Namespace) -> int:
    domain = valid_domain(args.domain)
    if domain is None:
        raise CommandError(f"{args.domain!r} is not a domain name")
    from mailsuite.autoconfig import hosted_domain_names
    from mailsuite.directory import DirectoryError

    try:
        hosted = hosted_domain_names(config)
    except DirectoryError as e:
        raise CommandError(str(e))
    if domain not in hosted:
        raise CommandError(f"{domain} is not a domain of this server (add it with "
                           f"`mailsuite domain add {domain}`)")
    records = records_for(config, domain)
    if not args.check:
        print_zone(config, domain, records)
        return 0
    nameserver = _parse_nameserver(args.nameserver) if args.nameserver else None
    results = _run_checks(records, config.hostname.rstrip(".").lower(), nameserver)
    failed = 0
    unanswered = 0
    for result in results:
        sys.stdout.write(result.line() + "\n")
        failed += result.status in ("missing", "wrong")
        unanswered += result.status == "error"
    sys.stdout.write(f"{len(results) - failed - unanswered} ok, {failed} missing or wrong, "
                     f"{unanswered} unanswered\n")
    return 2 if unanswered else 1 if failed else 0


def print_zone(config: Config, domain: str, records: list[DNSRecord]) -> None:
    host = config.hostname.rstrip(".").lower()
    width = max(len(r.name) + 1 for r in records)
    out = [
        f"; DNS records for {domain}, served by {host} (mailsuite dns {domain})",
        f"; {host}. also needs A/AAAA records with this server's public addresses, and each",
        f"; address a PTR record naming {host} (ask whoever runs the network).",
    ]
    if not any(r.why.startswith("DKIM") for r in records):
        out.append(f"; no DKIM key yet: `mailsuite dkim generate {domain}`, then run this again.")
    for record in records:
        out.append(f"; {record.why}")
        out.append(record.zone_line(width))
    sys.stdout.write("\n".join(out) + "\n")


# -- checking --------------------------------------------------------------------------------

@dataclass
class CheckResult:
    record: DNSRecord
    status: str  # ok | missing | wrong | error
    found: str = ""

    def line(self) -> str:
        what = f"{self.record.name}. {self.record.rtype}"
        expected = self.record.rdata_text()
        if self.status == "ok":
            return f"ok       {what} {expected}"
        if self.status == "missing":
            return f"missing  {what} {expected}"
        if self.status == "wrong":
            return f"wrong    {what}: expected {expected}, found {self.found}"
        return f"error    {what}: {self.found}"


def _parse_nameserver(value: str) -> tuple[str, int]:
    host, port = value, "53"
    if value.startswith("["):  # [::1]:53
        host, _, rest = value[1:].partition("]")
        port = rest.lstrip(":") or "53"
    elif value.count(":") == 1:
        host, port = value.split(":")
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise CommandError(f"--nameserver {value!r} is not HOST or HOST:PORT")
    return host, int(port)


def _run_checks(records: list[DNSRecord], host: str, nameserver: tuple[str, int] | None
                ) -> list[CheckResult]:
    """Run the reactor just for the queries (the admin CLI is otherwise synchronous)."""
    from twisted.internet import defer, reactor
    from twisted.names import client

    if nameserver:
        resolver = client.Resolver(servers=[nameserver])
    else:
        resolver = client.Resolver(resolv="/etc/resolv.conf")
    outcome: list[Any] = []

    @defer.inlineCallbacks
    def check_all():
        checks = [_check(resolver, record, host) for record in records]
        results = yield defer.gatherResults(checks, consumeErrors=True)
        return results

    def main() -> None:
        d = check_all()
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(main)
    reactor.run(installSignalHandlers=False)
    result = outcome[0] if outcome else RuntimeError("no result")
    if isinstance(result, BaseException):
        raise CommandError(f"DNS check failed: {result}")
    if hasattr(result, "getErrorMessage"):
        raise CommandError(f"DNS check failed: {result.getErrorMessage()}")
    return result


def _check(resolver: Any, record: DNSRecord, host: str):
    from twisted.internet import defer

    @defer.inlineCallbacks
    def run():
        try:
            found = yield _lookup(resolver, record)
        except _NoAnswer:
            found = []
        except Exception as e:  # timeout, SERVFAIL, refused: the resolver did not tell us
            return CheckResult(record, "error", f"{type(e).__name__}: {e}".strip(": "))
        if record.rtype == "CNAME" and not found:
            # An address record with the mail host's addresses does the job of the CNAME.
            same = yield _same_addresses(resolver, record.name, host)
            if same is not None:
                return CheckResult(record, "ok" if same else "wrong",
                                   "" if same else "address records that differ from the mail "
                                                   "host's")
        return _compare(record, found)

    return run()


class _NoAnswer(Exception):
    pass


def _lookup(resolver: Any, record: DNSRecord):
    """Deferred list of rdata tuples in the same shape as DNSRecord.data, of the record's type."""
    from twisted.names import dns, error

    lookups = {
        "MX": (resolver.lookupMailExchange, dns.MX),
        "TXT": (resolver.lookupText, dns.TXT),
        "CNAME": (resolver.lookupCanonicalName, dns.CNAME),
        "SRV": (resolver.lookupService, dns.SRV),
    }
    method, rtype = lookups[record.rtype]

    def got(result):
        answers = result[0]
        found = []
        for rr in answers:
            if rr.type != rtype or rr.name.name.decode().lower().rstrip(".") != record.name:
                continue
            p = rr.payload
            if rtype == dns.MX:
                found.append((p.preference, _name(p.name)))
            elif rtype == dns.TXT:
                found.append((b"".join(p.data).decode("utf-8", "replace"),))
            elif rtype == dns.CNAME:
                found.append((_name(p.name),))
            else:
                found.append((p.priority, p.weight, p.port, _name(p.target) or "."))
        return found

    def failed(failure):
        failure.trap(error.DNSNameError)  # NXDOMAIN: the name does not exist at all
        raise _NoAnswer()

    return method(record.name, timeout=QUERY_TIMEOUT).addCallbacks(got, failed)


def _same_addresses(resolver: Any, name: str, host: str):
    """True/False when `name` has A records (equal to the host's or not), None when it has none."""
    from twisted.internet import defer

    @defer.inlineCallbacks
    def run():
        try:
            mine = yield resolver.lookupAddress(name, timeout=QUERY_TIMEOUT)
            theirs = yield resolver.lookupAddress(host, timeout=QUERY_TIMEOUT)
        except Exception:
            return None
        a = {rr.payload.dottedQuad() for rr in mine[0] if rr.type == 1}
        b = {rr.payload.dottedQuad() for rr in theirs[0] if rr.type == 1}
        if not a:
            return None
        return a == b

    return run()


def _compare(record: DNSRecord, found: list[tuple]) -> CheckResult:
    if record.rtype == "TXT":
        expected = record.data[0]
        # Several TXT records share a name (SPF beside site verifications): compare only those
        # of the same kind, told apart by the version tag ("v=spf1", "v=DMARC1"...).
        tag = re.match(r"v=[A-Za-z0-9]+", expected)
        candidates = [f for f in found
                      if tag is None or f[0].strip().lower().startswith(tag.group().lower())]
        if not candidates:
            return CheckResult(record, "missing")
        if any(normalize_txt(f[0]) == normalize_txt(expected) for f in candidates):
            return CheckResult(record, "ok")
        return CheckResult(record, "wrong", "; ".join(_quote(f[0]) for f in candidates))
    if not found:
        return CheckResult(record, "missing")
    if record.rtype == "MX":
        ok = any(f[1] == record.data[1] for f in found)
        text = ", ".join(f"{p} {n}." for p, n in found)
    elif record.rtype == "CNAME":
        ok = found[0][0] == record.data[0]
        text = f"{found[0][0]}."
    else:  # SRV: priority and weight are advice; target and port must match
        ok = any(f[2] == record.data[2] and f[3] == record.data[3] for f in found)
        text = ", ".join(f"{a} {b} {c} {d if d == '.' else d + '.'}" for a, b, c, d in found)
    return CheckResult(record, "ok" if ok else "wrong", text)


def _name(name: Any) -> str:
    return name.name.decode("ascii", "replace").lower().rstrip(".")


def _quote(text: str) -> str:
    return '"' + text + '"'

"""Sending the day's reports: for each domain we recorded something about, ask DNS whether it
wants a report and where, claim (kind, domain, day) in SQL so that one instance of several
sends it, build it and submit it to the queue, which delivers (and DKIM-signs) it like any
other outbound mail (docs/design/reports.md, "Sending").

- DMARC (RFC 7489 §7.2): the policy domain's `_dmarc` record, its `rua=mailto:` addresses; an
  address in another organisational domain is used only when that domain publishes
  `<policy domain>._report._dmarc.<its domain>` (§7.1).
- TLS-RPT (RFC 8460 §3): the recipient domain's `_smtp._tls` record `v=TLSRPTv1; rua=...`; only
  mailto: destinations (https: is not implemented).
`ReportService` runs this once a day on the clock; `mailsuite reports send` runs it now.
"""
from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from typing import Any, Generator, Mapping, Sequence
from urllib.parse import unquote

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mailsuite.config import Config
from mailsuite.pools import WorkPool
from mailsuite.queue.agents import MessageQueue
from mailsuite.reports import outbound
from mailsuite.reports.record import day_of, day_range
from mailsuite.trust.dmarc import DmarcRecord, organizational_domain, parse_record

log = Logger()

_SIZE = re.compile(r"^(\d+)([kmgt]?)$", re.I)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_TLSRPT = re.compile(r"^v\s*=\s*TLSRPTv1\s*(;|$)")
MAX_DESTINATIONS = 5  # rua addresses used per report


class ReportSender:
    """`send_day(day)` fires with one line per domain saying what happened.

    store: a `ReportStore`; db: its pool; io: builds the reports (XML, gzip); dns: a
    `DnsClient` (query(name, "TXT") -> list[bytes]); queue: where the reports go."""

    def __init__(self, config: Config, store: Any, db: WorkPool, io: WorkPool, dns: Any,
                 queue: MessageQueue, clock: IReactorTime):
        self.config = config
        self.store = store
        self.db = db
        self.io = io
        self.dns = dns
        self.queue = queue
        self.clock = clock
        self.sender = config.reports.sender
        self.org_name = config.reports.org_name or config.hostname

    @defer.inlineCallbacks
    def send_day(self, day: str) -> Generator[defer.Deferred, Any, list[str]]:
        lines: list[str] = []
        dmarc = yield self.db.run(self.store.dmarc_day, day)
        for domain, rows in sorted(dmarc.items()):
            lines.append((yield self._guarded(self._send_dmarc, day, domain, rows)))
        tls = yield self.db.run(self.store.tls_day, day)
        for domain, rows in sorted(tls.items()):
            lines.append((yield self._guarded(self._send_tls, day, domain, rows)))
        start, _ = day_range(day)
        yield self.db.run(self.store.purge,
                          day_of(start - 86400 * max(1, self.config.reports.keep_days)))
        return lines

    @defer.inlineCallbacks
    def _guarded(self, send: Any, day: str, domain: str, rows: list) -> Any:
        try:
            line = yield send(day, domain, rows)
        except Exception as e:  # one domain's trouble (DNS, the queue) must not stop the others
            line = f"{domain}: not sent: {type(e).__name__}: {e}"
        log.info("report {line}", line=line)
        return line

    # -- DMARC -----------------------------------------------------------------------------------
    @defer.inlineCallbacks
    def _send_dmarc(self, day: str, domain: str, rows: list[outbound.DmarcRow]) -> Any:
        texts = [_text(t) for t in (yield self.dns.query("_dmarc." + domain, "TXT"))]
        records = [t for t in texts if t.startswith("v=DMARC1")]
        record = parse_record(records[0]) if len(records) == 1 else None
        if record is None or not record.rua:
            return f"dmarc {domain}: no rua= in its DMARC record, no report"
        targets = []
        for address, limit in mailto_destinations(record.rua):
            if (yield self._may_receive(domain, address)):
                targets.append((address, limit))
        if not targets:
            return f"dmarc {domain}: no rua= destination accepts reports for it (RFC 7489 §7.1)"
        return (yield self._submit("dmarc", day, domain, targets,
                                   lambda meta: self._dmarc_message(meta, domain, record, rows,
                                                                    targets)))

    def _dmarc_message(self, meta: outbound.Meta, domain: str, record: DmarcRecord,
                       rows: list, targets: list) -> bytes:
        xml = outbound.dmarc_xml(meta, domain, record, rows)
        return outbound.dmarc_message(meta, self.sender, [a for a, _ in targets], domain, xml,
                                      self.clock.seconds())

    @defer.inlineCallbacks
    def _may_receive(self, domain: str, address: str) -> Any:
        """RFC 7489 §7.1: a destination outside the policy domain's organisational domain must
        say it accepts reports about it."""
        rua_domain = address.rpartition("@")[2].lower()
        if organizational_domain(rua_domain) == organizational_domain(domain):
            return True
        texts = yield self.dns.query(f"{domain}._report._dmarc.{rua_domain}", "TXT")
        return any(_text(t).startswith("v=DMARC1") for t in texts)

    # -- TLS-RPT ---------------------------------------------------------------------------------
    @defer.inlineCallbacks
    def _send_tls(self, day: str, domain: str, rows: list[outbound.TlsRow]) -> Any:
        texts = [_text(t) for t in (yield self.dns.query("_smtp._tls." + domain, "TXT"))]
        records = [t for t in texts if _TLSRPT.match(t)]
        if len(records) != 1:  # RFC 8460 §3: none, or several, means no reporting
            return f"tlsrpt {domain}: no single TLSRPTv1 record, no report"
        uris = []
        for part in records[0].split(";")[1:]:
            name, _, value = part.partition("=")
            if name.strip().lower() == "rua":
                uris = [u.strip() for u in value.split(",") if u.strip()]
        targets = mailto_destinations(uris)
        if not targets:
            return f"tlsrpt {domain}: no mailto: destination in rua=, no report"
        return (yield self._submit("tlsrpt", day, domain, targets,
                                   lambda meta: outbound.tlsrpt_message(
                                       meta, self.sender, [a for a, _ in targets], domain,
                                       outbound.tlsrpt_json(meta, {domain: rows}),
                                       self.clock.seconds())))

    # -- both ------------------------------------------------------------------------------------
    @defer.inlineCallbacks
    def _submit(self, kind: str, day: str, domain: str, targets: list[tuple[str, int]],
                build: Any) -> Any:
        now = self.clock.seconds()
        if not (yield self.db.run(self.store.claim, kind, domain, day, now)):
            return f"{kind} {domain}: already sent for {day} (claimed by another run)"
        begin, end = day_range(day)
        # The same id whichever instance builds it: a receiver sees a duplicate as one report.
        meta = outbound.Meta(self.org_name, self.sender, f"{day}.{domain}.{self.org_name}",
                             begin, end)
        try:
            data = yield self.io.run(build, meta)
            wanted = [a for a, limit in targets if not limit or len(data) <= limit]
            if not wanted:
                raise ValueError(f"report of {len(data)} octets is over every rua= size limit")
            queue_id = yield self.queue.submit(
                self.sender, [(a, None) for a in wanted], data,
                {"client_ip": "", "helo": self.config.hostname, "auth_user": "",
                 "protocol": "REPORT"})
        except BaseException:
            yield self.db.run(self.store.release, kind, domain, day)  # a later run may send it
            raise
        return f"{kind} {domain}: queued {queue_id} for {day} to {', '.join(wanted)}"


def mailto_destinations(uris: Sequence[str]) -> list[tuple[str, int]]:
    """(address, size limit or 0) of the mailto: URIs of a rua= list (RFC 7489 §6.2: a URI may
    end in "!<size>[kmgt]")."""
    out: list[tuple[str, int]] = []
    for uri in uris:
        scheme, _, rest = uri.strip().partition(":")
        if scheme.lower() != "mailto" or not rest:
            continue
        rest, _, size = rest.partition("!")
        address = unquote(rest.split("?", 1)[0]).strip()
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain or any(c.isspace() or c in "<>,;\"" for c in address):
            continue
        m = _SIZE.match(size.strip()) if size else None
        limit = int(m.group(1)) * _UNITS[m.group(2).lower()] if m else 0
        if address.lower() not in [a.lower() for a, _ in out]:
            out.append((address, limit))
    return out[:MAX_DESTINATIONS]


def _text(value: bytes | str) -> str:
    return value.decode("ascii", "replace").strip() if isinstance(value, bytes) else value.strip()


class ReportService(Service):
    """Sends the previous day's reports every day at `[reports] send_at` seconds after midnight
    UTC, and once at start-up if today's time has passed (claims make a second run harmless)."""

    name = "reports"

    def __init__(self, sender: ReportSender, clock: IReactorTime, send_at: int):
        self.sender = sender
        self.clock = clock
        self.send_at = max(0, min(int(send_at), 86399))
        self._call: IDelayedCall | None = None
        self.running_send: defer.Deferred | None = None

    def startService(self) -> None:
        super().startService()
        now = self.clock.seconds()
        if now - _midnight(now) >= self.send_at:
            self._call = self.clock.callLater(0, self._run)
        else:
            self._schedule()

    def stopService(self) -> Any:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return self.running_send

    def _schedule(self) -> None:
        now = self.clock.seconds()
        due = _midnight(now) + self.send_at
        if due <= now:
            due += 86400
        self._call = self.clock.callLater(due - now, self._run)

    def _run(self) -> None:
        day = day_of(self.clock.seconds() - 86400)
        d = self.sender.send_day(day)
        d.addErrback(lambda f: log.error("reports for {day} failed: {error}", day=day,
                                         error=f.value))
        self.running_send = d

        def done(_: Any) -> None:
            self.running_send = None
            if self.running:
                self._schedule()

        d.addBoth(done)


def _midnight(seconds: float) -> float:
    return datetime.fromtimestamp(seconds, timezone.utc).replace(
        hour=0, minute=0, second=0, microsecond=0).timestamp()


class SpoolSubmitter:
    """A `MessageQueue.submit` for the admin command, which has no running queue: the entry is
    written to the spool (fsynced) in `io`, and `.kick` tells a running server to look now."""

    def __init__(self, queue_dir: str, io: WorkPool, clock: IReactorTime):
        from mailsuite.queue.spool import Spool

        self.spool = Spool(queue_dir)
        self.io = io
        self.clock = clock
        self.incoming_dir = os.path.join(queue_dir, "incoming")

    def submit(self, sender: str, recipients: Sequence[tuple[str, Any]], data: bytes,
               meta: Mapping[str, Any]) -> defer.Deferred:
        from mailsuite.queue.attempts import expand_recipients
        from mailsuite.queue.spool import QueueEntry, new_queue_id

        now = self.clock.seconds()
        entry = QueueEntry(id=new_queue_id(now), sender=sender,
                           recipients=expand_recipients(recipients), created=now,
                           meta=dict(meta))

        def store() -> str:
            self.spool.store(entry, data)
            self.spool.kick()
            return entry.id

        return self.io.run(store)

    def submit_file(self, *args: Any, **kwargs: Any) -> defer.Deferred:
        return defer.fail(NotImplementedError("reports are submitted from memory"))

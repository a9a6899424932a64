"""`EventRecorder`: turns the mail log's events into rows of ms_event and counts of ms_stat, and
writes them in batches in the db pool (docs/design/events.md).

It is a twisted.logger observer: mailsuite/maillog.py, the one place that reports what happens
to a message, gives each of its log events a `maillog_event` kind and the objects it is about
(the queue entry, the recipient, the delivery result), so nothing here reads log text. The SMTP
server reports refusals through `refused(listener, reason)`.

On the reactor thread the recorder only appends to memory: one batch is written at a time, every
`flush_interval` seconds or as soon as `batch_size` events wait. While the database cannot
take them, events stay in memory up to `max_pending`; beyond that the oldest are dropped and
counted in a log line, so an outage costs memory that is bounded, never a stalled server.
"""
from __future__ import annotations

import collections
import re
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import ILogObserver, Logger, LogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsuite import maillog
from mailsuite.config import ConfigError, EventsSection
from mailsuite.directory.records import DirectoryError
from mailsuite.events.store import HOUR, MINUTE, EventStore, StatKey, bucket_of
from mailsuite.pools import WorkPool
from mailsuite.queue.spool import QueueEntry, Recipient

log = Logger(namespace="mailsuite.events")

PURGE_INTERVAL = 3600.0  # seconds between two purges of old events and buckets
MAX_RETRY = 60.0  # seconds between two tries of a batch the database refused, at most
OUTAGE_LOG_INTERVAL = 60.0  # one "cannot write" line per this many seconds, with counts
_QUEUED_AS = re.compile(r"\bqueued as ([^\s;,]+)", re.IGNORECASE)
_FIELD_TEXT = 1000  # characters of one text field kept (a remote's answer can be long)


@implementer(ILogObserver)
class EventRecorder(Service):
    """Records what maillog reports into `store` through `db`, on `clock`'s time."""

    name = "events"

    def __init__(self, store: EventStore, db: WorkPool, clock: IReactorTime,
                 settings: EventsSection, publisher: LogPublisher):
        check_settings(settings)
        self.store = store
        self.db = db
        self.clock = clock
        self.settings = settings
        self.publisher = publisher
        self.keeps_events = settings.retention_days > 0
        self.resolutions = [r for r, days in ((MINUTE, settings.stats_minutes_days),
                                              (HOUR, settings.stats_hours_days)) if days > 0]
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._stats: dict[StatKey, int] = {}
        self._timer: IDelayedCall | None = None
        self._writing: defer.Deferred | None = None
        self._retry = settings.flush_interval
        self._dropped = 0  # events dropped since the last line that said so
        self._failed = 0  # batches refused since the last line that said so
        self._last_outage_log: float | None = None
        self._purger = task.LoopingCall(self.purge)
        self._purger.clock = clock

    # -- service ------------------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self.publisher.addObserver(self)
        self._purger.start(PURGE_INTERVAL, now=True)

    def stopService(self) -> defer.Deferred:
        """Stop listening and write what is left (once; what the database refuses is lost)."""
        super().stopService()
        self.publisher.removeObserver(self)
        if self._purger.running:
            self._purger.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        d = self._writing or defer.succeed(None)
        return d.addBoth(lambda _: self._drain())

    def _drain(self) -> defer.Deferred | None:
        if not self._pending and not self._stats:
            return None
        return self._write().addCallback(lambda ok: self._drain() if ok else None)

    # -- what is reported ---------------------------------------------------------------------
    def __call__(self, event: dict[str, Any]) -> None:
        """A log event: only the mail log's (on the reactor thread) are for us."""
        kind = event.get("maillog_event")
        if not kind or event.get("log_namespace") != maillog.NAMESPACE:
            return
        try:
            rows, counts = _translate(kind, event)
        except Exception:
            log.failure("events: cannot record a {kind} event", kind=kind)
            return
        now = self.clock.seconds()
        if self.keeps_events:
            for row in rows:
                row["time"] = now
            self._pending.extend(rows)
        for metric, label, amount in counts:
            self._count(now, metric, label, amount)
        self._trim()
        self._schedule()

    def refused(self, listener: str, reason: str) -> None:
        """The SMTP server refused a client (any reply >= 400) for `reason`."""
        self._count(self.clock.seconds(), "rejected", reason, 1)
        self._trim()
        self._schedule()

    def _count(self, now: float, metric: str, label: str, amount: int) -> None:
        for resolution in self.resolutions:
            key = (resolution, bucket_of(now, resolution), metric, label[:60])
            self._stats[key] = self._stats.get(key, 0) + amount

    # -- writing ------------------------------------------------------------------------------
    def flush(self) -> defer.Deferred:
        """Write one batch now (tests; the timer does it otherwise): fires with True when the
        database took it, False when it did not (the batch waits for the next try)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._writing is not None:
            return self._writing.addCallback(lambda _: self.flush())
        return self._write()

    def _schedule(self) -> None:
        if self._writing is not None or not (self._pending or self._stats):
            return
        full = len(self._pending) >= self.settings.batch_size
        if self._timer is not None and self._timer.active():
            if not full:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(0 if full else self._retry, self._timed_write)

    def _timed_write(self) -> None:
        self._timer = None
        self._write()

    def _write(self) -> defer.Deferred:
        size = self.settings.batch_size
        batch = [self._pending.popleft() for _ in range(min(size, len(self._pending)))]
        stats, self._stats = self._stats, {}
        if not batch and not stats:
            return defer.succeed(True)
        d = self.db.run(self.store.write, batch, stats)
        self._writing = d

        def written(_: Any) -> bool:
            self._writing = None
            self._retry = self.settings.flush_interval
            if self._failed or self._dropped:
                log.info("events: the database takes events again ({failed} batches failed, "
                         "{dropped} events dropped)", failed=self._failed, dropped=self._dropped)
                self._failed = self._dropped = 0
                self._last_outage_log = None
            self._schedule()
            return True

        def failed(failure: Failure) -> bool:
            self._writing = None
            self._pending.extendleft(reversed(batch))  # the oldest stay first
            for key, value in stats.items():
                self._stats[key] = self._stats.get(key, 0) + value
            self._trim()
            self._failed += 1
            self._report_outage(failure)
            self._retry = min(MAX_RETRY, max(self._retry * 2, self.settings.flush_interval))
            if self.running:
                self._schedule()
            return False

        return d.addCallbacks(written, failed)

    def _trim(self) -> None:
        """Bounded memory: the oldest events (and statistics buckets) go first."""
        limit = self.settings.max_pending
        while len(self._pending) > limit:
            self._pending.popleft()
            self._dropped += 1
        if len(self._stats) > limit:
            for key in sorted(self._stats, key=lambda k: k[1])[:len(self._stats) - limit]:
                del self._stats[key]

    def _report_outage(self, failure: Failure) -> None:
        if not failure.check(DirectoryError):
            log.failure("events: writing a batch failed", failure)
            return
        now = self.clock.seconds()
        if self._last_outage_log is not None and \
                now - self._last_outage_log < OUTAGE_LOG_INTERVAL:
            return
        self._last_outage_log = now
        log.warn("events: cannot write to the database, {pending} events wait in memory "
                 "({dropped} oldest dropped so far, at most {limit} kept): {error}",
                 pending=len(self._pending), dropped=self._dropped,
                 limit=self.settings.max_pending, error=failure.getErrorMessage())

    # -- retention ----------------------------------------------------------------------------
    def purge(self) -> defer.Deferred:
        """Delete what is past its retention, in the db pool (every PURGE_INTERVAL seconds, on
        every instance: the deletes are idempotent)."""
        s = self.settings
        d = self.db.run(self.store.purge, self.clock.seconds(), s.retention_days,
                        s.stats_minutes_days, s.stats_hours_days)

        def done(removed: tuple[int, int, int]) -> None:
            if any(removed):
                log.info("events: purged {events} events, {minutes} minute and {hours} hour "
                         "buckets", events=removed[0], minutes=removed[1], hours=removed[2])

        def failed(failure: Failure) -> None:
            if failure.check(DirectoryError):
                log.info("events: purge skipped: {error}", error=failure.getErrorMessage())
            else:
                log.failure("events: purge failed", failure)

        return d.addCallbacks(done, failed)


def check_settings(settings: EventsSection) -> None:
    """Refuse at start-up, in one line, [events] values we could not act on."""
    for key in ("retention_days", "stats_minutes_days", "stats_hours_days"):
        if getattr(settings, key) < 0:
            raise ConfigError(f"[events] {key} must be 0 (off) or more")
    if settings.flush_interval <= 0:
        raise ConfigError("[events] flush_interval must be more than 0")
    for key in ("batch_size", "max_pending"):
        if getattr(settings, key) < 1:
            raise ConfigError(f"[events] {key} must be 1 or more")


def enabled(settings: EventsSection) -> bool:
    """Is anything to be recorded at all (else no recorder is built)?"""
    return any(days > 0 for days in (settings.retention_days, settings.stats_minutes_days,
                                     settings.stats_hours_days))


# -- from a maillog event to rows and counts -------------------------------------------------------
Counts = list[tuple[str, str, int]]  # (metric, label, amount)


def _translate(kind: str, event: dict[str, Any]) -> tuple[list[dict[str, Any]], Counts]:
    """The ms_event rows (without their time) and statistics of one maillog event."""
    if kind == "received":
        return _received(event["entry"], int(event["size"]))
    if kind == "attempt":
        return _attempt(event)
    if kind == "dsn-queued":
        entry: QueueEntry = event["entry"]
        return [_row(entry.id, "dsn", entry.sender, action=event["action"], dsn=event["dsn"],
                     nrcpt=event["count"])], [("dsn", event["action"], 1)]
    if kind == "dsn-skipped":
        entry = event["entry"]
        return [_row(entry.id, "dsn-skipped", None, action=event["action"],
                     detail=event["detail"])], []
    if kind == "transaction":
        return [_row(event["queue_id"], "transaction", None, domain=event["domain"],
                     relay=event["relay"], tls=bool(event["tls"]),
                     tls_info=event["tls_info"] or None, reused=bool(event["reused"]),
                     accepted=event["accepted"], total=event["total"])], []
    if kind == "route-failed":
        return [_row(event["queue_id"], "route-failed", None, domain=event["domain"],
                     relay=event["relay"], detail=event["detail"])], []
    if kind in ("removed", "damaged"):
        return [_row(event["queue_id"], kind, None, detail=event.get("detail"))], []
    return [], []


def _received(entry: QueueEntry, size: int) -> tuple[list[dict[str, Any]], Counts]:
    meta = entry.meta
    listener = str(meta.get("listener") or "local")  # DSNs and other mail we make ourselves
    received = _row(entry.id, "received", entry.sender, **{"from": entry.sender}, size=size,
                    nrcpt=len(entry.recipients), client_ip=meta.get("client_ip"),
                    helo=meta.get("helo"), listener=listener, protocol=meta.get("protocol"),
                    tls=meta.get("tls"), auth_user=meta.get("auth_user"),
                    verdicts=meta.get("verdicts"), folder=meta.get("folder"))
    received["message_id"] = str(meta.get("message_id") or "")[:400] or None
    rows = [received]
    rows += [_queued(entry, rcpt) for rcpt in entry.recipients]
    return rows, [("received", listener, 1), ("received_bytes", listener, size)]


def _queued(entry: QueueEntry, rcpt: Recipient) -> dict[str, Any]:
    # Found by the address the client gave (an alias, a +tag); the attempts name the mailbox.
    return _row(entry.id, "queued", rcpt.original or rcpt.address, to=rcpt.address,
                orig_to=_original(rcpt), local=rcpt.local)


def _attempt(event: dict[str, Any]) -> tuple[list[dict[str, Any]], Counts]:
    entry: QueueEntry = event["entry"]
    rcpt: Recipient = event["rcpt"]
    result = event["result"]
    status = str(event["status"])
    detail = str(event["detail"] or "")
    remote_id = None
    if status == "sent" and not rcpt.local:
        found = _QUEUED_AS.search(detail)
        remote_id = found.group(1) if found else None
    row = _row(entry.id, status, rcpt.address, to=rcpt.address, orig_to=_original(rcpt),
               local=rcpt.local, relay=event["relay"], remote_mta=result.remote_mta or None,
               attempts=rcpt.attempts, delay=round(float(event["delay"]), 3), detail=detail,
               enhanced=result.enhanced or None, maildir=getattr(result, "path", "") or None,
               remote_id=remote_id)
    return [row], [("delivered", f"{status}/{'local' if rcpt.local else 'remote'}", 1)]


def _original(rcpt: Recipient) -> str | None:
    return rcpt.original if rcpt.original.lower() != rcpt.address.lower() else None


def _row(queue_id: str, kind: str, address: str | None, **fields: Any) -> dict[str, Any]:
    """An ms_event row; fields that are None are left out, long texts cut."""
    kept = {k: (v[:_FIELD_TEXT] if isinstance(v, str) else v)
            for k, v in fields.items() if v is not None}
    return {"queue_id": queue_id, "kind": kind, "message_id": None,
            "address": address.lower()[:320] if address else None, "fields": kept}


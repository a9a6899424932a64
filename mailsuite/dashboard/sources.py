"""Where the dashboard's figures come from, as Protocols: statistics (the plots), message events
(the trace) and DMARC / TLS-RPT report summaries. Every method is blocking SQL: the dashboard
calls them in the db pool only. A source that is None is shown as "not available" on its page.

The implementations live elsewhere (mailsuite.events: `EventStore`; mailsuite.reports:
`ReportStore`); `from_directory` builds them on the directory's store. Tests give fakes, or None.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol, Sequence

# The statistics the overview plots (names as mailsuite.events counts them; docs/design/events.md).
RECEIVED = "received"  # messages accepted into the queue, labelled by listener
DELIVERED = "delivered"  # delivery attempts per recipient, labelled "<status>/<local|remote>"
REJECTED = "rejected"  # SMTP refusals, labelled by reason
SENT_LABELS = ("sent/local", "sent/remote")
HOUR = "hour"


class StatsSource(Protocol):
    def series(self, metric: str, resolution: str, since: float, until: float,
               label: str | None = None) -> list[tuple[int, int]]:
        """(bucket start, value) for every bucket from the one holding `since` to `until`,
        zeros included; `label` None sums every label."""
        ...

    def totals(self, metric: str, resolution: str, since: float,
               until: float) -> Mapping[str, int]:
        """The metric summed per label over the range."""
        ...


class TraceEvent(Protocol):
    time: float
    queue_id: str
    kind: str  # received, queued, sent, deferred, bounced, transaction, dsn, removed...
    message_id: str | None
    address: str | None
    fields: Mapping[str, Any]


class TraceSource(Protocol):
    def find(self, queue_ids: Iterable[str] = (), message_ids: Iterable[str] = (),
             addresses: Iterable[str] = (), since: float | None = None,
             limit: int = 100) -> list[str]:
        """Queue ids with an event naming one of these, the most recent `limit`."""
        ...

    def events(self, queue_ids: Sequence[str]) -> Sequence[TraceEvent]:
        """Every event of these queue ids, in time order."""
        ...


class DmarcSummary(Protocol):
    domain: str
    source_ip: str
    messages: int
    dmarc_pass: int
    dkim_pass: int
    spf_pass: int
    reporters: str


class TlsSummary(Protocol):
    domain: str
    policy_type: str
    result_type: str
    sessions: int
    reporters: str


class ReportsSource(Protocol):
    def dmarc_summary(self, domain: str | None = None) -> Sequence[DmarcSummary]:
        ...

    def tls_summary(self, domain: str | None = None) -> Sequence[TlsSummary]:
        ...


@dataclass
class Sources:
    stats: StatsSource | None = None
    trace: TraceSource | None = None
    reports: ReportsSource | None = None


def from_directory(store: Any) -> Sources:
    """The event and report stores on the directory's database (`DirectoryStore`)."""
    from mailsuite.events import EventStore
    from mailsuite.reports.store import ReportStore

    events = EventStore(store)
    return Sources(stats=events, trace=events, reports=ReportStore(store))

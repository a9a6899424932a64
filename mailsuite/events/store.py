"""`EventStore`: the message events (`ms_event`) and statistics (`ms_stat`) in the directory's
database, synchronously: call it in the db pool (the recorder does), or from the admin command.

The read side is the API the trace command and the dashboard use:
- `find(...)`, `events(queue_ids)`: the lifecycle of messages (`mailsuite trace`);
- `series(metric, resolution, since, until, label=None)`: one counter as (bucket start, value)
  for every bucket of the range, zeros included, ready to plot;
- `totals(metric, resolution, since, until)`: the same counter summed per label (a bar chart of
  rejects by reason).
Metrics and labels are listed in docs/design/events.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from sqlalchemy import delete, func, insert, or_, select

from mailsuite.directory.models import EventRow, StatBucket
from mailsuite.directory.store import DirectoryStore

MINUTE, HOUR = "minute", "hour"
RESOLUTIONS = {MINUTE: 60, HOUR: 3600}
PURGE_CHUNK = 5000  # rows deleted per transaction: a long purge never holds the write lock long
MAX_SERIES = 100_000  # buckets one series() may return

# One statistics increment: (resolution, bucket start, metric, label, amount).
StatKey = tuple[str, int, str, str]


@dataclass(frozen=True)
class Event:
    """One row of ms_event, as the trace reads it."""

    time: float
    queue_id: str
    kind: str
    message_id: str | None
    address: str | None
    fields: dict[str, Any]


class EventStore:
    def __init__(self, directory: DirectoryStore):
        self.directory = directory

    # -- writing (the recorder, in the db pool) -----------------------------------------------
    def write(self, events: Sequence[dict[str, Any]], stats: dict[StatKey, int]) -> None:
        """Insert `events` (ms_event rows as dicts) and add `stats` to their buckets, in one
        transaction. Buckets are added to in key order, so instances writing the same buckets
        at once wait for each other instead of deadlocking."""
        with self.directory.unit(write=True) as s:
            conn = s.connection()
            if events:
                conn.execute(insert(EventRow), list(events))
            if stats:
                rows = [{"resolution": r, "bucket": b, "metric": m, "label": lbl, "value": v}
                        for (r, b, m, lbl), v in sorted(stats.items())]
                conn.execute(_upsert_add(conn.dialect.name), rows)

    def purge(self, now: float, event_days: float, minute_days: float,
              hour_days: float) -> tuple[int, int, int]:
        """Delete events and buckets older than their retention (0 days: all of them, since
        nothing of that kind is recorded); (events, minute buckets, hour buckets) removed."""
        removed_events = self._purge(EventRow, EventRow.time < now - event_days * 86400)
        minutes = self._purge(StatBucket, StatBucket.resolution == MINUTE,
                              StatBucket.bucket < now - minute_days * 86400)
        hours = self._purge(StatBucket, StatBucket.resolution == HOUR,
                            StatBucket.bucket < now - hour_days * 86400)
        return removed_events, minutes, hours

    def _purge(self, model: Any, *conditions: Any) -> int:
        total = 0
        while True:
            with self.directory.unit(write=True) as s:
                chunk = select(model.id).where(*conditions).limit(PURGE_CHUNK)
                n = s.execute(delete(model).where(model.id.in_(chunk))
                              .execution_options(synchronize_session=False)).rowcount
            total += n
            if n < PURGE_CHUNK:
                return total

    # -- the trace ----------------------------------------------------------------------------
    def find(self, queue_ids: Iterable[str] = (), message_ids: Iterable[str] = (),
             addresses: Iterable[str] = (), since: float | None = None,
             limit: int = 100) -> list[str]:
        """Queue ids with an event naming one of the queue ids, Message-IDs or addresses
        (lower-case) at or after `since`, the most recent `limit`, oldest first."""
        conditions = []
        for column, values in ((EventRow.queue_id, list(queue_ids)),
                               (EventRow.message_id, list(message_ids)),
                               (EventRow.address, [a.lower() for a in addresses])):
            if values:
                conditions.append(column.in_(values))
        if not conditions:
            return []
        query = (select(EventRow.queue_id, func.max(EventRow.time).label("last"))
                 .where(or_(*conditions)).group_by(EventRow.queue_id))
        if since is not None:
            query = query.where(EventRow.time >= since)
        with self.directory.unit() as s:
            rows = s.execute(query.order_by(func.max(EventRow.time).desc()).limit(limit)).all()
        return [queue_id for queue_id, _ in reversed(rows)]

    def events(self, queue_ids: Sequence[str]) -> list[Event]:
        """Every event of these queue ids, in time order (events of one instant: as written)."""
        if not queue_ids:
            return []
        with self.directory.unit() as s:
            rows = s.execute(select(EventRow.time, EventRow.queue_id, EventRow.kind,
                                    EventRow.message_id, EventRow.address, EventRow.fields)
                             .where(EventRow.queue_id.in_(list(queue_ids)))
                             .order_by(EventRow.time, EventRow.id)).all()
        return [Event(float(t), q, k, m, a, dict(f or {})) for t, q, k, m, a, f in rows]

    # -- statistics ---------------------------------------------------------------------------
    def series(self, metric: str, resolution: str, since: float, until: float,
               label: str | None = None) -> list[tuple[int, int]]:
        """(bucket start, value) for every bucket of `resolution` from the one holding `since`
        up to (not including) `until`, 0 where nothing was counted; `label` None sums all
        labels of the metric."""
        step = _step(resolution)
        first = int(since) - int(since) % step
        if (until - first) / step > MAX_SERIES:
            raise ValueError(f"more than {MAX_SERIES} {resolution} buckets asked for")
        query = (select(StatBucket.bucket, func.sum(StatBucket.value))
                 .where(StatBucket.resolution == resolution, StatBucket.metric == metric,
                        StatBucket.bucket >= first, StatBucket.bucket < until)
                 .group_by(StatBucket.bucket))
        if label is not None:
            query = query.where(StatBucket.label == label)
        with self.directory.unit() as s:
            found = {int(b): int(v) for b, v in s.execute(query).all()}
        return [(b, found.get(b, 0)) for b in range(first, math.ceil(until), step)]

    def totals(self, metric: str, resolution: str, since: float,
               until: float) -> dict[str, int]:
        """The metric summed per label over the buckets from the one holding `since` to
        `until`, largest first."""
        step = _step(resolution)
        first = int(since) - int(since) % step
        with self.directory.unit() as s:
            rows = s.execute(select(StatBucket.label, func.sum(StatBucket.value))
                             .where(StatBucket.resolution == resolution,
                                    StatBucket.metric == metric, StatBucket.bucket >= first,
                                    StatBucket.bucket < until)
                             .group_by(StatBucket.label)).all()
        return dict(sorted(((str(k), int(v)) for k, v in rows), key=lambda kv: (-kv[1], kv[0])))


def bucket_of(now: float, resolution: str) -> int:
    step = _step(resolution)
    return int(now) - int(now) % step


def _step(resolution: str) -> int:
    try:
        return RESOLUTIONS[resolution]
    except KeyError:
        raise ValueError(f"resolution must be one of {', '.join(RESOLUTIONS)}, "
                         f"not {resolution!r}")


def _upsert_add(dialect: str) -> Any:
    """INSERT a bucket, or add to its value if another write (this or another instance's)
    made it first: one statement, atomic on both backends."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:  # pragma: no cover - the directory supports these two
        raise ValueError(f"statistics need PostgreSQL or SQLite, not {dialect}")
    stmt = dialect_insert(StatBucket)
    return stmt.on_conflict_do_update(
        index_elements=[StatBucket.resolution, StatBucket.metric, StatBucket.label,
                        StatBucket.bucket],
        set_={"value": StatBucket.value + stmt.excluded.value})

"""What happened to each message, and how much mail went where: the message events behind
`mailsuite trace`, and the per-minute and per-hour statistics behind the dashboard's plots,
both in the SQL directory (docs/design/events.md).

- `EventRecorder` (recorder.py): listens to the mail log (mailsuite/maillog.py) and the SMTP
  server's refusals, and writes events and counts in batches in the db pool.
- `EventStore` (store.py): the tables, synchronously: the writes, the purge, and the reading
  API (`find`, `events`, `series`, `totals`).
"""
from mailsuite.events.recorder import EventRecorder, check_settings, enabled
from mailsuite.events.store import HOUR, MINUTE, Event, EventStore

__all__ = ["EventRecorder", "EventStore", "Event", "HOUR", "MINUTE", "check_settings", "enabled"]

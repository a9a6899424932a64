"""The reports address's INBOX, looked at every `[reports] scan_interval` seconds: each message
not read before is parsed and its reports stored (docs/design/reports.md, "Receiving").

Mail to the address is delivered like any other (the message stays in the mailbox); this
service only reads. Exactly once: a message is remembered by its Maildir name (without the
flags a client adds), and a report by (org_name, report_id), so the same report delivered
twice, or read by two instances at once, is stored once. Listing and reading run in the io
pool, SQL in the db pool; scans never overlap.
"""
from __future__ import annotations

import os
from typing import Any, Generator

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mailsuite.pools import WorkPool
from mailsuite.reports import ReceivedDmarc
from mailsuite.reports.inbound import MAX_MESSAGE, ReportError, reports_in_message

log = Logger()

MAX_PER_SCAN = 200  # messages read per scan; the rest wait for the next one


class ReportInbox(Service):
    """`directory` routes the address to its mailboxes, `mailstore` finds their Maildirs,
    `store` is a `ReportStore`."""

    name = "report-inbox"

    def __init__(self, address: str, directory: Any, mailstore: Any, store: Any, io: WorkPool,
                 db: WorkPool, clock: IReactorTime, interval: float):
        self.address = address
        self.directory = directory
        self.mailstore = mailstore
        self.store = store
        self.io = io
        self.db = db
        self.clock = clock
        self.interval = max(1.0, float(interval))
        self._call: IDelayedCall | None = None
        self._scan: defer.Deferred | None = None

    def startService(self) -> None:
        super().startService()
        self._call = self.clock.callLater(0, self._tick)

    def stopService(self) -> Any:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        return self._scan

    def _tick(self) -> None:
        self._scan = self.scan()
        self._scan.addErrback(lambda f: log.warn("reading reports of {address} failed: {error}",
                                                 address=self.address, error=f.value))

        def again(_: Any) -> None:
            self._scan = None
            if self.running:
                self._call = self.clock.callLater(self.interval, self._tick)

        self._scan.addBoth(again)

    @defer.inlineCallbacks
    def scan(self) -> Generator[defer.Deferred, Any, int]:
        """Read what is new; fires with the number of reports stored."""
        route = yield self.directory.route(self.address)
        stored = 0
        for mailbox in route.mailboxes:
            files = yield self.io.run(inbox_messages, self.mailstore, mailbox)
            names = yield self.db.run(self.store.unseen, list(files))
            for name in names[:MAX_PER_SCAN]:
                stored += yield self._read(name, files[name])
        return stored

    @defer.inlineCallbacks
    def _read(self, name: str, path: str) -> Any:
        try:
            reports = yield self.io.run(read_reports, path)
        except FileNotFoundError:
            return 0  # moved from new/ to cur/ meanwhile: the next scan finds it there
        except (ReportError, OSError) as e:
            log.warn("report message {name} not read: {error}", name=name, error=e)
            reports = []
        stored = 0
        now = self.clock.seconds()
        for report in reports:
            save = self.store.store_dmarc if isinstance(report, ReceivedDmarc) \
                else self.store.store_tls
            if (yield self.db.run(save, report, now)):
                stored += 1
                log.info("stored report {report_id} of {org} ({kind})", report_id=report.report_id,
                         org=report.org_name, kind=type(report).__name__)
            else:
                log.info("report {report_id} of {org} was stored before",
                         report_id=report.report_id, org=report.org_name)
        yield self.db.run(self.store.mark_seen, name, now)
        return stored


def inbox_messages(mailstore: Any, mailbox: str) -> dict[str, str]:
    """{Maildir unique name: path} of the INBOX of `mailbox` (new/ and cur/). Blocking."""
    root = mailstore.account(mailbox).path
    found: dict[str, str] = {}
    for sub in ("new", "cur"):
        directory = os.path.join(root, sub)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            continue
        for name in names:
            if not name.startswith("."):
                found[name.split(":", 1)[0]] = os.path.join(directory, name)
    return found


def read_reports(path: str) -> list:
    """The reports in one message file (at most MAX_MESSAGE octets are read). Blocking."""
    with open(path, "rb") as f:
        data = f.read(MAX_MESSAGE + 1)
    return reports_in_message(data)

"""What the server notes for the reports it sends: each inbound DMARC evaluation (the gate) and
each outbound SMTP session's TLS outcome (the courier). Called on the reactor; the SQL insert
runs in the db pool and nobody waits for it: a failed insert is logged and the message goes on
(a report is worth less than the mail it is about).
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Callable, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailsuite.pools import WorkPool
from mailsuite.reports import DmarcEvaluation, TlsOutcome
from mailsuite.trust import REJECT, JUNK, TEMPFAIL, Envelope
from mailsuite.trust.spf import identity_domain

log = Logger()


class DmarcRecorder(Protocol):
    """What the gate calls once per judged message (mailsuite/trust/gate.py)."""

    def dmarc(self, envelope: Envelope, outcome: Any) -> None:
        ...


class TlsRecorder(Protocol):
    """What the courier calls once per outbound session (mailsuite/courier/agent.py)."""

    def tls(self, domain: str, mx_host: str, address: str, result_type: str) -> None:
        ...


class ReportRecorder:
    """Both recorders over the report store. `store` is a `ReportStore` (blocking), `db` the
    pool it runs in, `clock` says which day it is."""

    def __init__(self, store: Any, db: WorkPool, clock: IReactorTime):
        self.store = store
        self.db = db
        self.clock = clock

    def dmarc(self, envelope: Envelope, outcome: Any) -> None:
        try:
            evaluation = evaluation_from(outcome, envelope, day_of(self.clock.seconds()))
        except Exception as e:  # never the message's problem: the gate's verdict stands
            log.error("DMARC outcome not recorded: {error!r}", error=e)
            return
        if evaluation is not None:
            self._run(self.store.record_dmarc, evaluation)

    def tls(self, domain: str, mx_host: str, address: str, result_type: str) -> None:
        self._run(self.store.record_tls, TlsOutcome(day_of(self.clock.seconds()), domain.lower(),
                                                    mx_host.lower(), address, result_type))

    def _run(self, fn: Callable[..., Any], value: Any) -> None:
        d = self.db.run(fn, value)
        d.addErrback(lambda f: log.warn("report data not recorded: {error}", error=f.value))


def evaluation_from(outcome: Any, envelope: Envelope, day: str) -> DmarcEvaluation | None:
    """The report row of one gate outcome (`trust.checks.AuthOutcome`), or None when there is
    nobody to report to (no DMARC record) or nothing was decided (a temporary error: the sender
    will try again, and that attempt is the one counted)."""
    dmarc = getattr(outcome, "dmarc", None)
    if dmarc is None or dmarc.keyword not in ("pass", "fail") or not dmarc.record_domain:
        return None
    if outcome.disposition == TEMPFAIL:
        return None
    disposition = {REJECT: "reject", JUNK: "quarantine"}.get(outcome.disposition, "none")
    spf = next((r for r in outcome.results if r.method == "spf"), None)
    dkim = []
    for r in outcome.results:
        properties = dict(r.properties)
        if r.method == "dkim" and properties.get("header.d"):
            dkim.append((properties["header.d"].lower()[:253], properties.get("header.s", "")[:63],
                         r.result))
    spf_domain = identity_domain(spf) if spf is not None else ""
    scope = "helo" if spf is not None and "smtp.helo" in dict(spf.properties) else "mfrom"
    return DmarcEvaluation(
        day=day, policy_domain=dmarc.record_domain, header_from=dmarc.domain,
        envelope_from=spf_domain or envelope.helo.lower()[:253], source_ip=envelope.client_ip,
        disposition=disposition, dkim="pass" if dmarc.dkim_aligned else "fail",
        spf="pass" if dmarc.spf_aligned else "fail",
        reason="sampled_out" if dmarc.sampled_out else "", dkim_results=tuple(dkim[:10]),
        spf_result=(spf_domain, scope, _spf_keyword(spf.result if spf else "none")))


def _spf_keyword(result: str) -> str:
    """SPF results as RFC 7489's SPFResultType spells them ("policy" has no place there)."""
    return result if result in ("none", "neutral", "pass", "fail", "softfail", "temperror",
                                "permerror") else "neutral"


def day_of(seconds: float) -> str:
    """The UTC day of a Unix time, as the report tables store it."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d")


def day_range(day: str) -> tuple[int, int]:
    """First and last second of a UTC day."""
    start = int(datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=timezone.utc).timestamp())
    return start, start + 86399


def yesterday(seconds: float | None = None) -> str:
    return day_of((time.time() if seconds is None else seconds) - 86400)

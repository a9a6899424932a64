"""The SQL side of reports (tables at the end of directory/models.py). Blocking: the server runs
every method in the db pool, the admin command calls them directly. Each method is one unit of
work of the directory's store, so SQLite writers take the write lock up front.

Exactly once without locks: a received report is stored under the unique (org_name, report_id),
a report we send under the unique claim (kind, domain, day); whoever inserts first wins, on
SQLite and PostgreSQL alike, and the loser learns it from the constraint.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

from sqlalchemy import delete, func, insert, select
from sqlalchemy.exc import IntegrityError

from mailsuite.directory.models import (DmarcEvaluation as EvaluationRow, DmarcRecord,
                                        DmarcReport, ReportClaim, ReportMessage,
                                        TlsReport, TlsResult, TlsSession)
from mailsuite.directory.records import DirectoryError
from mailsuite.directory.store import DirectoryStore
from mailsuite.reports import DmarcEvaluation, ReceivedDmarc, ReceivedTls, TlsOutcome
from mailsuite.reports.outbound import DmarcRow, TlsRow


@dataclass(frozen=True)
class DmarcSummary:
    """Per source address of one domain: what `mailsuite reports dmarc` prints."""

    domain: str
    source_ip: str
    messages: int
    dmarc_pass: int  # aligned DKIM or aligned SPF passed
    dkim_pass: int
    spf_pass: int
    reporters: str  # the organisations that reported it, comma-separated


@dataclass(frozen=True)
class TlsSummary:
    """Per (policy domain, policy type, result): what `mailsuite reports tls` prints."""

    domain: str
    policy_type: str
    result_type: str
    sessions: int
    reporters: str


class ReportStore:
    def __init__(self, directory: DirectoryStore):
        self.directory = directory

    def _unit(self, write: bool = False) -> Any:
        return self.directory._unit(write=write)  # the directory's unit of work (store.py)

    # -- what we record for the reports we send ------------------------------------------------
    def record_dmarc(self, evaluation: DmarcEvaluation) -> None:
        e = evaluation
        with self._unit(write=True) as s:
            s.execute(insert(EvaluationRow).values(
                day=e.day, policy_domain=e.policy_domain, header_from=e.header_from,
                envelope_from=e.envelope_from, source_ip=e.source_ip,
                disposition=e.disposition, dkim=e.dkim, spf=e.spf, reason=e.reason,
                dkim_results=json.dumps([list(r) for r in e.dkim_results])[:2000],
                spf_result=json.dumps(list(e.spf_result))[:400]))

    def record_tls(self, outcome: TlsOutcome) -> None:
        o = outcome
        with self._unit(write=True) as s:
            s.execute(insert(TlsSession).values(day=o.day, policy_domain=o.policy_domain,
                                                mx_host=o.mx_host, receiving_ip=o.receiving_ip,
                                                result_type=o.result_type))

    def dmarc_day(self, day: str) -> dict[str, list[DmarcRow]]:
        """Policy domain -> its rows of that day, identical evaluations counted together."""
        t = EvaluationRow
        columns = (t.policy_domain, t.source_ip, t.disposition, t.dkim, t.spf, t.reason,
                   t.header_from, t.envelope_from, t.dkim_results, t.spf_result)
        out: dict[str, list[DmarcRow]] = defaultdict(list)
        with self._unit() as s:
            for row in s.execute(select(*columns, func.count()).where(t.day == day)
                                 .group_by(*columns).order_by(*columns)):
                (domain, ip, disposition, dkim, spf, reason, header_from, envelope_from,
                 dkim_results, spf_result, count) = row
                out[domain].append(DmarcRow(
                    ip, count, disposition, dkim, spf, reason, header_from, envelope_from,
                    tuple(tuple(r) for r in json.loads(dkim_results)),
                    tuple(json.loads(spf_result))))
        return dict(out)

    def tls_day(self, day: str) -> dict[str, list[TlsRow]]:
        t = TlsSession
        columns = (t.policy_domain, t.mx_host, t.receiving_ip, t.result_type)
        out: dict[str, list[TlsRow]] = defaultdict(list)
        with self._unit() as s:
            for domain, mx, ip, result, count in s.execute(
                    select(*columns, func.count()).where(t.day == day).group_by(*columns)
                    .order_by(*columns)):
                out[domain].append(TlsRow(mx, ip, result, count))
        return dict(out)

    def purge(self, before_day: str) -> None:
        """Forget evaluations, sessions and claims of days before `before_day`."""
        with self._unit(write=True) as s:
            s.execute(delete(EvaluationRow).where(EvaluationRow.day < before_day))
            s.execute(delete(TlsSession).where(TlsSession.day < before_day))
            s.execute(delete(ReportClaim).where(ReportClaim.day < before_day))

    def claim(self, kind: str, domain: str, day: str, now: float) -> bool:
        """True when this caller is the one to send (kind, domain, day)."""
        return self._insert_once(lambda s: s.execute(insert(ReportClaim).values(
            kind=kind, domain=domain, day=day, claimed_at=int(now))))

    def release(self, kind: str, domain: str, day: str) -> None:
        """Give a claim back: its report could not be queued, a later run may try again."""
        with self._unit(write=True) as s:
            s.execute(delete(ReportClaim).where(ReportClaim.kind == kind,
                                                ReportClaim.domain == domain,
                                                ReportClaim.day == day))

    # -- the reports we receive -----------------------------------------------------------------
    def unseen(self, names: Iterable[str]) -> list[str]:
        """The Maildir names among `names` not read before."""
        wanted = list(names)
        seen: set[str] = set()
        with self._unit() as s:
            for start in range(0, len(wanted), 500):
                seen.update(s.scalars(select(ReportMessage.name).where(
                    ReportMessage.name.in_(wanted[start:start + 500]))))
        return [n for n in wanted if n not in seen]

    def mark_seen(self, name: str, now: float) -> None:
        self._insert_once(lambda s: s.execute(insert(ReportMessage).values(
            name=name[:255], seen_at=int(now))))

    def store_dmarc(self, report: ReceivedDmarc, now: float) -> bool:
        """False when this (org_name, report_id) is stored already (delivered twice)."""
        def add(s: Any) -> None:
            rid = s.execute(insert(DmarcReport).values(
                org_name=report.org_name, report_id=report.report_id, email=report.email[:320],
                domain=report.domain, policy=report.policy, date_begin=report.begin,
                date_end=report.end, received_at=int(now)).returning(DmarcReport.id)).scalar()
            if report.records:
                s.execute(insert(DmarcRecord), [dict(
                    report_id=rid, source_ip=r.source_ip, count=r.count,
                    disposition=r.disposition, dkim=r.dkim, spf=r.spf,
                    header_from=r.header_from, envelope_from=r.envelope_from,
                    auth_results=r.auth_results) for r in report.records])

        return self._insert_once(add)

    def store_tls(self, report: ReceivedTls, now: float) -> bool:
        def add(s: Any) -> None:
            rid = s.execute(insert(TlsReport).values(
                org_name=report.org_name, report_id=report.report_id,
                contact=report.contact[:320], date_begin=report.begin, date_end=report.end,
                received_at=int(now)).returning(TlsReport.id)).scalar()
            if report.results:
                s.execute(insert(TlsResult), [dict(
                    report_id=rid, policy_type=r.policy_type, policy_domain=r.policy_domain,
                    result_type=r.result_type, sending_mta_ip=r.sending_mta_ip,
                    receiving_mx_hostname=r.receiving_mx_hostname, sessions=r.sessions)
                    for r in report.results])

        return self._insert_once(add)

    def dmarc_summary(self, domain: str | None = None) -> list[DmarcSummary]:
        r, rep = DmarcRecord, DmarcReport
        passed = ((r.dkim == "pass") | (r.spf == "pass"))
        query = (select(rep.domain, r.source_ip, func.sum(r.count),
                        func.sum(_when(passed, r.count)), func.sum(_when(r.dkim == "pass", r.count)),
                        func.sum(_when(r.spf == "pass", r.count)))
                 .join(rep, rep.id == r.report_id).group_by(rep.domain, r.source_ip)
                 .order_by(rep.domain, r.source_ip))
        rows, reporters = self._summary(
            query.where(rep.domain == domain.lower()) if domain else query,
            select(rep.domain, r.source_ip, rep.org_name).join(rep, rep.id == r.report_id))
        return [DmarcSummary(d, ip, int(total), int(ok), int(dkim), int(spf), reporters(d, ip))
                for d, ip, total, ok, dkim, spf in rows]

    def tls_summary(self, domain: str | None = None) -> list[TlsSummary]:
        t, rep = TlsResult, TlsReport
        keys = (t.policy_domain, t.policy_type, t.result_type)
        query = select(*keys, func.sum(t.sessions)).group_by(*keys).order_by(*keys)
        rows, reporters = self._summary(
            query.where(t.policy_domain == domain.lower()) if domain else query,
            select(t.policy_domain, t.result_type, rep.org_name).join(rep, rep.id == t.report_id))
        return [TlsSummary(d, kind, result, int(n), reporters(d, result))
                for d, kind, result, n in rows]

    # -- helpers --------------------------------------------------------------------------------
    def _summary(self, query: Any, who: Any) -> tuple[list[Any], Any]:
        """The rows of `query`, and reporters(a, b): the organisations that reported (a, b),
        comma-separated, from `who` (rows of a, b, org_name)."""
        out: dict[tuple[str, str], set[str]] = defaultdict(set)
        with self._unit() as s:
            rows = s.execute(query).all()
            for a, b, org in s.execute(who.distinct()):
                out[(a, b)].add(org)
        return rows, lambda a, b: ", ".join(sorted(out.get((a, b), ())))

    def _insert_once(self, work: Any) -> bool:
        """Run `work` in a writing unit; False when a unique constraint refused it (someone
        inserted the same key first)."""
        try:
            with self._unit(write=True) as s:
                work(s)
        except DirectoryError as e:  # the store turns IntegrityError into this
            if isinstance(e.__context__, IntegrityError):
                return False
            raise
        return True


def _when(condition: Any, value: Any) -> Any:
    from sqlalchemy import case

    return case((condition, value), else_=0)

"""SQLAlchemy 2 models of the directory: Domain, User, Alias, Sender, the inbound-trust state
shared by every instance (greylist triplets, auto-whitelisted networks, rate windows), and the
message events and statistics (docs/design/events.md).

Addresses are stored in canonical form (lower-case, A-label domain) so that lookups are plain
equality on an indexed column, on SQLite and PostgreSQL alike (no dialect-specific collations).
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Double, Float, ForeignKey, Index,
                        Integer, String, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


# Bump with every change to the tables below, and migrate in database.py (MIGRATIONS).
# 1: domains, users, aliases. 2: ms_sender (extra sender addresses of a user).
# 3: ms_greylist, ms_greylist_pass, ms_rate (docs/design/trust-limits.md).
# 4: ms_login_failure (the login throttle's counts, docs/design/limits.md).
# 5: ms_event, ms_stat (docs/design/events.md).
SCHEMA_VERSION = 5


class SchemaInfo(Base):
    """One row: the version of the directory schema this database holds."""

    __tablename__ = "ms_schema"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)


class Domain(Base):
    __tablename__ = "ms_domain"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(253), unique=True, nullable=False)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                              nullable=False)

    users: Mapped[list["User"]] = relationship(back_populates="domain", passive_deletes=True)
    aliases: Mapped[list["Alias"]] = relationship(back_populates="domain", passive_deletes=True)


class User(Base):
    __tablename__ = "ms_user"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # 64 octets of local part + @ + 253 of domain (RFC 5321 §4.5.3.1); 320 leaves room for UTF-8.
    address: Mapped[str] = mapped_column(String(320), unique=True, nullable=False)
    password_hash: Mapped[str] = mapped_column(String(512), nullable=False)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, nullable=False)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                              nullable=False)
    domain_id: Mapped[int] = mapped_column(ForeignKey("ms_domain.id", ondelete="CASCADE"),
                                           nullable=False, index=True)

    domain: Mapped[Domain] = relationship(back_populates="users")


class Alias(Base):
    """One (source, target) pair: a source with several targets has several rows.

    source is a canonical address of a hosted domain or `@domain` (catch-all); target is any
    valid address, local or remote (a remote local part keeps its case).
    """

    __tablename__ = "ms_alias"
    __table_args__ = (
        UniqueConstraint("source", "target", name="uq_ms_alias_source_target"),
        Index("ix_ms_alias_target", "target"),  # reverse look-ups for sender_addresses()
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(320), nullable=False, index=True)
    target: Mapped[str] = mapped_column(String(320), nullable=False)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                              nullable=False)
    domain_id: Mapped[int] = mapped_column(ForeignKey("ms_domain.id", ondelete="CASCADE"),
                                           nullable=False, index=True)

    domain: Mapped[Domain] = relationship(back_populates="aliases")


class Sender(Base):
    """An extra address a user may send as (submission MAIL FROM and From:), for shared
    mailboxes: a full address, or `@domain` for every address of that domain."""

    __tablename__ = "ms_sender"
    __table_args__ = (
        UniqueConstraint("user_id", "address", name="uq_ms_sender_user_address"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("ms_user.id", ondelete="CASCADE"),
                                         nullable=False, index=True)
    address: Mapped[str] = mapped_column(String(320), nullable=False)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                              nullable=False)


# -- inbound trust (docs/design/trust-limits.md) --------------------------------------------------
# Times are integer Unix seconds from the server's clock (the reactor), not datetimes: the
# arithmetic (delay, windows, expiry) is then the same plain integer comparison on every backend.

class GreylistEntry(Base):
    """One (client network, sender, recipient) triplet seen by MX.

    network: the client's /24 (IPv4) or /64 (IPv6); sender: lower-case, "<>" for the null
    reverse-path; recipient: lower-case. passed_at: when a retry was accepted (None: pending).
    expires: when the row may be purged (pending: first_seen + retry_window; passed: last_seen +
    pass_ttl)."""

    __tablename__ = "ms_greylist"
    __table_args__ = (
        UniqueConstraint("network", "sender", "recipient", name="uq_ms_greylist_triplet"),
        Index("ix_ms_greylist_expires", "expires"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    network: Mapped[str] = mapped_column(String(64), nullable=False)
    sender: Mapped[str] = mapped_column(String(320), nullable=False)
    recipient: Mapped[str] = mapped_column(String(320), nullable=False)
    first_seen: Mapped[int] = mapped_column(BigInteger, nullable=False)
    last_seen: Mapped[int] = mapped_column(BigInteger, nullable=False)
    passed_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    expires: Mapped[int] = mapped_column(BigInteger, nullable=False)


class GreylistPass(Base):
    """A client network that retried a greylisted triplet: it passes until `expires`."""

    __tablename__ = "ms_greylist_pass"
    __table_args__ = (Index("ix_ms_greylist_pass_expires", "expires"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    network: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    expires: Mapped[int] = mapped_column(BigInteger, nullable=False)


class RateWindow(Base):
    """One fixed window of one rate counter, e.g. key "mx-conn:192.0.2.1", window_start a
    multiple of the window's length, window_end = window_start + that length."""

    __tablename__ = "ms_rate"
    __table_args__ = (
        UniqueConstraint("key", "window_start", name="uq_ms_rate_key_window"),
        Index("ix_ms_rate_window_end", "window_end"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(400), nullable=False)
    window_start: Mapped[int] = mapped_column(BigInteger, nullable=False)
    window_end: Mapped[int] = mapped_column(BigInteger, nullable=False)
    count: Mapped[int] = mapped_column(Integer, nullable=False)


class LoginFailure(Base):
    """One count of the login throttle, shared by every instance (docs/design/limits.md,
    "Login throttle"): kind "p" per (source, login), "s" per source, "u" per login name; the
    unused part is "". A count is forgotten when `expires` (last failure + window) is past."""

    __tablename__ = "ms_login_failure"
    __table_args__ = (
        UniqueConstraint("kind", "source", "login", name="uq_ms_login_failure_key"),
        Index("ix_ms_login_failure_expires", "expires"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(1), nullable=False)
    source: Mapped[str] = mapped_column(String(64), nullable=False)
    login: Mapped[str] = mapped_column(String(320), nullable=False)
    count: Mapped[int] = mapped_column(Integer, nullable=False)
    last: Mapped[float] = mapped_column(Float, nullable=False)
    expires: Mapped[float] = mapped_column(Float, nullable=False)


# -- DMARC and TLS reports (docs/design/reports.md) ------------------------------------------------
# New tables only: create_all() in prepare() makes them on an existing database, no migration.
# Days are "YYYY-MM-DD" in UTC, times integer Unix seconds (as for the trust tables above).

class DmarcEvaluation(Base):
    """One inbound message's DMARC evaluation, for the aggregate report to its policy domain.
    One row per message (summed when the report is built), so instances never update a row."""

    __tablename__ = "ms_dmarc_eval"
    __table_args__ = (Index("ix_ms_dmarc_eval_day_domain", "day", "policy_domain"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    day: Mapped[str] = mapped_column(String(10), nullable=False)
    policy_domain: Mapped[str] = mapped_column(String(253), nullable=False)
    header_from: Mapped[str] = mapped_column(String(253), nullable=False)
    envelope_from: Mapped[str] = mapped_column(String(253), nullable=False)
    source_ip: Mapped[str] = mapped_column(String(45), nullable=False)
    disposition: Mapped[str] = mapped_column(String(10), nullable=False)  # none|quarantine|reject
    dkim: Mapped[str] = mapped_column(String(4), nullable=False)  # aligned DKIM: pass|fail
    spf: Mapped[str] = mapped_column(String(4), nullable=False)  # aligned SPF: pass|fail
    reason: Mapped[str] = mapped_column(String(20), nullable=False, default="")  # sampled_out
    # Raw results as JSON: [[domain, selector, result], ...] and [domain, scope, result].
    dkim_results: Mapped[str] = mapped_column(String(2000), nullable=False)
    spf_result: Mapped[str] = mapped_column(String(400), nullable=False)


class TlsSession(Base):
    """One outbound SMTP session to a recipient domain and how its TLS went (RFC 8460 §4.3)."""

    __tablename__ = "ms_tls_session"
    __table_args__ = (Index("ix_ms_tls_session_day_domain", "day", "policy_domain"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    day: Mapped[str] = mapped_column(String(10), nullable=False)
    policy_domain: Mapped[str] = mapped_column(String(253), nullable=False)
    mx_host: Mapped[str] = mapped_column(String(253), nullable=False)
    receiving_ip: Mapped[str] = mapped_column(String(45), nullable=False)
    result_type: Mapped[str] = mapped_column(String(40), nullable=False)  # "success" or a failure


class ReportClaim(Base):
    """Who sends the report of (kind, domain, day): the instance whose insert wins."""

    __tablename__ = "ms_report_claim"
    __table_args__ = (UniqueConstraint("kind", "domain", "day", name="uq_ms_report_claim"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(10), nullable=False)  # "dmarc" | "tlsrpt"
    domain: Mapped[str] = mapped_column(String(253), nullable=False)
    day: Mapped[str] = mapped_column(String(10), nullable=False)
    claimed_at: Mapped[int] = mapped_column(BigInteger, nullable=False)


class ReportMessage(Base):
    """A message of the reports mailbox already read (its Maildir name without flags)."""

    __tablename__ = "ms_report_message"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True, nullable=False)
    seen_at: Mapped[int] = mapped_column(BigInteger, nullable=False)


class DmarcReport(Base):
    """An aggregate report received from another organisation (RFC 7489 appendix C)."""

    __tablename__ = "ms_dmarc_report"
    __table_args__ = (UniqueConstraint("org_name", "report_id", name="uq_ms_dmarc_report"),
                      Index("ix_ms_dmarc_report_domain", "domain"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_name: Mapped[str] = mapped_column(String(255), nullable=False)
    report_id: Mapped[str] = mapped_column(String(255), nullable=False)
    email: Mapped[str] = mapped_column(String(320), nullable=False)
    domain: Mapped[str] = mapped_column(String(253), nullable=False)  # policy_published domain
    policy: Mapped[str] = mapped_column(String(10), nullable=False)  # p=
    date_begin: Mapped[int] = mapped_column(BigInteger, nullable=False)
    date_end: Mapped[int] = mapped_column(BigInteger, nullable=False)
    received_at: Mapped[int] = mapped_column(BigInteger, nullable=False)


class DmarcRecord(Base):
    """One <record> of a received aggregate report."""

    __tablename__ = "ms_dmarc_record"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("ms_dmarc_report.id", ondelete="CASCADE"),
                                           nullable=False, index=True)
    source_ip: Mapped[str] = mapped_column(String(45), nullable=False)
    count: Mapped[int] = mapped_column(BigInteger, nullable=False)
    disposition: Mapped[str] = mapped_column(String(10), nullable=False)
    dkim: Mapped[str] = mapped_column(String(10), nullable=False)
    spf: Mapped[str] = mapped_column(String(10), nullable=False)
    header_from: Mapped[str] = mapped_column(String(253), nullable=False)
    envelope_from: Mapped[str] = mapped_column(String(253), nullable=False)
    auth_results: Mapped[str] = mapped_column(String(2000), nullable=False)  # as the sender said


class TlsReport(Base):
    """A TLS-RPT report received from another organisation (RFC 8460 §4)."""

    __tablename__ = "ms_tlsrpt_report"
    __table_args__ = (UniqueConstraint("org_name", "report_id", name="uq_ms_tlsrpt_report"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_name: Mapped[str] = mapped_column(String(255), nullable=False)
    report_id: Mapped[str] = mapped_column(String(255), nullable=False)
    contact: Mapped[str] = mapped_column(String(320), nullable=False)
    date_begin: Mapped[int] = mapped_column(BigInteger, nullable=False)
    date_end: Mapped[int] = mapped_column(BigInteger, nullable=False)
    received_at: Mapped[int] = mapped_column(BigInteger, nullable=False)


class TlsResult(Base):
    """Sessions of one policy of a received TLS-RPT report with one result: "success" (the
    summary's successful sessions) or a failure's result-type with its details."""

    __tablename__ = "ms_tlsrpt_result"
    __table_args__ = (Index("ix_ms_tlsrpt_result_domain", "policy_domain"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("ms_tlsrpt_report.id", ondelete="CASCADE"),
                                           nullable=False, index=True)
    policy_type: Mapped[str] = mapped_column(String(20), nullable=False)
    policy_domain: Mapped[str] = mapped_column(String(253), nullable=False)
    result_type: Mapped[str] = mapped_column(String(40), nullable=False)
    sending_mta_ip: Mapped[str] = mapped_column(String(45), nullable=False, default="")
    receiving_mx_hostname: Mapped[str] = mapped_column(String(253), nullable=False, default="")
    sessions: Mapped[int] = mapped_column(BigInteger, nullable=False)


# -- message events and statistics (docs/design/events.md) ----------------------------------------
# Written in batches by mailsuite/events (one unit of work per batch, in the db pool); times are
# Unix seconds from the server's clock, as floats: events of one message a few ms apart must keep
# their order.

class EventRow(Base):
    """One event in the life of a message: received, queued (one per recipient), sent, deferred,
    bounced, transaction, route-failed, dsn, removed... `address` is the one address the event
    is about (the sender of received, the recipient of an attempt), lower-case, for `mailsuite
    trace ADDRESS`; `message_id` is set on received only; the rest is in `fields`."""

    __tablename__ = "ms_event"
    __table_args__ = (
        Index("ix_ms_event_queue_id", "queue_id"),
        Index("ix_ms_event_message_id", "message_id"),
        Index("ix_ms_event_address", "address"),
        Index("ix_ms_event_time", "time"),
    )

    # BIGINT for PostgreSQL; on SQLite only INTEGER PRIMARY KEY is the auto-numbered rowid.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True)
    time: Mapped[float] = mapped_column(Double, nullable=False)
    queue_id: Mapped[str] = mapped_column(String(40), nullable=False)
    kind: Mapped[str] = mapped_column(String(20), nullable=False)
    message_id: Mapped[str | None] = mapped_column(String(400), nullable=True)
    address: Mapped[str | None] = mapped_column(String(320), nullable=True)
    fields: Mapped[dict] = mapped_column(JSON, nullable=False)


class StatBucket(Base):
    """One counter of one time bucket: e.g. ("minute", 1764496800, "delivered", "sent/local").
    Every instance adds to the same row (INSERT ... ON CONFLICT DO UPDATE value = value + n)."""

    __tablename__ = "ms_stat"
    __table_args__ = (
        UniqueConstraint("resolution", "metric", "label", "bucket", name="uq_ms_stat_key"),
        Index("ix_ms_stat_bucket", "resolution", "bucket"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True)
    resolution: Mapped[str] = mapped_column(String(6), nullable=False)  # "minute" | "hour"
    bucket: Mapped[int] = mapped_column(BigInteger, nullable=False)  # its start, Unix seconds
    metric: Mapped[str] = mapped_column(String(40), nullable=False)
    label: Mapped[str] = mapped_column(String(60), nullable=False)
    value: Mapped[int] = mapped_column(BigInteger, nullable=False)


# -- dashboard administrators (docs/design/admin-web.md) -------------------------------------------
# A new table only: create_all() in prepare() makes it on an existing database, no migration.

class AdminAccount(Base):
    """Who may log in to the admin web dashboard. Not a mail user: no mailbox, no domain, and a
    mail user's password never opens the dashboard."""

    __tablename__ = "ms_admin"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    password_hash: Mapped[str] = mapped_column(String(512), nullable=False)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                              nullable=False)

"""`DirectoryStore`: the synchronous directory (SQLAlchemy), used by the admin CLI directly and by
the asynchronous `Directory` through its thread pools.

Every method is one unit of work with its own Session and returns plain data. Nothing is cached
between calls, so a change made by the CLI (another process) is seen by a running server at its
next look-up.

Routing rules (`route`), in order, for `local@domain` of a hosted domain:
1. an exact alias source `local@domain` (aliases win over a user of the same address, as Postfix's
   virtual_alias_maps do; list the address itself among the targets to keep a copy);
2. a user `local@domain` (disabled users still receive mail: disabling stops logins only);
3. `postmaster@domain` (RFC 5321 §4.5.1) when neither exists: `[server] admin_address`; if that
   is empty, the oldest user of that domain, else the oldest user of any domain;
4. with a subaddress `base+tag@domain` (RFC 5233), rules 1-3 for `base@domain`;
5. the catch-all `@domain`.
Targets are expanded recursively with the same rules (nested aliases, tags, catch-alls), at most
`MAX_DEPTH` levels; an address met again on the way (a cycle) contributes its mailbox if it is a
user and nothing otherwise, so cycles terminate. Duplicates are collapsed, order of first
appearance kept.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator

from sqlalchemy import (bindparam, create_engine, delete, event, func, insert, or_, select,
                        text, update)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import (ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError,
                            SQLAlchemyError)
from sqlalchemy.orm import Session
from twisted.logger import Logger

from mailsuite.directory import passwords
from mailsuite.directory.addresses import (alias_source, canonical_address, loose_split,
                                           mailbox_address, normalize_domain, split_address,
                                           strip_tag)
from mailsuite.directory.models import (SCHEMA_VERSION, Alias, Base, Domain, GreylistEntry,
                                        GreylistPass, RateWindow, SchemaInfo,
                                        Sender, User)
from mailsuite.directory.records import (GREYLIST_EARLY, GREYLIST_NEW, GREYLIST_RETRIED,
                                         GREYLIST_WHITELISTED, AliasInfo, DirectoryError,
                                         DirectoryUnavailable, DomainInfo, GreylistCounts,
                                         GreylistOutcome, RateCounter, RateOutcome, Route,
                                         UserInfo)

log = Logger()

MAX_DEPTH = 20  # nesting levels of aliases followed before giving up
MAX_ADDRESSES = 1000  # distinct addresses expanded for one recipient (Postfix's limit too)
SQLITE_BUSY_TIMEOUT_MS = 10_000
MAX_PASSWORD = 1024  # octets (UTF-8) of a password set through the directory
MAX_HASH = 512  # characters of a stored hash (the column's size)

_PASSWORD_RECORD = (select(User.address, User.password_hash, User.enabled)
                    .where(User.address == bindparam("address")))


class DirectoryStore:
    """Synchronous access to domains, users and aliases in the database at `url`.

    `create_dir`: for a SQLite file whose directory does not exist, create it (the default
    database under data_dir) or refuse with one line (any other path: a typo in a URL must not
    silently start an empty directory). `from_config` decides which."""

    def __init__(self, url: str, admin_address: str = "", create_dir: bool = True):
        self.url = url
        self.admin_address = admin_address.strip()
        self.engine = _make_engine(url, create_dir)
        database = self.engine.url.database or ""
        self._new_sqlite_file = (self.engine.url.get_backend_name() == "sqlite"
                                 and database not in ("", ":memory:")
                                 and not os.path.exists(database))

    @classmethod
    def from_config(cls, config: Any) -> "DirectoryStore":
        """The store of a Config: only the default database (`<data_dir>/mailsuite.db`, also
        when spelt out in [database] url) may have its directory created."""
        return cls(config.database_url, admin_address=config.server.admin_address,
                   create_dir=_is_default_database(config))

    def close(self) -> None:
        self.engine.dispose()

    # -- schema -------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the tables that do not exist yet and check the schema version (idempotent;
        run at every start-up and by every CLI command)."""
        try:
            self._create_tables()
        except DirectoryUnavailable:
            # The server and a CLI command creating a fresh database at the same moment: one
            # of the two CREATE TABLEs loses; the tables exist now.
            time.sleep(0.5)
            self._create_tables()
        with self._unit() as s:
            version = s.scalar(select(SchemaInfo.version).where(SchemaInfo.id == 1))
        if version is None:
            with self._unit(write=True) as s:
                if s.scalar(select(SchemaInfo.version).where(SchemaInfo.id == 1)) is None:
                    s.add(SchemaInfo(id=1, version=SCHEMA_VERSION))
        elif version > SCHEMA_VERSION:
            raise DirectoryError(f"the database has directory schema version {version}, newer "
                                 f"than this mailsuite knows ({SCHEMA_VERSION}): upgrade mailsuite")
        elif version < SCHEMA_VERSION:
            self._migrate(version)
        self._give_sqlite_file_to_data_owner()

    def _migrate(self, version: int) -> None:
        """Bring a database of an older schema version up to SCHEMA_VERSION, one step at a
        time, each step in one transaction with its version bump (a concurrent start-up that
        migrated first makes the bump match no row, and this one stops)."""
        while version < SCHEMA_VERSION:
            with self._unit(write=True) as s:
                MIGRATIONS[version](s)
                bumped = s.execute(update(SchemaInfo)
                                   .where(SchemaInfo.id == 1, SchemaInfo.version == version)
                                   .values(version=version + 1)).rowcount
            if not bumped:
                return
            log.info("directory schema upgraded from version {old} to {new}", old=version,
                     new=version + 1)
            version += 1

    def _give_sqlite_file_to_data_owner(self) -> None:
        """`mailsuite user add` run as root must not leave a root-owned database behind that the
        server, running as an unprivileged user (twistd --uid), can no longer write."""
        path = self.engine.url.database if self.engine.url.get_backend_name() == "sqlite" else ""
        if not path or path == ":memory:" or path.startswith("file:"):
            return
        if self._new_sqlite_file:
            self._new_sqlite_file = False
            try:
                os.chmod(path, 0o600)  # password hashes: nobody else's business
            except OSError:
                pass
        if os.geteuid() != 0:
            return
        try:
            owner = os.stat(os.path.dirname(os.path.abspath(path)))
            if owner.st_uid == 0:
                return
            for name in (path, path + "-wal", path + "-shm"):
                if os.path.exists(name) and os.stat(name).st_uid == 0:
                    os.chown(name, owner.st_uid, owner.st_gid)
        except OSError as e:
            log.warn("could not hand {path} to the data directory's owner: {error}", path=path,
                     error=e.strerror)

    def _create_tables(self) -> None:
        with _translate_errors(self.url):
            Base.metadata.create_all(self.engine)

    # -- domains ------------------------------------------------------------------------------
    def add_domain(self, name: str) -> str:
        domain = normalize_domain(name)
        with self._unit(write=True) as s:
            if s.scalar(select(Domain.id).where(Domain.name == domain)) is not None:
                raise DirectoryError(f"domain {domain} already exists")
            s.add(Domain(name=domain))
        return domain

    def list_domains(self) -> list[DomainInfo]:
        with self._unit() as s:
            users = (select(User.domain_id, func.count().label("n")).group_by(User.domain_id)
                     .subquery())
            aliases = (select(Alias.domain_id, func.count(func.distinct(Alias.source)).label("n"))
                       .group_by(Alias.domain_id).subquery())
            rows = s.execute(
                select(Domain.name, Domain.created, func.coalesce(users.c.n, 0),
                       func.coalesce(aliases.c.n, 0))
                .outerjoin(users, users.c.domain_id == Domain.id)
                .outerjoin(aliases, aliases.c.domain_id == Domain.id)
                .order_by(Domain.name)).all()
        return [DomainInfo(name, _aware(created), int(nu), int(na))
                for name, created, nu, na in rows]

    def remove_domain(self, name: str, force: bool = False) -> tuple[int, int]:
        """Remove a domain; (users removed, alias sources removed). Refuses while it still has users
        or aliases, unless `force`. Mail on disk is left alone."""
        domain = normalize_domain(name)
        with self._unit(write=True) as s:
            domain_id = self._domain_id(s, domain)
            users = s.scalar(select(func.count()).where(User.domain_id == domain_id)) or 0
            aliases = s.scalar(select(func.count(func.distinct(Alias.source)))
                               .where(Alias.domain_id == domain_id)) or 0
            if (users or aliases) and not force:
                raise DirectoryError(
                    f"domain {domain} still has {_plural(users, 'user')} and "
                    f"{_plural(aliases, 'alias', 'aliases')}; remove them first or use --force")
            # Explicit deletes: SQLite enforces ON DELETE CASCADE only with foreign_keys=ON,
            # which a database opened by another tool may not have.
            s.execute(delete(Alias).where(Alias.domain_id == domain_id))
            s.execute(delete(Sender).where(Sender.user_id.in_(
                select(User.id).where(User.domain_id == domain_id))))
            s.execute(delete(User).where(User.domain_id == domain_id))
            s.execute(delete(Domain).where(Domain.id == domain_id))
        return users, aliases

    def is_hosted(self, name: str) -> bool:
        try:
            domain = normalize_domain(name)
        except DirectoryError:
            return False
        with self._read() as s:
            return s.scalar(select(Domain.id).where(Domain.name == domain)) is not None

    # -- users --------------------------------------------------------------------------------
    def add_user(self, address: str, password: str | None = None,
                 password_hash: str | None = None) -> str:
        """Create a user with a password, or with an existing hash (an import from Dovecot or
        another server: any scheme `passwords.verify_password` knows, rehashed at first login).

        The address must be able to name a Maildir (`addresses.mailbox_address`)."""
        canonical = mailbox_address(address)
        if password_hash is None:
            _check_password(password or "")
            password_hash = passwords.hash_password(password)  # outside the transaction: slow
        elif password is not None:
            raise DirectoryError("give either a password or a password hash")
        else:
            password_hash = _check_hash(password_hash)
        domain = canonical.rpartition("@")[2]
        with self._unit(write=True) as s:
            domain_id = self._domain_id(s, domain)
            if s.scalar(select(User.id).where(User.address == canonical)) is not None:
                raise DirectoryError(f"user {canonical} already exists")
            s.add(User(address=canonical, password_hash=password_hash, domain_id=domain_id))
        return canonical

    def check_new_user(self, address: str) -> str:
        """Refuse now what add_user would refuse (bad address, unknown domain, duplicate), so
        that the CLI does not prompt for a password in vain."""
        canonical = mailbox_address(address)
        with self._unit() as s:
            self._domain_id(s, canonical.rpartition("@")[2])
            if s.scalar(select(User.id).where(User.address == canonical)) is not None:
                raise DirectoryError(f"user {canonical} already exists")
        return canonical

    def require_user(self, address: str) -> str:
        """The canonical address of an existing user, or DirectoryError saying what is wrong."""
        canonical = canonical_address(address)
        with self._unit() as s:
            if s.scalar(select(User.id).where(User.address == canonical)) is None:
                raise DirectoryError(self._no_user(s, canonical))
        return canonical

    def list_users(self, domain: str | None = None) -> list[UserInfo]:
        with self._unit() as s:
            query = select(User.address, User.enabled, User.created).order_by(User.address)
            if domain is not None:
                query = query.where(User.domain_id == self._domain_id(s, normalize_domain(domain)))
            rows = s.execute(query).all()
        return [UserInfo(address, bool(enabled), _aware(created))
                for address, enabled, created in rows]

    def get_user(self, address: str) -> UserInfo | None:
        canonical = canonical_address(address)
        with self._read() as s:
            row = s.execute(select(User.address, User.enabled, User.created)
                            .where(User.address == canonical)).first()
        return UserInfo(row[0], bool(row[1]), _aware(row[2])) if row else None

    def user_exists(self, address: str) -> bool:
        try:
            return self.get_user(address) is not None
        except DirectoryUnavailable:
            raise
        except DirectoryError:
            return False

    def remove_user(self, address: str) -> str:
        """Remove a user (aliases pointing at it stay, and so does its Maildir)."""
        canonical = canonical_address(address)
        with self._unit(write=True) as s:
            s.execute(delete(Sender).where(Sender.user_id.in_(
                select(User.id).where(User.address == canonical))))
            if not s.execute(delete(User).where(User.address == canonical)).rowcount:
                raise DirectoryError(self._no_user(s, canonical))
        return canonical

    def set_password(self, address: str, password: str) -> str:
        canonical = canonical_address(address)
        _check_password(password)
        return self._update_user(canonical, password_hash=passwords.hash_password(password))

    def set_password_hash(self, address: str, password_hash: str) -> str:
        """Store an existing hash as is (import from Dovecot or another server)."""
        canonical = canonical_address(address)
        return self._update_user(canonical, password_hash=_check_hash(password_hash))

    def set_enabled(self, address: str, enabled: bool) -> str:
        return self._update_user(canonical_address(address), enabled=enabled)

    def _update_user(self, canonical: str, **values: Any) -> str:
        """Set columns of one user; an unknown user is a DirectoryError saying why."""
        with self._unit(write=True) as s:
            result = s.execute(update(User).where(User.address == canonical).values(**values))
            if not result.rowcount:
                raise DirectoryError(self._no_user(s, canonical))
        return canonical

    # -- passwords (for Directory.authenticate; hashing itself happens in the caller) ----------
    def password_record(self, address: str) -> tuple[str, str, bool] | None:
        """(canonical address, stored hash, enabled) of a user, or None."""
        parts = loose_split(address)
        if parts is None:
            return None
        canonical = "@".join(parts)
        # Every login runs this: one prepared SELECT on a bare connection, without the ORM
        # Session's setup (a quarter of the CPU; docs/design/directory.md, "Login cache").
        with _translate_errors(self.url):
            with self.engine.connect() as conn:
                row = conn.execute(_PASSWORD_RECORD, {"address": canonical}).first()
        return (row[0], row[1], bool(row[2])) if row else None

    def replace_password_hash(self, address: str, old_hash: str, new_hash: str) -> bool:
        """Swap in a rehashed password unless it was changed meanwhile (compare-and-set: a
        `mailsuite user passwd` racing with a login must win)."""
        with self._unit(write=True) as s:
            result = s.execute(update(User)
                               .where(User.address == address, User.password_hash == old_hash)
                               .values(password_hash=new_hash))
            return bool(result.rowcount)

    # -- aliases ------------------------------------------------------------------------------
    def add_alias(self, source: str, targets: list[str]) -> AliasInfo:
        """Add source -> each target. The source must be in a hosted domain (or `@domain`, a
        catch-all); targets are any valid addresses, local or remote."""
        canonical_source, domain = alias_source(source)
        if not targets:
            raise DirectoryError(f"alias {canonical_source} needs at least one target")
        with self._unit(write=True) as s:
            domain_id = s.scalar(select(Domain.id).where(Domain.name == domain))
            if domain_id is None:
                raise DirectoryError(f"alias source {canonical_source} is not in a hosted domain "
                                     f"(add it with: mailsuite domain add {domain})")
            hosted = set(s.scalars(select(Domain.name)))
            canonical_targets: list[str] = []
            for target in targets:
                if isinstance(target, str) and target.strip().startswith("@"):
                    raise DirectoryError(f"invalid alias target {target!r}: a target is a full "
                                         "address")
                local, target_domain = split_address(target)
                canonical = (f"{local.lower()}@{target_domain}" if target_domain in hosted
                             else f"{local}@{target_domain}")
                if canonical == canonical_source and s.scalar(
                        select(User.id).where(User.address == canonical)) is None:
                    # A user's own address among the targets means "keep a copy"; anything
                    # else pointing at itself is a mistake.
                    raise DirectoryError(f"alias {canonical_source} cannot point to itself")
                if canonical not in canonical_targets:
                    canonical_targets.append(canonical)
            existing = set(s.scalars(select(Alias.target).where(
                Alias.source == canonical_source, Alias.target.in_(canonical_targets))))
            if existing:
                raise DirectoryError(f"alias {canonical_source} -> {sorted(existing)[0]} "
                                     "already exists")
            for canonical in canonical_targets:
                s.add(Alias(source=canonical_source, target=canonical, domain_id=domain_id))
        return AliasInfo(canonical_source, tuple(canonical_targets))

    def list_aliases(self, domain: str | None = None) -> list[AliasInfo]:
        with self._unit() as s:
            query = select(Alias.source, Alias.target).order_by(Alias.source, Alias.id)
            if domain is not None:
                query = query.where(Alias.domain_id == self._domain_id(s, normalize_domain(domain)))
            rows = s.execute(query).all()
        grouped: dict[str, list[str]] = {}
        for source, target in rows:
            grouped.setdefault(source, []).append(target)
        return [AliasInfo(source, tuple(targets)) for source, targets in grouped.items()]

    def remove_alias(self, source: str, targets: list[str] | None = None) -> int:
        """Remove the given targets of `source` (all of them when none are given); the number of
        rows removed. Every named target must exist."""
        canonical_source, _domain = alias_source(source)
        with self._unit(write=True) as s:
            rows = dict(s.execute(select(Alias.target, Alias.id)
                                  .where(Alias.source == canonical_source)).all())
            if not rows:
                raise DirectoryError(f"no alias {canonical_source}")
            if not targets:
                ids = list(rows.values())
            else:
                by_lower = {t.lower(): i for t, i in rows.items()}
                ids = []
                for target in targets:
                    key = target.strip()
                    found = rows.get(key, by_lower.get(key.lower()))
                    if found is None:
                        raise DirectoryError(f"alias {canonical_source} has no target {key}")
                    ids.append(found)
            s.execute(delete(Alias).where(Alias.id.in_(ids)))
        return len(set(ids))

    # -- extra sender addresses (shared mailboxes) --------------------------------------------
    def add_sender(self, user: str, address: str) -> tuple[str, str]:
        """Let `user` also send as `address` (a full address, or `@domain` for all of a
        domain's addresses); (canonical user, canonical address)."""
        canonical_user = canonical_address(user)
        sender = _sender_form(address)
        with self._unit(write=True) as s:
            user_id = self._user_id(s, canonical_user)
            if s.scalar(select(Sender.id).where(Sender.user_id == user_id,
                                                Sender.address == sender)) is not None:
                raise DirectoryError(f"{canonical_user} may already send as {sender}")
            s.add(Sender(user_id=user_id, address=sender))
        return canonical_user, sender

    def remove_sender(self, user: str, address: str) -> tuple[str, str]:
        canonical_user = canonical_address(user)
        sender = _sender_form(address)
        with self._unit(write=True) as s:
            user_id = self._user_id(s, canonical_user)
            if not s.execute(delete(Sender).where(Sender.user_id == user_id,
                                                  Sender.address == sender)).rowcount:
                raise DirectoryError(f"{canonical_user} has no extra sender address {sender}")
        return canonical_user, sender

    def _user_id(self, s: Any, canonical_user: str) -> int:
        user_id = s.scalar(select(User.id).where(User.address == canonical_user))
        if user_id is None:
            raise DirectoryError(self._no_user(s, canonical_user))
        return user_id

    def list_senders(self, user: str | None = None) -> list[tuple[str, str]]:
        """(user, extra sender address) pairs, of one user or of everyone."""
        with self._unit() as s:
            query = (select(User.address, Sender.address).join(User, User.id == Sender.user_id)
                     .order_by(User.address, Sender.address))
            if user is not None:
                canonical_user = canonical_address(user)
                if s.scalar(select(User.id).where(User.address == canonical_user)) is None:
                    raise DirectoryError(self._no_user(s, canonical_user))
                query = query.where(User.address == canonical_user)
            return [(u, a) for u, a in s.execute(query).all()]

    # -- look-ups for the protocols --------------------------------------------------------
    def route(self, address: str) -> Route:
        """Where mail for `address` goes (see the module docstring for the rules)."""
        with self._read() as s:
            return _Resolver(s, self.admin_address).route(address)

    def sender_addresses(self, user: str) -> frozenset[str]:
        """The user's own address, every non-catch-all alias source that reaches it, and the
        extra sender addresses the admin gave it (`user sender add`), where `@domain` means any
        address of that domain: test a candidate with `addresses.sender_allowed`."""
        parts = loose_split(user)
        if parts is None:
            return frozenset()
        canonical = "@".join(parts)
        with self._read() as s:
            resolver = _Resolver(s, self.admin_address)
            candidates = _reverse_sources(s, canonical)
            found = {canonical}
            for source in candidates:
                if canonical in resolver.route(source).mailboxes:
                    found.add(source)
            found.update(s.scalars(select(Sender.address).join(User, User.id == Sender.user_id)
                                   .where(User.address == canonical)))
        return frozenset(found)

    # -- inbound trust state: greylist and rate windows (docs/design/trust-limits.md) ---------
    def greylist_check(self, network: str, sender: str, recipient: str, now: float, delay: int,
                       retry_window: int, pass_ttl: int) -> GreylistOutcome:
        """Decide one (client network, sender, recipient) triplet at time `now` and record it.

        Passes when the network is whitelisted, or when the triplet was first seen at least
        `delay` seconds ago and less than `retry_window` ago (then the network is whitelisted
        until now + pass_ttl); otherwise records the triplet and says how long to wait. Safe
        when several instances decide the same new triplet at once (docs/design/trust-limits.md,
        "Atomicity")."""
        now = int(now)
        network = _trust_text(network, 64)
        sender = _trust_text(sender, 320).lower() or "<>"
        recipient = _trust_text(recipient, 320).lower()
        with self._unit(write=True) as s:
            expires = s.scalar(select(GreylistPass.expires)
                               .where(GreylistPass.network == network))
            if expires is not None and expires > now:
                if expires - now < pass_ttl / 2:  # keep a network that keeps sending (one write
                    _whitelist(s, network, now + pass_ttl)  # per half pass_ttl at most)
                return GreylistOutcome(True, GREYLIST_WHITELISTED)
            triplet = (GreylistEntry.network == network, GreylistEntry.sender == sender,
                       GreylistEntry.recipient == recipient)
            for _attempt in range(3):
                row = s.execute(select(GreylistEntry.first_seen, GreylistEntry.passed_at,
                                       GreylistEntry.expires).where(*triplet)).first()
                if row is None:
                    if _insert_new(s, GreylistEntry, network=network, sender=sender,
                                   recipient=recipient, first_seen=now, last_seen=now,
                                   passed_at=None, expires=now + retry_window):
                        return GreylistOutcome(False, GREYLIST_NEW, max(1, delay))
                    continue  # another instance inserted it meanwhile: read its row
                first_seen, passed_at, row_expires = row
                if row_expires <= now:  # forgotten: not retried in time, or passed long ago
                    s.execute(update(GreylistEntry).where(*triplet).values(
                        first_seen=now, last_seen=now, passed_at=None,
                        expires=now + retry_window).execution_options(synchronize_session=False))
                    return GreylistOutcome(False, GREYLIST_NEW, max(1, delay))
                if passed_at is not None or now - first_seen >= delay:
                    s.execute(update(GreylistEntry).where(*triplet).values(
                        last_seen=now, passed_at=passed_at if passed_at is not None else now,
                        expires=now + pass_ttl).execution_options(synchronize_session=False))
                    _whitelist(s, network, now + pass_ttl)
                    return GreylistOutcome(True, GREYLIST_RETRIED)
                s.execute(update(GreylistEntry).where(*triplet).values(last_seen=now)
                          .execution_options(synchronize_session=False))
                return GreylistOutcome(False, GREYLIST_EARLY, max(1, first_seen + delay - now))
        raise DirectoryUnavailable("greylist: the triplet row kept changing under us")

    def greylist_counts(self, now: float) -> GreylistCounts:
        now = int(now)
        with self._unit() as s:
            live = GreylistEntry.expires > now
            pending = s.scalar(select(func.count()).where(live, GreylistEntry.passed_at.is_(None)))
            passed = s.scalar(select(func.count()).where(live,
                                                         GreylistEntry.passed_at.is_not(None)))
            whitelisted = s.scalar(select(func.count()).where(GreylistPass.expires > now))
        return GreylistCounts(int(pending or 0), int(passed or 0), int(whitelisted or 0))

    def rate_hit(self, key: str, window_seconds: int, limit: int, now: float,
                 cost: int = 1) -> RateOutcome:
        """Count `cost` hits of `key` in the fixed window of `window_seconds` holding `now`,
        unless that would take the window past `limit` (then nothing is counted).

        One conditional UPDATE does check and increment at once, so instances sharing the
        database never let a window past its limit; the first hit of a window inserts its row,
        and an insert that loses a race to another instance's is retried as the UPDATE."""
        now = int(now)
        window_seconds = max(1, int(window_seconds))
        start = now - now % window_seconds
        end = start + window_seconds
        key = _trust_text(key, 400)
        with self._unit(write=True) as s:
            window = (RateWindow.key == key, RateWindow.window_start == start)
            for _attempt in range(3):
                counted = s.execute(
                    update(RateWindow).where(*window, RateWindow.count + cost <= limit)
                    .values(count=RateWindow.count + cost)
                    .execution_options(synchronize_session=False)).rowcount
                count = s.scalar(select(RateWindow.count).where(*window))
                if counted:
                    return RateOutcome(True, int(count), limit)
                if count is not None:
                    return RateOutcome(False, int(count), limit, end - now)
                if cost > limit:
                    return RateOutcome(False, 0, limit, end - now)
                if _insert_new(s, RateWindow, key=key, window_start=start, window_end=end,
                               count=cost):
                    return RateOutcome(True, cost, limit)
        raise DirectoryUnavailable(f"rate counter {key}: the window row kept changing under us")

    def rate_counters(self, now: float) -> list[RateCounter]:
        """The windows that have not ended at `now`, by key."""
        with self._unit() as s:
            rows = s.execute(select(RateWindow.key, RateWindow.window_start,
                                    RateWindow.window_end, RateWindow.count)
                             .where(RateWindow.window_end > int(now))
                             .order_by(RateWindow.key, RateWindow.window_start)).all()
        return [RateCounter(k, int(a), int(b), int(c)) for k, a, b, c in rows]

    def rate_reset(self, key: str) -> int:
        """Forget every window of `key` (the admin lifting a limit early); rows removed."""
        with self._unit(write=True) as s:
            return s.execute(delete(RateWindow).where(RateWindow.key == key)).rowcount

    def purge_trust(self, now: float) -> tuple[int, int, int]:
        """Delete expired greylist triplets, whitelisted networks and ended rate windows;
        (triplets, networks, windows) removed."""
        now = int(now)
        with self._unit(write=True) as s:
            triplets = s.execute(delete(GreylistEntry).where(GreylistEntry.expires <= now))
            networks = s.execute(delete(GreylistPass).where(GreylistPass.expires <= now))
            windows = s.execute(delete(RateWindow).where(RateWindow.window_end <= now))
            return triplets.rowcount, networks.rowcount, windows.rowcount

    # -- change notifications (mailsuite/notify.py) -------------------------------------------
    @property
    def notifies(self) -> bool:
        """Whether the database carries change notifications (PostgreSQL LISTEN/NOTIFY)."""
        return self.engine.url.get_backend_name() == "postgresql"

    def notify(self, items: list[tuple[str, str]]) -> None:
        """NOTIFY each (channel, payload) pair, in one transaction (delivered at its commit);
        nothing on a database without notifications (SQLite)."""
        if not self.notifies or not items:
            return
        with _translate_errors(self.url):
            with self.engine.begin() as conn:
                for channel, payload in items:
                    conn.execute(text("SELECT pg_notify(:channel, :payload)"),
                                 {"channel": channel, "payload": payload})

    def listen_connection(self) -> Any:
        """A new driver-level (psycopg) connection in autocommit mode, outside the pool, for a
        LISTEN loop in a thread of its own (mailsuite/notify.py). The caller closes it."""
        with _translate_errors(self.url):
            proxied = self.engine.raw_connection()
            conn = proxied.driver_connection
            proxied.detach()  # its own, for good: never handed back to the pool
            conn.autocommit = True
            return conn

    def unit(self, write: bool = False) -> Any:
        """`_unit` for the parts that keep tables of their own in this database
        (mailsuite/events): the same transactions, SQLite locking and one-line errors."""
        return self._unit(write)

    def read(self) -> Any:
        """`_read` for those parts: a read-only unit on a bare Connection."""
        return self._read()

    # -- helpers ------------------------------------------------------------------------------
    @contextmanager
    def _unit(self, write: bool = False) -> Iterator[Session]:
        """One unit of work: a Session in a transaction, committed on success.

        On SQLite a writing unit starts with BEGIN IMMEDIATE: it waits (busy_timeout) for the
        write lock up front instead of failing half-way when the server and the CLI write at once.
        """
        with _translate_errors(self.url):
            with self.engine.connect() as conn:
                if write:
                    conn.execution_options(mailsuite_write=True)
                with Session(bind=conn, expire_on_commit=False) as session:
                    with session.begin():
                        yield session

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read-only unit on a bare Connection in one transaction: the look-ups every message
        and login makes (route, sender addresses, hosted domains) skip the ORM Session's setup,
        most of their CPU (docs/design/directory.md, "Look-ups without the ORM")."""
        with _translate_errors(self.url):
            with self.engine.connect() as conn:
                with conn.begin():
                    yield conn

    @staticmethod
    def _domain_id(s: Session, domain: str) -> int:
        domain_id = s.scalar(select(Domain.id).where(Domain.name == domain))
        if domain_id is None:
            raise DirectoryError(f"unknown domain {domain}")
        return domain_id

    @staticmethod
    def _no_user(s: Session, canonical: str) -> str:
        domain = canonical.rpartition("@")[2]
        if s.scalar(select(Domain.id).where(Domain.name == domain)) is None:
            return f"unknown domain {domain}"
        return f"no user {canonical}"


class _Resolver:
    """Routing within one read unit; memoises look-ups for the duration of one call only."""

    def __init__(self, session: Session | Connection, admin_address: str):
        self.s = session
        self.admin_address = admin_address
        self._hosted: dict[str, bool] = {}
        self._users: dict[str, bool] = {}
        self._targets: dict[str, list[str]] = {}

    def route(self, address: str) -> Route:
        text = address.strip()
        if text.startswith("<") and text.endswith(">"):
            text = text[1:-1]
        if text.lower() == "postmaster":
            # RFC 5321 §4.5.1: "RCPT TO:<Postmaster>" without a domain must be accepted.
            out = _Targets()
            self._postmaster(None, frozenset({"postmaster"}), 0, out)
            return Route("postmaster", True, tuple(out.mailboxes), tuple(out.remote))
        parts = loose_split(text)
        if parts is None:
            return Route(text, False)
        local, domain = parts
        if not self.hosted(domain):
            original_local = text.rpartition("@")[0]
            return Route(f"{original_local}@{domain}", False)
        canonical = f"{local}@{domain}"
        out = _Targets()
        self._expand(canonical, frozenset(), 0, out)
        return Route(canonical, True, tuple(out.mailboxes), tuple(out.remote))

    # Look-ups -------------------------------------------------------------------------------
    def hosted(self, domain: str) -> bool:
        if domain not in self._hosted:
            self._hosted[domain] = self.s.scalar(
                select(Domain.id).where(Domain.name == domain)) is not None
        return self._hosted[domain]

    def is_user(self, address: str) -> bool:
        if address not in self._users:
            self._users[address] = self.s.scalar(
                select(User.id).where(User.address == address)) is not None
        return self._users[address]

    def targets(self, source: str) -> list[str]:
        if source not in self._targets:
            self._targets[source] = list(self.s.scalars(
                select(Alias.target).where(Alias.source == source).order_by(Alias.id)))
        return self._targets[source]

    # Expansion ------------------------------------------------------------------------------
    def _expand(self, address: str, visiting: frozenset[str], depth: int, out: "_Targets") -> None:
        parts = loose_split(address)
        if parts is None:
            return
        local, domain = parts
        if not self.hosted(domain):
            out.remote[address] = None
            return
        address = f"{local}@{domain}"
        if address in out.done:
            return  # already expanded in this call: its targets are in `out` (keeps DAGs linear)
        out.done.add(address)
        if depth > MAX_DEPTH or len(out.done) > MAX_ADDRESSES:
            log.warn("alias expansion stopped at {address}: more than {depth} levels or "
                     "{count} addresses", address=address, depth=MAX_DEPTH, count=MAX_ADDRESSES)
            return
        if self._expand_exact(address, visiting, depth, out):
            return
        base = strip_tag(local)
        if base and self._expand_exact(f"{base}@{domain}", visiting | {address}, depth, out):
            return
        catch_all = "@" + domain
        if catch_all not in visiting and self.targets(catch_all):
            self._expand_targets(catch_all, self.targets(catch_all),
                                 visiting | {address, catch_all}, depth, out)

    def _expand_exact(self, address: str, visiting: frozenset[str], depth: int,
                      out: "_Targets") -> bool:
        """Rules 1-3 for exactly `address`; False when none applies."""
        targets = self.targets(address)
        if targets:
            self._expand_targets(address, targets, visiting | {address}, depth, out)
            return True
        if self.is_user(address):
            out.mailboxes[address] = None
            return True
        local, _, domain = address.rpartition("@")
        if local == "postmaster":
            return self._postmaster(domain, visiting | {address}, depth, out)
        return False

    def _expand_targets(self, source: str, targets: list[str], visiting: frozenset[str],
                        depth: int, out: "_Targets") -> None:
        for target in targets:
            parts = loose_split(target)
            if parts is None:
                continue
            canonical = "@".join(parts) if self.hosted(parts[1]) else target
            if canonical in visiting:
                # A cycle (or an alias listing its own address to keep a copy): deliver to the
                # mailbox if there is one, and do not follow it again.
                if self.is_user(canonical):
                    out.mailboxes[canonical] = None
                continue
            self._expand(canonical, visiting, depth + 1, out)

    def _postmaster(self, domain: str | None, visiting: frozenset[str], depth: int,
                    out: "_Targets") -> bool:
        """The implicit postmaster: admin_address, else the oldest user of the domain, else the
        oldest user of any domain."""
        target = self.admin_address
        if target and loose_split(target) is None:
            log.warn("[server] admin_address {address!r} is not an address: ignored",
                     address=target)
            target = ""
        if not target:
            query = select(User.address).order_by(User.created, User.id).limit(1)
            if domain is not None:
                target = self.s.scalar(query.join(Domain).where(Domain.name == domain)) or ""
            target = target or self.s.scalar(query) or ""
        if not target:
            return False
        before = len(out.mailboxes) + len(out.remote)
        self._expand_targets("postmaster", [target], visiting, depth, out)
        return len(out.mailboxes) + len(out.remote) > before


class _Targets:
    """Ordered sets (dicts) of the mailboxes and remote addresses found so far."""

    def __init__(self) -> None:
        self.mailboxes: dict[str, None] = {}
        self.remote: dict[str, None] = {}
        self.done: set[str] = set()


def _reverse_sources(s: Session | Connection, user: str) -> list[str]:
    """Alias sources that may reach `user`: a superset, confirmed by forward routing afterwards.

    Walks alias rows backwards from the user: rows whose target is the address or a +tag form of
    it; through a catch-all `@domain`, every row whose target is in that domain.
    """
    seen: set[str] = {user}
    frontier = [user]
    candidates: list[str] = []
    while frontier and len(seen) < 10_000:
        address = frontier.pop()
        if address.startswith("@"):
            condition = Alias.target.like("%" + _like_escape(address), escape="\\")
        else:
            local, _, domain = address.rpartition("@")
            condition = or_(
                func.lower(Alias.target) == address,
                func.lower(Alias.target).like(_like_escape(local) + "+%@" + _like_escape(domain),
                                              escape="\\"))
        for source in s.scalars(select(Alias.source).where(condition).distinct()):
            if source in seen:
                continue
            seen.add(source)
            frontier.append(source)
            if not source.startswith("@"):
                candidates.append(source)
    return sorted(candidates)


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _aware(value: datetime) -> datetime:
    # SQLite has no time zones: what went in as UTC comes back naive.
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def _check_password(password: str) -> None:
    if not password:
        raise DirectoryError("empty password refused")
    try:
        size = len(password.encode("utf-8"))
    except UnicodeEncodeError:
        raise DirectoryError("password is not valid UTF-8")
    if size > MAX_PASSWORD:
        raise DirectoryError(f"password longer than {MAX_PASSWORD} octets refused")
    if any(c in password for c in "\r\n\0"):
        raise DirectoryError("password must not contain line breaks or NUL characters")


def _check_hash(password_hash: str) -> str:
    password_hash = (password_hash or "").strip()
    if len(password_hash) > MAX_HASH or not password_hash.isprintable() or \
            not passwords.is_known_hash(password_hash):
        raise DirectoryError("unrecognised password hash (expected e.g. $argon2id$..., $2y$..., "
                             "$6$..., or Dovecot's {SHA512-CRYPT}$6$..., {SSHA512}...)")
    return password_hash


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


MIGRATIONS = {
    # 1 -> 2: the ms_sender table, which create_all() in prepare() has just created.
    1: lambda session: None,
    # 2 -> 3: ms_greylist, ms_greylist_pass, ms_rate (new tables only, created the same way).
    2: lambda session: None,
    # 3 -> 4: ms_login_failure (a new table only, created the same way).
    3: lambda session: None,
    # 4 -> 5: ms_event, ms_stat (new tables only).
    4: lambda session: None,
}


def _trust_text(value: Any, size: int) -> str:
    """A key column's value: a string, cut to the column's size (a client's address can be
    anything it makes up; the column must not overflow on PostgreSQL)."""
    return (value if isinstance(value, str) else str(value))[:size]


def _insert_new(s: Session, model: Any, **values: Any) -> bool:
    """Insert one row in a savepoint; False if a unique constraint says another transaction
    (another instance) inserted it first: the caller reads that row instead."""
    try:
        with s.begin_nested():
            s.execute(insert(model).values(**values))
        return True
    except IntegrityError:
        return False


def _whitelist(s: Session, network: str, expires: int) -> None:
    """Let `network` pass greylisting until `expires` (insert or update, race-safe)."""
    for _attempt in range(3):
        if s.execute(update(GreylistPass).where(GreylistPass.network == network)
                     .values(expires=expires)
                     .execution_options(synchronize_session=False)).rowcount:
            return
        if _insert_new(s, GreylistPass, network=network, expires=expires):
            return


def _sender_form(address: str) -> str:
    """Canonical form of an extra sender address: `@domain` or a full address, lower-case."""
    text = address.strip() if isinstance(address, str) else ""
    if text.startswith("@"):
        return "@" + normalize_domain(text[1:])
    local, domain = split_address(text)
    return f"{local.lower()}@{domain}"


def _is_default_database(config: Any) -> bool:
    default = "sqlite:///" + os.path.join(config.data_dir, "mailsuite.db")
    if config.database_url == default:
        return True
    try:
        parsed = make_url(config.database_url)
    except ArgumentError:
        return False
    return (parsed.get_backend_name() == "sqlite" and bool(parsed.database)
            and os.path.abspath(parsed.database) == os.path.join(config.data_dir, "mailsuite.db"))


def _make_engine(url: str, create_dir: bool = True) -> Engine:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        raise DirectoryError(f"invalid database URL {url!r}")
    try:
        if parsed.get_backend_name() == "sqlite":
            database = parsed.database or ""
            if database and database != ":memory:" and not database.startswith("file:"):
                directory = os.path.dirname(os.path.abspath(database))
                if not create_dir and not os.path.isdir(directory):
                    raise DirectoryError(f"the directory {directory} of the SQLite database does "
                                         "not exist (create it, or correct the URL)")
                try:
                    os.makedirs(directory, mode=0o700, exist_ok=True)
                except (OSError, ValueError) as e:
                    raise DirectoryError(f"cannot create {directory}: "
                                         f"{getattr(e, 'strerror', None) or e}")
            engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
            event.listen(engine, "connect", _sqlite_connect)
            event.listen(engine, "begin", _sqlite_begin)
            return engine
        return create_engine(parsed, pool_pre_ping=True, pool_size=5, max_overflow=5)
    except NoSuchModuleError:
        raise DirectoryError(f"unsupported database URL {parsed.render_as_string()!r} "
                             "(use sqlite:///PATH or postgresql+psycopg://...)")
    except (ArgumentError, ValueError, TypeError) as e:
        raise DirectoryError(f"invalid database URL {parsed.render_as_string()!r}: "
                             f"{_first_line(e)}")
    except ImportError as e:
        raise DirectoryError(f"database driver missing for {parsed.drivername}: {e}")


def _sqlite_connect(dbapi_connection, _record) -> None:
    # Autocommit at the driver level, so that _sqlite_begin decides how transactions start.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL: readers (the server) never block the writer (the CLI) and vice versa.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable across application crashes in WAL mode
    cursor.close()


def _sqlite_begin(conn) -> None:
    write = conn.get_execution_options().get("mailsuite_write")
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


@contextmanager
def _translate_errors(url: str) -> Iterator[None]:
    """Database failures become one-line DirectoryErrors (DirectoryUnavailable when temporary)."""
    try:
        yield
    except IntegrityError as e:
        # Lost a race with a concurrent writer (two `user add` at once): same message as the check.
        raise DirectoryError(f"conflicting change in the database: {_first_line(e.orig)}")
    except DBAPIError as e:
        raise DirectoryUnavailable(f"database {_safe_url(url)}: {_first_line(e.orig)}")
    except (SQLAlchemyError, OSError) as e:
        # Pool exhausted, connection invalidated mid-transaction, a file the driver cannot
        # open: the environment, not the request (docs/design/directory.md, "Faults").
        raise DirectoryUnavailable(f"database {_safe_url(url)}: {_first_line(e)}")


def _safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(invalid URL)"


def _first_line(error: BaseException | None) -> str:
    text = str(error).strip() if error is not None else "error"
    return text.splitlines()[0] if text else type(error).__name__

"""`DirectoryStore`: the synchronous directory (SQLAlchemy), used by the admin CLI directly and by
the asynchronous `Directory` through its thread pools.

Every method is one unit of work with its own Session and returns plain data. Nothing is cached
between calls, so a change made by the CLI (another process) is seen by a running server at its
next look-up. This module holds domains, users, passwords, aliases and extra senders; its bases
hold the rest: the connection, units of work, schema and notifications (`database.py`) and the
shared greylist and rate tables (`trusttables.py`). Routing rules are in `routing.py`.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.orm import Session

from mailsuite.directory import passwords
from mailsuite.directory.addresses import (alias_source, canonical_address, loose_split,
                                           mailbox_address, normalize_domain, split_address)
from mailsuite.directory.database import Prepared, is_default_database, translate_errors
from mailsuite.directory.models import Alias, Domain, Sender, User
from mailsuite.directory.records import (AliasInfo, DirectoryError, DirectoryUnavailable,
                                         DomainInfo, Route, UserInfo)
from mailsuite.directory.routing import Resolver, reverse_sources
from mailsuite.directory.trusttables import TrustTables

MAX_PASSWORD = 1024  # octets (UTF-8) of a password set through the directory
MAX_HASH = 512  # characters of a stored hash (the column's size)

_PASSWORD_RECORD = (select(User.address, User.password_hash, User.enabled)
                    .where(User.address == bindparam("address")))
_EXTRA_SENDERS = Prepared(select(Sender.address).join(User, User.id == Sender.user_id)
                          .where(User.address == bindparam("address")))


class DirectoryStore(TrustTables):
    """Synchronous access to domains, users and aliases in the database at `url`.

    `create_dir`: for a SQLite file whose directory does not exist, create it (the default
    database under data_dir) or refuse with one line (any other path: a typo in a URL must not
    silently start an empty directory). `from_config` decides which."""

    def __init__(self, url: str, admin_address: str = "", create_dir: bool = True):
        super().__init__(url, create_dir)
        self.admin_address = admin_address.strip()

    @classmethod
    def from_config(cls, config: Any) -> "DirectoryStore":
        """The store of a Config: only the default database (`<data_dir>/mailsuite.db`, also
        when spelt out in [database] url) may have its directory created."""
        return cls(config.database_url, admin_address=config.server.admin_address,
                   create_dir=is_default_database(config))

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
        with translate_errors(self.url):
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
        """Where mail for `address` goes (the rules: routing.py's docstring)."""
        with self._lookup() as s:
            return Resolver(s, self.admin_address).route(address)

    def sender_addresses(self, user: str) -> frozenset[str]:
        """The user's own address, every non-catch-all alias source that reaches it, and the
        extra sender addresses the admin gave it (`user sender add`), where `@domain` means any
        address of that domain: test a candidate with `addresses.sender_allowed`."""
        parts = loose_split(user)
        if parts is None:
            return frozenset()
        canonical = "@".join(parts)
        with self._lookup() as s:
            resolver = Resolver(s, self.admin_address)
            candidates = reverse_sources(s, canonical)
            found = {canonical}
            for source in candidates:
                if canonical in resolver.route(source).mailboxes:
                    found.add(source)
            found.update(s.scalars(_EXTRA_SENDERS, {"address": canonical}))
        return frozenset(found)

    # -- helpers ------------------------------------------------------------------------------
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


def _sender_form(address: str) -> str:
    """Canonical form of an extra sender address: `@domain` or a full address, lower-case."""
    text = address.strip() if isinstance(address, str) else ""
    if text.startswith("@"):
        return "@" + normalize_domain(text[1:])
    local, domain = split_address(text)
    return f"{local.lower()}@{domain}"

"""Routing: where mail for an address goes (`Resolver`), and which alias sources may reach a user
(`reverse_sources`), within one read unit of `DirectoryStore` (docs/design/directory.md,
"Routing").

Routing rules (`DirectoryStore.route`), in order, for `local@domain` of a hosted domain:
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

from sqlalchemy import String, bindparam, cast, func, literal, null, or_, select, union_all
from twisted.logger import Logger

from mailsuite.directory.addresses import loose_split, strip_tag
from mailsuite.directory.database import Prepared, RawReader
from mailsuite.directory.models import Alias, Domain, User
from mailsuite.directory.records import Route

log = Logger()

MAX_DEPTH = 20  # nesting levels of aliases followed before giving up
MAX_ADDRESSES = 1000  # distinct addresses expanded for one recipient (Postfix's limit too)


# Built once: constructing a statement costs more CPU than running it on SQLite, and routing
# runs for every RCPT. `Prepared`: compiled once per database too (DirectoryDatabase._lookup).
_HOSTED = Prepared(select(Domain.id).where(Domain.name == bindparam("domain")))
_IS_USER = Prepared(select(User.id).where(User.address == bindparam("address")))
_TARGETS = Prepared(select(Alias.target).where(Alias.source == bindparam("address"))
                    .order_by(Alias.id))
_NOTHING = (cast(null(), String), literal(0))
_PREFETCH = Prepared(union_all(
    select(literal("d"), *_NOTHING).where(Domain.name == bindparam("domain")),
    select(literal("u"), *_NOTHING).where(User.address == bindparam("address")),
    select(literal("a"), Alias.target, Alias.id).where(Alias.source == bindparam("address")),
))

# reverse_sources, once per MAIL FROM on submission: alias rows whose target is the address or
# a +tag form of it (`pattern`), or any address of a domain (for a catch-all).
_SOURCES_OF = Prepared(select(Alias.source).where(or_(
    func.lower(Alias.target) == bindparam("address"),
    func.lower(Alias.target).like(bindparam("pattern"), escape="\\"))).distinct())
_SOURCES_IN_DOMAIN = Prepared(select(Alias.source).where(
    Alias.target.like(bindparam("pattern"), escape="\\")).distinct())


class Resolver:
    """Routing within one read unit (`DirectoryDatabase._lookup`); memoises look-ups for the duration of one call only."""

    def __init__(self, session: RawReader, admin_address: str):
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
        canonical = f"{local}@{domain}"
        self._prefetch(canonical, domain)
        if not self.hosted(domain):
            original_local = text.rpartition("@")[0]
            return Route(f"{original_local}@{domain}", False)
        out = _Targets()
        self._expand(canonical, frozenset(), 0, out)
        return Route(canonical, True, tuple(out.mailboxes), tuple(out.remote))

    # Look-ups -------------------------------------------------------------------------------
    def _prefetch(self, address: str, domain: str) -> None:
        """The three look-ups of a plain recipient (is the domain hosted, the alias targets of
        the address, is it a user) in one query instead of three: this runs for every RCPT."""
        rows = self.s.execute(_PREFETCH, {"domain": domain, "address": address}).all()
        self._hosted[domain] = any(k == "d" for k, _, _ in rows)
        self._users[address] = any(k == "u" for k, _, _ in rows)
        self._targets[address] = [v for k, v, _ in sorted(rows, key=lambda r: r[2]) if k == "a"]

    def hosted(self, domain: str) -> bool:
        if domain not in self._hosted:
            self._hosted[domain] = self.s.scalar(_HOSTED, {"domain": domain}) is not None
        return self._hosted[domain]

    def is_user(self, address: str) -> bool:
        if address not in self._users:
            self._users[address] = self.s.scalar(_IS_USER, {"address": address}) is not None
        return self._users[address]

    def targets(self, source: str) -> list[str]:
        if source not in self._targets:
            self._targets[source] = list(self.s.scalars(_TARGETS, {"address": source}))
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


def reverse_sources(s: RawReader, user: str) -> list[str]:
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
            rows = s.scalars(_SOURCES_IN_DOMAIN, {"pattern": "%" + _like_escape(address)})
        else:
            local, _, domain = address.rpartition("@")
            rows = s.scalars(_SOURCES_OF, {
                "address": address,
                "pattern": _like_escape(local) + "+%@" + _like_escape(domain)})
        for source in rows:
            if source in seen:
                continue
            seen.add(source)
            frontier.append(source)
            if not source.startswith("@"):
                candidates.append(source)
    return sorted(candidates)


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


"""`AdminStore`: the accounts of the admin web dashboard (`ms_admin`), synchronously.

Used by `mailsuite admin ...` directly and by the dashboard in the db pool; hashing happens in
the caller (the CLI process, or the dashboard's hash pool), never inside a transaction. Names are
short identifiers (letters, digits, `.-_@`), compared in lower case.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update

from mailsuite.directory import passwords
from mailsuite.directory.models import AdminAccount
from mailsuite.directory.records import DirectoryError
from mailsuite.directory.store import DirectoryStore, _check_password

MAX_NAME = 64
_NAME = re.compile(r"^[a-z0-9][a-z0-9._@-]*$")


@dataclass(frozen=True)
class AdminInfo:
    name: str
    created: datetime


def admin_name(name: str) -> str:
    """The canonical (lower-case) form of an admin name, or DirectoryError saying why not."""
    canonical = (name or "").strip().lower()
    if not canonical or len(canonical) > MAX_NAME or not _NAME.match(canonical):
        raise DirectoryError(f"admin name {name[:80]!r} must be 1-{MAX_NAME} letters, digits "
                             "or . _ - @, starting with a letter or digit")
    return canonical


def check_new_password(password: str) -> None:
    """What every new password must be (the same rules as a mail user's)."""
    _check_password(password)


class AdminStore:
    def __init__(self, directory: DirectoryStore):
        self.directory = directory

    def add(self, name: str, password_hash: str) -> str:
        canonical = admin_name(name)
        with self.directory._unit(write=True) as s:
            if s.scalar(select(AdminAccount.id).where(AdminAccount.name == canonical)):
                raise DirectoryError(f"admin {canonical} already exists")
            s.add(AdminAccount(name=canonical, password_hash=password_hash))
        return canonical

    def set_password_hash(self, name: str, password_hash: str) -> str:
        canonical = admin_name(name)
        with self.directory._unit(write=True) as s:
            changed = s.execute(update(AdminAccount).where(AdminAccount.name == canonical)
                                .values(password_hash=password_hash)).rowcount
        if not changed:
            raise DirectoryError(f"no admin {canonical}")
        return canonical

    def remove(self, name: str) -> str:
        canonical = admin_name(name)
        with self.directory._unit(write=True) as s:
            removed = s.execute(delete(AdminAccount)
                                .where(AdminAccount.name == canonical)).rowcount
        if not removed:
            raise DirectoryError(f"no admin {canonical}")
        return canonical

    def check_new(self, name: str) -> str:
        """Refuse now what add() would refuse (a bad or taken name)."""
        canonical = admin_name(name)
        if self.password_hash(canonical) is not None:
            raise DirectoryError(f"admin {canonical} already exists")
        return canonical

    def require(self, name: str) -> str:
        canonical = admin_name(name)
        if self.password_hash(canonical) is None:
            raise DirectoryError(f"no admin {canonical}")
        return canonical

    def list(self) -> list[AdminInfo]:
        with self.directory._unit() as s:
            rows = s.execute(select(AdminAccount.name, AdminAccount.created)
                             .order_by(AdminAccount.name)).all()
        return [AdminInfo(name, created) for name, created in rows]

    def password_hash(self, name: str) -> str | None:
        """The stored hash of an admin, None for an unknown (or malformed) name."""
        try:
            canonical = admin_name(name)
        except DirectoryError:
            return None
        with self.directory._unit() as s:
            return s.scalar(select(AdminAccount.password_hash)
                            .where(AdminAccount.name == canonical))


def hash_new_password(password: str) -> str:
    """Check and hash a new password (slow: in the hash pool or a CLI process)."""
    check_new_password(password)
    return passwords.hash_password(password)

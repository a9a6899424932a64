"""The login throttle's counts in the SQL directory (`ms_login_failure`), shared by every
instance on one database (docs/design/limits.md, "Login throttle"). Blocking: the directory's db
pool calls these (`Directory.login_failed` and the others in directory/api.py).
"""
from __future__ import annotations

from sqlalchemy import case, delete, select, update
from sqlalchemy.orm import Session

from mailsuite.directory.models import LoginFailure
from mailsuite.directory.records import DirectoryUnavailable
from mailsuite.directory.store import DirectoryStore
from mailsuite.directory.trusttables import insert_new, trust_text


class LoginFailureStore:
    """The three counts of failed logins (per source and login, per source, per login)."""

    def __init__(self, store: DirectoryStore):
        self.store = store

    def login_failed(self, source: str, login: str, now: float,
                     window: float) -> tuple[int, int, int]:
        """Count one failed login of `login` ("" when unknown) from `source` at `now` in the
        three counts; (per source and login, per source, per login) as they were before it.
        A count whose last failure is more than `window` seconds old starts again at one."""
        source, login = trust_text(source, 64), trust_text(login, 320)
        before = []
        with self.store.unit(write=True) as s:
            for kind, src, name in _failure_keys(source, login):
                before.append(_count_failure(s, kind, src, name, float(now), float(window)))
        pair, by_source = before[0], before[1]
        return pair, by_source, before[2] if login else 0

    def login_succeeded(self, source: str, login: str, now: float) -> None:
        """Forget the failures of (source, login), and take them off the source's and the
        login's counts without making what is left look recent."""
        source, login = trust_text(source, 64), trust_text(login, 320)
        pair, by_source, by_login = _failure_keys(source, login)
        live = LoginFailure.expires >= float(now)
        with self.store.unit(write=True) as s:
            n = s.scalar(select(LoginFailure.count).where(*_failure_key(*pair), live)) or 0
            s.execute(delete(LoginFailure).where(*_failure_key(*pair)))
            if not n:
                return
            for key in (by_source, by_login):
                s.execute(update(LoginFailure).where(*_failure_key(*key), live)
                          .values(count=LoginFailure.count - n)
                          .execution_options(synchronize_session=False))
                s.execute(delete(LoginFailure).where(*_failure_key(*key),
                                                     LoginFailure.count <= 0))

    def login_failure_counts(self, source: str, login: str, now: float) -> tuple[int, int, int]:
        """(per source and login, per source, per login) failures within their window."""
        source, login = trust_text(source, 64), trust_text(login, 320)
        counts = []
        with self.store.read() as s:
            for key in _failure_keys(source, login):
                counts.append(int(s.scalar(select(LoginFailure.count).where(
                    *_failure_key(*key), LoginFailure.expires >= float(now))) or 0))
        return counts[0], counts[1], counts[2] if login else 0

    def purge_login_failures(self, now: float) -> int:
        """Delete the counts whose window has ended; rows removed."""
        with self.store.unit(write=True) as s:
            return s.execute(delete(LoginFailure)
                             .where(LoginFailure.expires < float(now))).rowcount


def _failure_keys(source: str, login: str) -> list[tuple[str, str, str]]:
    """The throttle's three counts of one attempt: (source, login), source, login."""
    return [("p", source, login), ("s", source, ""), ("u", "", login)]


def _failure_key(kind: str, source: str, login: str) -> tuple:
    return (LoginFailure.kind == kind, LoginFailure.source == source, LoginFailure.login == login)


def _count_failure(s: Session, kind: str, source: str, login: str, now: float,
                   window: float) -> int:
    """Add one failure to a count (one UPDATE ... RETURNING: instances never lose an increment);
    its value before. An expired count starts again; a missing one is inserted."""
    if kind == "u" and not login:
        return 0
    key = _failure_key(kind, source, login)
    for _attempt in range(3):
        row = s.execute(update(LoginFailure).where(*key).values(
            count=case((LoginFailure.expires < now, 1), else_=LoginFailure.count + 1),
            last=now, expires=now + window).returning(LoginFailure.count)
            .execution_options(synchronize_session=False)).first()
        if row is not None:
            return int(row[0]) - 1
        if insert_new(s, LoginFailure, kind=kind, source=source, login=login, count=1,
                       last=now, expires=now + window):
            return 0
    raise DirectoryUnavailable("login throttle: the count kept changing under us")

"""What a test needs from the machine: external programs, PostgreSQL, root.

Locally a missing requirement skips the test with the reason. Under CI (`CI` set to anything but
"", "0" or "false") it fails instead: CI installs everything, so a missing program there is a
broken CI run, not a test to skip quietly. See docs/design/testing.md.
"""
from __future__ import annotations

import functools
import os
import shutil

import pytest

PG_CANDIDATES = ["postgresql+psycopg://postgres@127.0.0.1:5432/test",
                 "postgresql+psycopg://root@127.0.0.1:5432/test"]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> None:
    """Skip the running test with `reason`, or fail it under CI."""
    if in_ci():
        pytest.fail(f"required under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require_program(name: str, package: str | None = None) -> str:
    """The path of program `name` (from Debian package `package`), else skip/fail."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed (Debian package {package or name})")
    return path


def require_postgresql() -> str:
    """The URL of a reachable PostgreSQL ($MAILSUITE_TEST_PG, else 127.0.0.1:5432), else
    skip/fail with the reason."""
    url, reason = pg_base_url()
    if url is None:
        unavailable(reason)
    return url


@functools.lru_cache(maxsize=None)
def pg_base_url() -> tuple[str | None, str]:
    """(URL of a reachable PostgreSQL, "") or (None, why not)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    candidates = [os.environ["MAILSUITE_TEST_PG"]] if os.environ.get("MAILSUITE_TEST_PG") \
        else PG_CANDIDATES
    reasons = []
    for url in candidates:
        engine = create_engine(url, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.execute(text("select 1"))
            return url, ""
        except Exception as e:  # any failure to connect means "not available here"
            reasons.append(f"{make_url(url).render_as_string()}: {str(e).splitlines()[0]}")
        finally:
            engine.dispose()
    return None, "PostgreSQL not reachable (set MAILSUITE_TEST_PG): " + "; ".join(reasons)


class PgSchema:
    """A fresh schema for one test: the directory's URL points into it (search_path)."""

    def __init__(self) -> None:
        import uuid

        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        base = require_postgresql()
        self.schema = "ms_test_" + uuid.uuid4().hex[:12]
        self.admin = create_engine(base, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{self.schema}"'))
        self.url = make_url(base).update_query_dict(
            {"options": f"-csearch_path={self.schema}"}).render_as_string(hide_password=False)

    def drop(self) -> None:
        from sqlalchemy import text

        with self.admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
        self.admin.dispose()

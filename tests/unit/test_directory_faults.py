"""Environment faults (docs/design/directory.md, "Faults"): a database that is corrupt, cannot be
opened, refuses connections, is locked, or a pool shutting down. Every store method raises
DirectoryUnavailable with one line; every Directory method fails with it and logs one warning
line (rate-limited), never a traceback; `authenticate` fails with it, not UnauthorizedLogin.
A SQLite URL under a missing directory is refused unless it is the default database.
(PostgreSQL at a closed port needs a socket: tests/scenario/test_directory_startup.py.)"""
from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest
from sqlalchemy.exc import OperationalError
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from mailsuite.config import Config, ConfigError
from mailsuite.directory import Directory, DirectoryError, DirectoryStore, DirectoryUnavailable
from mailsuite.pools import InlinePool, PoolStopped
from tests.unit.test_directory_store import _HASH, PASSWORD


@pytest.fixture
def events():
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def _sqlite(tmp_path) -> tuple[str, DirectoryStore]:
    path = str(tmp_path / "db" / "directory.db")
    store = DirectoryStore("sqlite:///" + path)
    store.prepare()
    store.add_domain("example.org")
    store.add_user("alice@example.org", password_hash=_HASH)
    return path, store


STORE_CALLS = [
    ("route", ("alice@example.org",)), ("sender_addresses", ("alice@example.org",)),
    ("is_hosted", ("example.org",)), ("user_exists", ("alice@example.org",)),
    ("password_record", ("alice@example.org",)), ("list_domains", ()), ("list_users", ()),
    ("list_senders", ()), ("add_domain", ("example.net",)),
    ("set_enabled", ("alice@example.org", False)),
    # the inbound-trust state (docs/design/trust-limits.md), which fails open on exactly this
    ("greylist_check", ("192.0.2.0/24", "<>", "alice@example.org", 0, 300, 3600, 86400)),
    ("rate_hit", ("mx-conn:192.0.2.1", 60, 10, 0)), ("rate_counters", (0,)),
    ("purge_trust", (0,)),
]


@pytest.mark.parametrize("fault", ["corrupt", "unopenable", "removed directory"])
def test_broken_sqlite_file_is_unavailable_in_one_line(tmp_path, fault):
    path, store = _sqlite(tmp_path)
    store.engine.dispose()  # the next unit of work opens the file again
    if fault == "corrupt":
        with open(path, "r+b") as f:
            f.write(b"garbage!" * 1024)
    elif fault == "unopenable":  # as root, a mode of 000 would still open: a directory will not
        os.remove(path)
        os.mkdir(path)
    else:
        shutil.rmtree(tmp_path / "db")
    try:
        for name, args in STORE_CALLS:
            with pytest.raises(DirectoryUnavailable) as e:
                getattr(store, name)(*args)
            assert "\n" not in str(e.value) and str(e.value).startswith("database sqlite:")
    finally:
        store.close()


def _failing_directory(tmp_path, error: Exception, clock: Clock | None = None) -> Directory:
    _path, store = _sqlite(tmp_path)
    store.close()
    config = Config()
    config.server.data_dir = str(tmp_path / "data")
    config.database.url = store.url
    config.limits.auth_failure_delay = 0
    directory = Directory(config, SimpleNamespace(db=InlinePool(), hash=InlinePool()),
                          reactor=clock or Clock())

    def refuse(*_args, **_kwargs):
        raise error

    # Every unit of work starts with one of these (raw_connection: the per-message look-ups).
    directory.store.engine.connect = directory.store.engine.raw_connection = refuse
    return directory


def _outcome(d) -> object:
    results: list = []
    d.addBoth(results.append)
    assert len(results) == 1
    return results[0]


@pytest.mark.parametrize("error", [
    OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused")),
    OperationalError("SELECT 1", {}, Exception("database is locked")),
    OperationalError("SELECT 1", {}, Exception("disk I/O error")),
])
def test_every_directory_method_is_unavailable_with_one_log_line(tmp_path, events, error):
    directory = _failing_directory(tmp_path, error)
    try:
        calls = [directory.route("alice@example.org"),
                 directory.sender_addresses("alice@example.org"),
                 directory.is_hosted("example.org"), directory.user_exists("alice@example.org"),
                 directory.authenticate("alice@example.org", PASSWORD, client_ip="192.0.2.1"),
                 directory.authenticate(b"\xff@example.org", b"\xff", client_ip="192.0.2.1")]
        for d in calls:
            outcome = _outcome(d)
            assert outcome.check(DirectoryUnavailable), outcome  # not UnauthorizedLogin
            assert not outcome.check(UnauthorizedLogin)
        # An outage is not a failed login: the client is not throttled for it.
        assert directory.throttle.failures("192.0.2.1") == 0
    finally:
        directory.close()
    warnings = [e for e in events if "directory unavailable" in e.get("log_format", "")]
    assert len(warnings) == 1  # the same message again within the interval is counted only
    assert warnings[0]["log_level"] == LogLevel.warn
    assert not any("log_failure" in e for e in events)  # no traceback anywhere
    assert not any(e.get("log_level") in (LogLevel.error, LogLevel.critical) for e in events)


def test_outage_log_is_rate_limited(tmp_path, events):
    clock = Clock()
    directory = _failing_directory(
        tmp_path, OperationalError("x", {}, Exception("connection refused")), clock)
    try:
        for _ in range(100):
            _outcome(directory.route("alice@example.org"))
        clock.advance(11)
        _outcome(directory.route("alice@example.org"))
    finally:
        directory.close()
    lines = [e for e in events if "directory unavailable" in e.get("log_format", "")]
    assert len(lines) == 2 and lines[1]["more"] == " (99 more failures)"


def test_pool_stopped_is_unavailable(tmp_path, events):
    directory = _failing_directory(tmp_path, PoolStopped("db pool stopped"))
    try:
        directory.pools = SimpleNamespace(db=SimpleNamespace(run=_stopped), hash=InlinePool())
        assert _outcome(directory.route("alice@example.org")).check(DirectoryUnavailable)
        assert _outcome(directory.authenticate("alice@example.org", PASSWORD)).check(
            DirectoryUnavailable)
        # The hash pool stops too at shutdown: a login in flight gets the same answer.
        directory.pools = SimpleNamespace(db=InlinePool(), hash=SimpleNamespace(run=_stopped))
        del directory.store.engine.connect  # the database answers again
        assert _outcome(directory.authenticate("alice@example.org", PASSWORD)).check(
            DirectoryUnavailable)
    finally:
        directory.close()


def _stopped(*_args):
    from twisted.internet import defer

    return defer.fail(PoolStopped("the db pool is stopped"))


def test_refusals_are_not_faults(tmp_path, events):
    """A refused change stays a DirectoryError; nothing is logged as an outage."""
    _path, store = _sqlite(tmp_path)
    try:
        with pytest.raises(DirectoryError) as e:
            store.add_domain("example.org")
        assert not isinstance(e.value, DirectoryUnavailable)
    finally:
        store.close()
    assert not [e for e in events if "directory unavailable" in e.get("log_format", "")]


# -- a SQLite URL under a missing directory ------------------------------------------------------
def test_sqlite_under_a_missing_directory_is_refused(tmp_path):
    config = Config()
    config.server.data_dir = str(tmp_path / "data")
    config.database.url = "sqlite:///" + str(tmp_path / "typo" / "mailsuite.db")
    with pytest.raises(DirectoryError, match=r"the directory .*typo of the SQLite database does "
                                             r"not exist"):
        DirectoryStore.from_config(config)
    with pytest.raises(ConfigError, match=r"^\[database\] url: the directory"):
        Directory(config, SimpleNamespace(db=InlinePool(), hash=InlinePool()))
    assert not os.path.exists(tmp_path / "typo")


@pytest.mark.parametrize("spelt_out", [False, True])
def test_the_default_database_creates_its_directory(tmp_path, spelt_out):
    config = Config()
    config.server.data_dir = str(tmp_path / "data")
    if spelt_out:
        config.database.url = "sqlite:///" + str(tmp_path / "data" / "mailsuite.db")
    store = DirectoryStore.from_config(config)
    try:
        store.prepare()
        assert os.path.isfile(tmp_path / "data" / "mailsuite.db")
    finally:
        store.close()

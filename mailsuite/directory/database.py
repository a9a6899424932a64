"""`DirectoryDatabase`: the directory's connection to its database, the base of `DirectoryStore`.

The engine (SQLite with WAL and `BEGIN IMMEDIATE` for writes, or PostgreSQL), units of work with
one-line errors, the schema version and its migrations, and change notifications
(docs/design/directory.md, "Schema", "Faults" and "Changes between instances").
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

from sqlalchemy import create_engine, event, select, text, update
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import (ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError,
                            SQLAlchemyError)
from sqlalchemy.orm import Session
from twisted.logger import Logger

from mailsuite.directory.models import SCHEMA_VERSION, Base, SchemaInfo
from mailsuite.directory.records import DirectoryError, DirectoryUnavailable

log = Logger()

SQLITE_BUSY_TIMEOUT_MS = 10_000


class DirectoryDatabase:
    """The database at `url`: units of work, schema, notifications.

    `create_dir`: for a SQLite file whose directory does not exist, create it (the default
    database under data_dir) or refuse with one line (any other path: a typo in a URL must not
    silently start an empty directory). `DirectoryStore.from_config` decides which."""

    def __init__(self, url: str, create_dir: bool = True):
        self.url = url
        self.engine = _make_engine(url, create_dir)
        database = self.engine.url.database or ""
        self._sqlite = self.engine.url.get_backend_name() == "sqlite"
        self._driver_error: type[BaseException] = self.engine.dialect.loaded_dbapi.Error
        self._compiled: dict[int, tuple[str, tuple[str, ...] | None, dict[str, Any]]] = {}
        self._new_sqlite_file = (self.engine.url.get_backend_name() == "sqlite"
                                 and database not in ("", ":memory:")
                                 and not os.path.exists(database))

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
        with translate_errors(self.url):
            Base.metadata.create_all(self.engine)

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
        with translate_errors(self.url):
            with self.engine.begin() as conn:
                for channel, payload in items:
                    conn.execute(text("SELECT pg_notify(:channel, :payload)"),
                                 {"channel": channel, "payload": payload})

    def listen_connection(self) -> Any:
        """A new driver-level (psycopg) connection in autocommit mode, outside the pool, for a
        LISTEN loop in a thread of its own (mailsuite/notify.py). The caller closes it."""
        with translate_errors(self.url):
            proxied = self.engine.raw_connection()
            conn = proxied.driver_connection
            proxied.detach()  # its own, for good: never handed back to the pool
            conn.autocommit = True
            return conn

    # -- units of work ------------------------------------------------------------------------
    def unit(self, write: bool = False) -> Any:
        """`_unit` for the parts that keep tables of their own in this database
        (mailsuite/events): the same transactions, SQLite locking and one-line errors."""
        return self._unit(write)

    def read(self) -> Any:
        """`_read` for those parts: a read-only unit on a bare Connection."""
        return self._read()

    @contextmanager
    def _unit(self, write: bool = False) -> Iterator[Session]:
        """One unit of work: a Session in a transaction, committed on success.

        On SQLite a writing unit starts with BEGIN IMMEDIATE: it waits (busy_timeout) for the
        write lock up front instead of failing half-way when the server and the CLI write at once.
        """
        with translate_errors(self.url):
            with self.engine.connect() as conn:
                if write:
                    conn.execution_options(mailsuite_write=True)
                with Session(bind=conn, expire_on_commit=False) as session:
                    with session.begin():
                        yield session

    @contextmanager
    def _lookup(self) -> Iterator["RawReader"]:
        """A read-only unit for the look-ups of every message (route, sender addresses): the
        prebuilt statements, compiled once, run on the pooled driver connection in one read
        transaction, without SQLAlchemy's per-statement execution machinery (docs/design/
        directory.md, "Look-ups without the ORM"). Nothing is cached but the SQL text."""
        with translate_errors(self.url):
            try:
                proxied = self.engine.raw_connection()
            except self._driver_error as e:  # the pool does not wrap a failed connect
                raise DirectoryUnavailable(f"database {_safe_url(self.url)}: {_first_line(e)}")
        reader = RawReader(self, proxied)
        try:
            if self._sqlite:
                reader.begin()  # the driver is in autocommit mode (_sqlite_connect)
            yield reader
            proxied.driver_connection.commit()
        except self._driver_error as e:
            proxied.invalidate()  # a broken connection must not go back to the pool
            raise DirectoryUnavailable(f"database {_safe_url(self.url)}: {_first_line(e)}")
        finally:
            proxied.close()  # back to the pool, which rolls back anything still open

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read-only unit on a bare Connection in one transaction: the look-ups every message
        and login makes (route, sender addresses, hosted domains) skip the ORM Session's setup,
        most of their CPU (docs/design/directory.md, "Look-ups without the ORM")."""
        with translate_errors(self.url):
            with self.engine.connect() as conn:
                with conn.begin():
                    yield conn


class Prepared:
    """A Core statement built once at import, for `RawReader` (compiled once per database)."""

    def __init__(self, statement: Any):
        self.statement = statement


class RawReader:
    """The few calls routing makes on a Connection (`execute(...).all()`, `scalar`, `scalars`),
    run on a driver connection. Statements are `Prepared`; another Core statement (the rare
    postmaster fallback) is compiled at each use."""

    def __init__(self, db: DirectoryDatabase, proxied: Any):
        self._db = db
        self._cursor = proxied.driver_connection.cursor()

    def begin(self) -> None:
        self._cursor.execute("BEGIN")

    def execute(self, statement: Any, params: dict[str, Any] | None = None) -> "_Rows":
        if isinstance(statement, Prepared):
            key = id(statement)
            compiled = self._db._compiled.get(key)
            if compiled is None:
                compiled = self._db._compiled[key] = _compile(statement.statement,
                                                              self._db.engine.dialect)
        else:
            compiled = _compile(statement, self._db.engine.dialect)
        sql, order, defaults = compiled
        values = dict(defaults, **params) if params else defaults
        self._cursor.execute(sql, [values[name] for name in order] if order is not None
                             else values)
        return _Rows(self._cursor.fetchall())

    def scalar(self, statement: Any, params: dict[str, Any] | None = None) -> Any:
        rows = self.execute(statement, params)
        return rows[0][0] if rows else None

    def scalars(self, statement: Any, params: dict[str, Any] | None = None) -> list[Any]:
        return [row[0] for row in self.execute(statement, params)]


class _Rows(list):
    def all(self) -> list:
        return self

    def first(self) -> Any:
        return self[0] if self else None


def _compile(statement: Any, dialect: Any) -> tuple[str, tuple[str, ...] | None, dict[str, Any]]:
    """SQL text, parameter order (positional drivers such as sqlite3) and the statement's own
    bound values (literals), for the driver's cursor.execute."""
    compiled = statement.compile(dialect=dialect)
    order = tuple(compiled.positiontup) if dialect.positional else None
    return compiled.string, order, compiled.construct_params(_check=False)


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


@contextmanager
def translate_errors(url: str) -> Iterator[None]:
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


def is_default_database(config: Any) -> bool:
    """Whether the Config's database is `<data_dir>/mailsuite.db`, also when spelt out."""
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


def _safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(invalid URL)"


def _first_line(error: BaseException | None) -> str:
    text = str(error).strip() if error is not None else "error"
    return text.splitlines()[0] if text else type(error).__name__

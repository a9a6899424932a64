"""The unit layer: everything in memory (StringTransport, task.Clock, InlinePool, fakes, files on
tmp_path); no subprocess, no socket, no sleep. See docs/design/testing.md."""
from __future__ import annotations

import os
import shutil
from typing import Callable

import pytest

from mailsuite.directory import DirectoryStore, passwords

# argon2id with the cheapest parameters (a few ms instead of ~0.5 s per hash): the unit layer
# tests what is hashed, verified and rehashed, not the cost. The scenario layer keeps the real
# parameters.
FAST_HASHING = passwords.CONTEXT.copy(argon2__rounds=1, argon2__memory_cost=4096,
                                      argon2__parallelism=1)


@pytest.fixture(autouse=True)
def fast_password_hashing(monkeypatch):
    monkeypatch.setattr(passwords, "CONTEXT", FAST_HASHING)


@pytest.fixture(autouse=True)
def no_disk_flush(monkeypatch):
    """os.fsync does nothing here: a unit test proves which fsyncs are made and in what order
    (the tests that check it patch os.fsync with a recorder), never that the disk kept the
    data, which the scenario layer's kill -9 tests prove with real flushes. Every fsync of the
    store, the spool and the queue goes through os.fsync; SQLite's own are untouched."""
    monkeypatch.setattr(os, "fsync", _no_flush)


def _no_flush(fd: int) -> None:
    os.fstat(fd)  # still an error for a descriptor that is not open, as fsync would be


@pytest.fixture(scope="session")
def empty_directory_file(tmp_path_factory) -> str:
    """One SQLite directory made by `DirectoryStore.prepare()` on a new file, once per run."""
    path = str(tmp_path_factory.mktemp("directory-template") / "mailsuite.db")
    store = DirectoryStore("sqlite:///" + path)
    store.prepare()
    store.close()
    assert not os.path.exists(path + "-wal"), "the template must be complete in one file"
    return path


@pytest.fixture
def prepared_directory(empty_directory_file) -> Callable[[str], str]:
    """prepared_directory(path) -> URL: a copy of the empty directory database at `path`.

    Creating the twenty tables costs ~30 ms of CPU and ~0.1 s of file syncs per test; a copy
    is read by `prepare()` like any database made earlier (what every start-up after the first
    sees). Tests of creating a database (its mode, its owner, migrations) make their own."""
    def copy(path: str) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(empty_directory_file, path)
        return "sqlite:///" + path

    return copy


def prepared_if_sqlite(request: pytest.FixtureRequest, db_url: str) -> str:
    """`db_url`, with the prepared empty database put there when it is a SQLite file: for the
    store fixtures that the PostgreSQL scenario modules reuse with a URL of their own (a fresh
    schema, which `prepare()` fills), where `prepared_directory` does not exist."""
    if db_url.startswith("sqlite:///"):
        request.getfixturevalue("prepared_directory")(db_url.removeprefix("sqlite:///"))
    return db_url

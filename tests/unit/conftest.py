"""The unit layer: everything in memory (StringTransport, task.Clock, InlinePool, fakes, files on
tmp_path); no subprocess, no socket, no sleep. See docs/design/testing.md."""
from __future__ import annotations

import gc
import itertools
import os
import re
import shutil
from typing import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from mailsuite.courier import dkim
from mailsuite.directory import DirectoryStore, passwords

# argon2id with the cheapest parameters (a few ms instead of ~0.5 s per hash): the unit layer
# tests what is hashed, verified and rehashed, not the cost. The scenario layer keeps the real
# parameters.
FAST_HASHING = passwords.CONTEXT.copy(argon2__rounds=1, argon2__memory_cost=4096,
                                      argon2__parallelism=1)


# The cyclic garbage collector, tuned for a run of many short tests (docs/design/testing.md):
# collections of the youngest objects every 20,000 allocations instead of 700, and what exists
# once the tests are collected (modules, test functions, hypothesis strategies: ~170,000
# objects) frozen out of every later collection. 7 s of the layer's CPU went to the collector,
# 2.6 s now. A test that needs garbage gone calls gc.collect() itself.
gc.set_threshold(20_000, 50, 100)


def pytest_collection_finish(session: pytest.Session) -> None:
    gc.collect()
    gc.freeze()


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


@pytest.fixture(autouse=True, scope="session")
def dkim_rsa_key_made_once():
    """`dkim generate` (mailsuite.courier.dkim) makes its 2048-bit RSA key once per run, not
    ~0.15 s of CPU per call: the unit tests check what is written and signed with such a key,
    never that two of them differ. Other RSA keys (tests/unit/trustkit.py) are untouched."""
    made: list[rsa.RSAPrivateKey] = []

    class OnceRSA:
        def __getattr__(self, name: str) -> object:
            return getattr(rsa, name)

        @staticmethod
        def generate_private_key(public_exponent: int, key_size: int) -> rsa.RSAPrivateKey:
            assert (public_exponent, key_size) == (65537, 2048), "made once for one size only"
            if not made:
                made.append(rsa.generate_private_key(public_exponent, key_size))
            return made[0]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dkim, "rsa", OnceRSA())
        yield


_tmp_numbers = itertools.count()


@pytest.fixture
def tmp_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A new empty directory per test, as pytest's own, made without pytest's numbering: that
    lists the whole base directory (two entries per test so far) for every test, ~4 ms a test
    by the end of this layer and 5 s of the run."""
    name = re.sub(r"\W", "_", request.node.name)[:30]
    path = tmp_path_factory.getbasetemp() / f"{name}-{next(_tmp_numbers)}"
    path.mkdir(mode=0o700)
    return path


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

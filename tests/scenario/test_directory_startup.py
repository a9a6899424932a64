"""The real server (`twistd -n mailsuite`) and its database at start-up: a database that cannot be
used stops start-up with one line naming it, and a fresh database gets its schema. (The store
alone against a server that does not answer is here too: it needs a real socket.)"""
from __future__ import annotations

import os
import sqlite3

import pytest

from mailsuite.directory import DirectoryError, DirectoryStore
from tests.harness import MailServer


@pytest.mark.parametrize("url, expected", [
    ("postgresql+psycopg://nobody:hidden@127.0.0.1:1/none?connect_timeout=3",
     "mailsuite: cannot use the database: database postgresql+psycopg://nobody:***@127.0.0.1:1/"),
    ("nonsense", "mailsuite: [database] url: invalid database URL 'nonsense'"),
])
def test_unusable_database_is_one_line(tmp_path, url, expected):
    server = MailServer(str(tmp_path), listeners=["mx"], extra={"database": {"url": url}})
    with pytest.raises(RuntimeError) as info:
        server.start(timeout=60)
    output = str(info.value)
    assert expected in output, output
    assert "Traceback" not in output and "hidden" not in output


def test_fresh_database_gets_its_schema(tmp_path):
    server = MailServer(str(tmp_path), listeners=["mx"])
    server.start()
    try:
        db = os.path.join(server.data_dir, "mailsuite.db")
        with sqlite3.connect(db) as conn:
            tables = {row[0] for row in conn.execute("select name from sqlite_master")}
            assert {"ms_domain", "ms_user", "ms_alias", "ms_schema"} <= tables
            assert conn.execute("pragma journal_mode").fetchone()[0] == "wal"
        server.admin("domain", "add", "example.org")  # the CLI writes while the server runs
        assert server.admin("domain", "list").stdout == "example.org\n"
    finally:
        server.stop()


def test_unreachable_database_is_one_line():
    bad = DirectoryStore("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")
    with pytest.raises(DirectoryError, match=r"^database postgresql\+psycopg://nobody@[^\n]*$"):
        bad.list_domains()

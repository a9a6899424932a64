"""Extra sender addresses (`ms_sender`, schema version 2) and the migration from version 1.

tests/scenario/test_directory_postgresql.py runs these on PostgreSQL too (the `store` and
`db_url` fixtures come from test_directory_store.py)."""
from __future__ import annotations

import pytest
from sqlalchemy import create_engine, insert, select, text

from mailsuite.directory import DirectoryError, DirectoryStore
from mailsuite.directory.addresses import sender_allowed
from mailsuite.directory.models import SCHEMA_VERSION, Base, SchemaInfo
from tests.unit.test_directory_store import _HASH, db_url, populate, store  # noqa: F401


def test_extra_senders_add_list_remove(store):
    populate(store)
    assert store.add_sender("Alice@example.org", "Shared@Example.ORG") == (
        "alice@example.org", "shared@example.org")
    assert store.add_sender("alice@example.org", "@Bücher.example") == (
        "alice@example.org", "@xn--bcher-kva.example")
    store.add_sender("bob@example.org", "shared@example.org")
    with pytest.raises(DirectoryError, match="may already send as shared@example.org"):
        store.add_sender("alice@example.org", "shared@example.org")
    for bad in ["", "@", "not-an-address", "a@@b.example", "@bad_domain"]:
        with pytest.raises(DirectoryError):
            store.add_sender("alice@example.org", bad)
    with pytest.raises(DirectoryError, match="no user nobody@example.org"):
        store.add_sender("nobody@example.org", "shared@example.org")
    assert store.list_senders() == [("alice@example.org", "@xn--bcher-kva.example"),
                                    ("alice@example.org", "shared@example.org"),
                                    ("bob@example.org", "shared@example.org")]
    assert store.list_senders("bob@example.org") == [("bob@example.org", "shared@example.org")]
    owned = store.sender_addresses("alice@example.org")
    assert owned == frozenset({"alice@example.org", "shared@example.org",
                               "@xn--bcher-kva.example"})
    assert sender_allowed(owned, "Shared@example.org")
    assert sender_allowed(owned, "anyone@xn--bcher-kva.example")
    assert not sender_allowed(store.sender_addresses("carol@example.org"), "shared@example.org")

    store.remove_sender("alice@example.org", "SHARED@example.org")
    with pytest.raises(DirectoryError, match="has no extra sender address shared@example.org"):
        store.remove_sender("alice@example.org", "shared@example.org")
    assert "shared@example.org" not in store.sender_addresses("alice@example.org")
    # Removing a user (or its domain) takes its sender rights with it.
    store.remove_user("bob@example.org")
    assert store.list_senders() == [("alice@example.org", "@xn--bcher-kva.example")]
    store.add_user("bob@example.org", password_hash=_HASH)
    assert store.sender_addresses("bob@example.org") == frozenset({"bob@example.org"})
    store.remove_domain("example.org", force=True)
    assert store.list_senders() == []


def test_schema_1_is_migrated(db_url):  # noqa: F811
    """A database written by the previous version (no ms_sender, version 1) is upgraded by
    prepare(), its data kept."""
    engine = create_engine(db_url)
    tables = [t for name, t in Base.metadata.tables.items()
              if name in ("ms_schema", "ms_domain", "ms_user", "ms_alias")]
    Base.metadata.create_all(engine, tables=tables)
    with engine.begin() as conn:
        conn.execute(insert(SchemaInfo).values(id=1, version=1))
        conn.execute(text("INSERT INTO ms_domain (name, created) VALUES "
                          "('example.org', CURRENT_TIMESTAMP)"))
    engine.dispose()
    old = DirectoryStore(db_url)
    try:
        old.prepare()
        old.add_user("alice@example.org", password_hash=_HASH)
        old.add_sender("alice@example.org", "shared@example.org")
        assert "shared@example.org" in old.sender_addresses("alice@example.org")
        with old._unit() as s:
            assert s.scalar(select(SchemaInfo.version)) == SCHEMA_VERSION == 5
        old.prepare()  # idempotent at the new version
    finally:
        old.close()

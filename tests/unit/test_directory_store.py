"""The synchronous DirectoryStore on a SQLite file (WAL): schema, domains, users, aliases,
routing, sender addresses, and the password hash forms.

tests/scenario/test_directory_postgresql.py runs the same store tests on PostgreSQL by
overriding the `db_url` fixture; the asynchronous Directory is in test_directory_async.py.
"""
from __future__ import annotations

import base64
import hashlib
import os
import time

import pytest
from passlib.hash import bcrypt, sha512_crypt
from sqlalchemy import event, text

from mailsuite.directory import DirectoryError, DirectoryStore, DirectoryUnavailable, Route
from mailsuite.directory import passwords
from mailsuite.directory.routing import MAX_DEPTH
from tests.unit.conftest import FAST_HASHING, prepared_if_sqlite

PASSWORD = "correct horse"
# One argon2id hash for the routing fixtures, so that setting up twenty users costs no hashing.
_HASH = FAST_HASHING.hash(PASSWORD)


# -- databases -----------------------------------------------------------------------------------
@pytest.fixture
def db_url(tmp_path):
    """The database under test; the PostgreSQL scenario module overrides this fixture."""
    return "sqlite:///" + str(tmp_path / "directory.db")


@pytest.fixture
def store(db_url, request):
    # `db_url` itself stays a new file, for the tests that create a database.
    s = DirectoryStore(prepared_if_sqlite(request, db_url), admin_address="boss@admin.example")
    s.prepare()
    yield s
    s.close()


def populate(store: DirectoryStore) -> None:
    """example.org: alice, bob, carol (in that order of creation); example.net: dave."""
    store.add_domain("example.org")
    store.add_domain("example.net")
    for address in ("alice@example.org", "bob@example.org", "carol@example.org",
                    "dave@example.net"):
        store.add_user(address, password_hash=_HASH)


def test_sqlite_file_is_private_and_owned_by_the_data_directory_owner(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    if os.geteuid() == 0:
        os.chown(data, 65534, 65534)  # as when the server runs with twistd --uid nobody
    store = DirectoryStore("sqlite:///" + str(data / "mailsuite.db"))
    try:
        store.prepare()
        store.add_domain("example.org")
    finally:
        store.close()
    info = os.stat(data / "mailsuite.db")
    assert info.st_mode & 0o777 == 0o600
    assert info.st_uid == os.stat(data).st_uid


# -- schema and domains --------------------------------------------------------------------------
def test_prepare_is_idempotent_and_data_survives(store, db_url):
    store.add_domain("example.org")
    store.prepare()
    other = DirectoryStore(db_url)
    other.prepare()
    assert [d.name for d in other.list_domains()] == ["example.org"]
    other.close()


def test_domain_add_list_remove(store):
    assert store.add_domain("Example.ORG.") == "example.org"
    store.add_domain("bücher.example")
    assert [d.name for d in store.list_domains()] == ["example.org", "xn--bcher-kva.example"]
    with pytest.raises(DirectoryError, match="domain example.org already exists"):
        store.add_domain("EXAMPLE.org")
    assert store.is_hosted("example.ORG") and not store.is_hosted("example.com")
    store.remove_domain("example.org")
    assert [d.name for d in store.list_domains()] == ["xn--bcher-kva.example"]
    with pytest.raises(DirectoryError, match="unknown domain example.org"):
        store.remove_domain("example.org")


@pytest.mark.parametrize("name", ["", "-bad.org", "bad-.org", "a..org", "x" * 64 + ".org",
                                  "under_score.org", "10.0.0.1", "sp ace.org"])
def test_invalid_domain_names(store, name):
    with pytest.raises(DirectoryError, match="invalid domain"):
        store.add_domain(name)


def test_remove_domain_with_users_needs_force(store):
    populate(store)
    store.add_alias("sales@example.org", ["alice@example.org"])
    with pytest.raises(DirectoryError, match="still has 3 users and 1 alias.*--force"):
        store.remove_domain("example.org")
    assert store.user_exists("alice@example.org")
    assert store.remove_domain("example.org", force=True) == (3, 1)
    assert not store.user_exists("alice@example.org")
    assert store.list_aliases() == []
    assert [u.address for u in store.list_users()] == ["dave@example.net"]
    # An alias-only domain is refused too.
    store.add_alias("@example.net", ["dave@example.net"])
    store.remove_user("dave@example.net")
    with pytest.raises(DirectoryError, match="0 users and 1 alias"):
        store.remove_domain("example.net")


# -- users ---------------------------------------------------------------------------------------
def test_users_are_case_insensitive_and_unique(store):
    store.add_domain("example.org")
    assert store.add_user("Alice@Example.ORG", PASSWORD) == "alice@example.org"
    with pytest.raises(DirectoryError, match="user alice@example.org already exists"):
        store.add_user("ALICE@example.org", "other")
    with pytest.raises(DirectoryError, match="unknown domain example.com"):
        store.add_user("alice@example.com", PASSWORD)
    with pytest.raises(DirectoryError, match="empty password"):
        store.add_user("bob@example.org", "")
    user = store.get_user("ALICE@example.org")
    assert user.address == "alice@example.org" and user.enabled and user.created.tzinfo


@pytest.mark.parametrize("address", ["alice", "a@b@example.org", "@example.org", "alice@",
                                     "al ice@example.org", ".alice@example.org",
                                     "al..ice@example.org", "alice@-example.org",
                                     "alice@exa_mple.org", "x" * 65 + "@example.org",
                                     "<alice@example.org>"])
def test_invalid_addresses(store, address):
    store.add_domain("example.org")
    with pytest.raises(DirectoryError, match="invalid address"):
        store.add_user(address, PASSWORD)
    if address != "@example.org":  # as an alias source that is the catch-all
        with pytest.raises(DirectoryError, match="invalid"):
            store.add_alias(address, ["x@example.net"])


def test_user_remove_enable_disable_list(store):
    populate(store)
    store.set_enabled("Bob@example.org", False)
    assert [(u.address, u.enabled) for u in store.list_users("example.org")] == [
        ("alice@example.org", True), ("bob@example.org", False), ("carol@example.org", True)]
    assert [u.address for u in store.list_users("EXAMPLE.net")] == ["dave@example.net"]
    store.remove_user("carol@example.org")
    with pytest.raises(DirectoryError, match="no user carol@example.org"):
        store.remove_user("carol@example.org")
    with pytest.raises(DirectoryError, match="unknown domain nowhere.example"):
        store.set_password("x@nowhere.example", "pw")
    with pytest.raises(DirectoryError, match="unknown domain"):
        store.list_users("nowhere.example")


def test_set_password_replaces_hash(store):
    populate(store)
    before = store.password_record("alice@example.org")[1]
    store.set_password("alice@example.org", "new secret")
    after = store.password_record("alice@example.org")[1]
    assert before != after and after.startswith("$argon2id$")
    assert passwords.verify_password("new secret", after) == (True, None)


# -- aliases -------------------------------------------------------------------------------------
def test_alias_add_list_remove(store):
    populate(store)
    info = store.add_alias("Sales@Example.org", ["ALICE@example.org", "Partner@Remote.Example",
                                                 "alice@example.org"])
    assert info.source == "sales@example.org"
    # Local targets are lower-cased, a remote local part keeps its case; duplicates collapsed.
    assert info.targets == ("alice@example.org", "Partner@remote.example")
    store.add_alias("sales@example.org", ["bob@example.org"])
    store.add_alias("@example.net", ["dave@example.net"])
    assert [(a.source, a.targets) for a in store.list_aliases()] == [
        ("@example.net", ("dave@example.net",)),
        ("sales@example.org", ("alice@example.org", "Partner@remote.example", "bob@example.org"))]
    assert [a.source for a in store.list_aliases("example.net")] == ["@example.net"]
    with pytest.raises(DirectoryError, match="already exists"):
        store.add_alias("sales@example.org", ["bob@example.org"])
    with pytest.raises(DirectoryError, match="not in a hosted domain"):
        store.add_alias("sales@remote.example", ["alice@example.org"])
    with pytest.raises(DirectoryError, match="not in a hosted domain"):
        store.add_alias("@remote.example", ["alice@example.org"])
    with pytest.raises(DirectoryError, match="invalid"):
        store.add_alias("x@example.org", ["not-an-address"])
    with pytest.raises(DirectoryError, match="point to itself"):
        store.add_alias("x@example.org", ["X@example.org"])
    with pytest.raises(DirectoryError, match="has no target carol@example.org"):
        store.remove_alias("sales@example.org", ["carol@example.org"])
    assert store.remove_alias("sales@example.org", ["partner@REMOTE.example"]) == 1
    assert store.route("sales@example.org").remote == ()
    assert store.remove_alias("sales@example.org") == 2
    with pytest.raises(DirectoryError, match="no alias sales@example.org"):
        store.remove_alias("sales@example.org")


# -- routing -------------------------------------------------------------------------------------
def test_route_users_case_and_tags(store):
    populate(store)
    assert store.route("alice@example.org") == Route("alice@example.org", True,
                                                     ("alice@example.org",))
    assert store.route("ALICE@EXAMPLE.ORG").mailboxes == ("alice@example.org",)
    assert store.route("<Alice@Example.org>").mailboxes == ("alice@example.org",)
    tagged = store.route("Alice+News@example.org")
    assert tagged.address == "alice+news@example.org"
    assert tagged.mailboxes == ("alice@example.org",) and tagged.exists
    assert store.route("alice+a+b@example.org").mailboxes == ("alice@example.org",)
    assert not store.route("nobody@example.org").exists
    assert store.route("nobody@example.org").hosted
    assert not store.route("+tag@example.org").exists


def test_route_tagged_address_that_is_itself_an_alias(store):
    populate(store)
    store.add_alias("alice+lists@example.org", ["bob@example.org"])
    assert store.route("alice+lists@example.org").mailboxes == ("bob@example.org",)
    assert store.route("alice+other@example.org").mailboxes == ("alice@example.org",)
    store.add_user("carol+work@example.org", password_hash=_HASH)
    assert store.route("carol+work@example.org").mailboxes == ("carol+work@example.org",)


def test_route_not_hosted(store):
    populate(store)
    route = store.route("Someone@Elsewhere.Example")
    assert route == Route("Someone@elsewhere.example", False)
    assert not route.exists
    assert store.route("no-domain-at-all") == Route("no-domain-at-all", False)


def test_route_nested_multi_target_and_remote(store):
    populate(store)
    store.add_alias("team@example.org", ["sales@example.org", "carol+team@example.org",
                                         "Boss@Partner.Example"])
    store.add_alias("sales@example.org", ["alice@example.org", "bob@example.org",
                                          "boss@partner.example"])
    route = store.route("TEAM@example.org")
    assert route.mailboxes == ("alice@example.org", "bob@example.org", "carol@example.org")
    # Remote local parts keep their case and are not merged case-insensitively.
    assert route.remote == ("boss@partner.example", "Boss@partner.example")
    store.add_alias("everyone@example.org", ["team@example.org", "sales@example.org",
                                             "alice@example.org", "dave@example.net"])
    route = store.route("everyone@example.org")
    assert route.mailboxes == ("alice@example.org", "bob@example.org", "carol@example.org",
                               "dave@example.net")  # duplicates collapsed, first-seen order


def test_route_cycles_terminate(store):
    populate(store)
    store.add_alias("a@example.org", ["b@example.org"])
    store.add_alias("b@example.org", ["c@example.org"])
    store.add_alias("c@example.org", ["a@example.org"])
    started = time.monotonic()
    assert not store.route("a@example.org").exists
    store.add_alias("b@example.org", ["bob@example.org"])
    assert store.route("a@example.org").mailboxes == ("bob@example.org",)
    assert store.route("c@example.org").mailboxes == ("bob@example.org",)
    # A user forwarding to itself and someone else keeps a copy; two users forwarding to each
    # other both get it.
    store.add_alias("alice@example.org", ["alice@example.org", "carol@example.org"])
    assert store.route("alice@example.org").mailboxes == ("alice@example.org",
                                                          "carol@example.org")
    store.add_alias("carol@example.org", ["alice@example.org"])
    assert set(store.route("carol@example.org").mailboxes) == {"alice@example.org",
                                                               "carol@example.org"}
    assert time.monotonic() - started < 10


def test_route_depth_is_bounded(store):
    populate(store)
    for i in range(MAX_DEPTH + 5):
        store.add_alias(f"l{i}@example.org", [f"l{i + 1}@example.org"])
    store.add_alias(f"l{MAX_DEPTH + 5}@example.org", ["alice@example.org"])
    assert not store.route("l0@example.org").exists  # too deep: refused, not a hang
    assert store.route(f"l{10}@example.org").mailboxes == ("alice@example.org",)


def test_route_wide_diamond_is_fast(store):
    populate(store)
    # 2^9 paths through 27 aliases, 19 levels deep: expansion must not follow every path.
    for i in range(9):
        store.add_alias(f"d{i}@example.org", [f"x{i}@example.org", f"y{i}@example.org"])
        store.add_alias(f"x{i}@example.org", [f"d{i + 1}@example.org"])
        store.add_alias(f"y{i}@example.org", [f"d{i + 1}@example.org"])
    store.add_alias("d9@example.org", ["bob@example.org"])
    started = time.monotonic()
    assert store.route("d0@example.org").mailboxes == ("bob@example.org",)
    assert time.monotonic() - started < 5


def test_catch_all_only_when_nothing_else_matches(store):
    populate(store)
    store.add_alias("@example.org", ["carol@example.org"])
    store.add_alias("sales@example.org", ["bob@example.org"])
    assert store.route("alice@example.org").mailboxes == ("alice@example.org",)
    assert store.route("sales@example.org").mailboxes == ("bob@example.org",)
    assert store.route("alice+tag@example.org").mailboxes == ("alice@example.org",)
    assert store.route("whoever@EXAMPLE.org").mailboxes == ("carol@example.org",)
    assert store.route("whoever+tag@example.org").mailboxes == ("carol@example.org",)
    assert not store.route("whoever@example.net").exists  # catch-alls are per domain
    # A catch-all pointing into its own domain at an address that does not exist: no loop.
    store.add_alias("@example.net", ["ghost@example.net"])
    assert not store.route("x@example.net").exists


def test_postmaster_always_exists(store):
    populate(store)
    # 1. [server] admin_address when no alias is defined.
    route = store.route("PostMaster@example.org")
    assert route.hosted and route.remote == ("boss@admin.example",) and route.exists
    assert store.route("postmaster@example.net").remote == ("boss@admin.example",)
    assert store.route("Postmaster").remote == ("boss@admin.example",)  # RFC 5321 §4.5.1
    # 2. An alias wins, and so does a user.
    store.add_alias("postmaster@example.org", ["bob@example.org"])
    assert store.route("postmaster@example.org").mailboxes == ("bob@example.org",)
    assert store.route("postmaster+x@example.org").mailboxes == ("bob@example.org",)
    # 3. Implicit postmaster is preferred to the catch-all.
    store.add_alias("@example.net", ["dave@example.net"])
    assert store.route("postmaster@example.net").remote == ("boss@admin.example",)


def test_postmaster_without_admin_address(db_url, store):
    populate(store)
    plain = DirectoryStore(db_url)  # admin_address = ""
    try:
        # The oldest user of the domain, else the oldest user of any domain.
        assert plain.route("postmaster@example.org").mailboxes == ("alice@example.org",)
        assert plain.route("postmaster@example.net").mailboxes == ("dave@example.net",)
        plain.add_domain("empty.example")
        assert plain.route("postmaster@empty.example").mailboxes == ("alice@example.org",)
        assert plain.route("postmaster").mailboxes == ("alice@example.org",)
    finally:
        plain.close()


def test_disabled_users_still_receive_mail(store):
    populate(store)
    store.set_enabled("bob@example.org", False)
    assert store.route("bob@example.org").mailboxes == ("bob@example.org",)


# -- sender addresses ----------------------------------------------------------------------------
def test_sender_addresses(store):
    populate(store)
    store.add_alias("sales@example.org", ["alice@example.org", "bob@example.org"])
    store.add_alias("team@example.org", ["sales@example.org"])
    store.add_alias("info@example.net", ["alice+info@example.org"])
    store.add_alias("fwd@example.org", ["partner@remote.example"])
    store.add_alias("loop1@example.org", ["loop2@example.org"])
    store.add_alias("loop2@example.org", ["loop1@example.org", "Alice@example.org"])
    store.add_alias("@example.org", ["alice@example.org"])  # catch-alls give no sender rights
    store.add_alias("x@example.org", ["ghost@example.org"])  # reaches alice via the catch-all
    # An alias on alice's own address forwarding elsewhere: it no longer reaches her.
    store.add_alias("carol@example.org", ["bob@example.org"])
    assert store.sender_addresses("Alice@Example.org") == frozenset({
        "alice@example.org", "sales@example.org", "team@example.org", "info@example.net",
        "loop1@example.org", "loop2@example.org", "x@example.org"})
    assert store.sender_addresses("bob@example.org") == frozenset({
        "bob@example.org", "sales@example.org", "team@example.org", "carol@example.org"})
    assert store.sender_addresses("dave@example.net") == frozenset({"dave@example.net"})


def test_lookups_run_on_the_driver_connection(store):
    """route and sender_addresses, once per RCPT / MAIL FROM, skip SQLAlchemy's statement
    execution (docs/design/directory.md, "Look-ups without the ORM"); the answers are those of
    test_sender_addresses and the routing tests, also through the postmaster fallback."""
    populate(store)
    store.add_alias("sales@example.org", ["alice@example.org", "bob+x@example.org"])
    store.add_sender("bob@example.org", "@example.net")
    executed: list[str] = []
    event.listen(store.engine, "before_cursor_execute",
                 lambda _conn, _cursor, sql, *_rest: executed.append(sql))
    assert store.route("Sales@example.org").mailboxes == ("alice@example.org",
                                                          "bob@example.org")
    store.admin_address = ""  # the fallback's statements are built per call: compiled per call
    assert store.route("postmaster@example.net").mailboxes == ("dave@example.net",)
    assert store.route("nobody@example.org") == Route("nobody@example.org", True)
    assert store.sender_addresses("bob@example.org") == frozenset({
        "bob@example.org", "sales@example.org", "@example.net"})
    assert executed == []


def test_lookup_failure_is_unavailable_and_the_next_one_works(store):
    """A driver error in a look-up: one line, the connection dropped, the next look-up fine."""
    populate(store)
    with store.engine.begin() as conn:
        conn.execute(text("DROP TABLE ms_alias"))
    for call in (lambda: store.route("alice@example.org"),
                 lambda: store.sender_addresses("alice@example.org")):
        with pytest.raises(DirectoryUnavailable) as e:
            call()
        assert "\n" not in str(e.value) and str(e.value).startswith("database ")
    store.prepare()  # creates the table again
    assert store.route("alice@example.org").mailboxes == ("alice@example.org",)
    assert store.sender_addresses("alice@example.org") == frozenset({"alice@example.org"})


def test_changes_are_seen_by_another_store_at_once(db_url, store):
    """What `mailsuite user add` (another process) relies on: no caching."""
    populate(store)
    other = DirectoryStore(db_url)
    try:
        assert not other.route("erin@example.org").exists
        store.add_user("erin@example.org", password_hash=_HASH)
        assert other.route("erin@example.org").mailboxes == ("erin@example.org",)
        store.remove_user("erin@example.org")
        assert not other.route("erin@example.org").exists
    finally:
        other.close()


def test_unsupported_database_url():
    # An unreachable server is tested in tests/scenario/test_directory_postgresql.py.
    with pytest.raises(DirectoryError, match="unsupported database URL"):
        DirectoryStore("oracle+nothing://x/y")


# -- passwords (pure functions) ------------------------------------------------------------------
def test_dovecot_and_legacy_hash_forms():
    legacy = sha512_crypt.using(rounds=5000).hash(PASSWORD)
    salt = os.urandom(32)  # longer than passlib's ldap_salted_sha512 accepts (4-16 bytes)
    ssha512 = base64.b64encode(hashlib.sha512(PASSWORD.encode() + salt).digest() + salt).decode()
    blf = bcrypt.using(rounds=4).hash(PASSWORD).replace("$2b$", "$2y$")
    cases = [legacy, "{SHA512-CRYPT}" + legacy, "{SSHA512}" + ssha512, "{BLF-CRYPT}" + blf,
             "{SHA256.HEX}" + hashlib.sha256(PASSWORD.encode()).hexdigest(), "{PLAIN}" + PASSWORD]
    for stored in cases:
        ok, new_hash = passwords.verify_password(PASSWORD, stored)
        assert ok and new_hash.startswith("$argon2id$"), stored
        assert passwords.verify_password("wrong", stored) == (False, None), stored
    argon = passwords.hash_password(PASSWORD)
    assert passwords.verify_password(PASSWORD, "{ARGON2ID}" + argon) == (True, argon)
    assert passwords.verify_password(PASSWORD, argon) == (True, None)
    for junk in ["", "garbage", "{UNKNOWN}abc", "{SSHA512}!!!", "$6$broken"]:
        assert passwords.verify_password(PASSWORD, junk) == (False, None)


# -- the asynchronous Directory, on the reactor --------------------------------------------------

"""Addresses that name directories (docs/design/directory.md): `user add` refuses a local part or
domain that is a valid address but unsafe as a Maildir name; aliases keep every RFC-valid
character; an account imported with such a name (straight into the database) gets no Maildir
path and cannot log in, and mail to it is deferred, never written outside mail_dir."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select
from twisted.cred.error import UnauthorizedLogin

from mailsuite.config import Config
from mailsuite.delivery.local import LocalAgent
from mailsuite.directory import Directory, DirectoryError, DirectoryStore
from mailsuite.directory.addresses import (mailbox_address, mailbox_address_problem,
                                           mailbox_local_problem, sender_allowed)
from mailsuite.directory.models import Domain, User
from mailsuite.mailbox.store import InvalidMailboxName, MailStore
from mailsuite.pools import InlinePool
from mailsuite.queue.spool import QueueEntry, Recipient
from tests.unit.test_directory_store import _HASH, PASSWORD

# Valid RFC 5321 dot-atoms (or close to it) that must never become a directory name.
UNSAFE_LOCAL = ["a/b", "/tmp/x/evil", "alice/.sent", "a\\b", "..", "x/../../y", "a\x85b",
                "a\u202eb", "a\u200bb", "a\u2028b", "a\udcffb", "/", "a\x00b", "a\x7fb",
                ".hidden", "a..b", "a\nb", "a\tb", "a\x01b"]


@pytest.fixture
def store(tmp_path, prepared_directory):
    s = DirectoryStore(prepared_directory(str(tmp_path / "directory.db")))
    s.prepare()
    s.add_domain("example.org")
    yield s
    s.close()


@pytest.mark.parametrize("local", UNSAFE_LOCAL)
def test_user_add_refuses_unsafe_local_parts(store, local):
    address = f"{local}@example.org"
    with pytest.raises(DirectoryError) as e:
        store.check_new_user(address)
    assert str(e.value).startswith("invalid address") and "\n" not in str(e.value)
    with pytest.raises(DirectoryError):
        store.add_user(address, password_hash=_HASH)
    assert store.list_users() == []


@pytest.mark.parametrize("domain", ["exa/mple.org", "..", "a\\b.org", ".example.org",
                                    "example.org/..", "exa\x00mple.org", "ex\udcffample.org"])
def test_unsafe_domains_are_refused(store, domain):
    with pytest.raises(DirectoryError):
        store.add_domain(domain)
    with pytest.raises(DirectoryError):
        mailbox_address(f"alice@{domain}")


def test_safe_names_are_kept():
    for address in ["alice@example.org", "o'brien+tag@example.org", "a.b-c_d@example.org",
                    "jörg@bücher.example", "x!#$%&*=?^`{|}~@example.org"]:
        assert mailbox_address(address) == address.lower().replace("bücher",
                                                                    "xn--bcher-kva")
        assert mailbox_address_problem(mailbox_address(address)) is None
    assert mailbox_local_problem("a/b") and mailbox_local_problem(".x")


def test_aliases_keep_rfc_characters_but_never_make_a_mailbox(store):
    """An alias source or target is not a directory: a/b@ is fine there. A target only becomes a
    mailbox if it is a user, and no user can be added with such a name."""
    store.add_user("alice@example.org", password_hash=_HASH)
    store.add_alias("a/b@example.org", ["alice@example.org"])
    store.add_alias("team@example.org", ["x/y@example.org", "alice@example.org"])
    assert store.route("a/b@example.org").mailboxes == ("alice@example.org",)
    assert store.route("team@example.org").mailboxes == ("alice@example.org",)
    assert not store.route("x/y@example.org").exists  # not a user: no mailbox, ever


def _import(store: DirectoryStore, address: str) -> None:
    """What an import script could do: insert a user row directly, bypassing `user add`."""
    with store._unit(write=True) as s:
        domain_id = s.scalar(select(Domain.id).where(Domain.name == address.rpartition("@")[2]))
        s.execute(insert(User).values(address=address, password_hash=_HASH, domain_id=domain_id))


@pytest.mark.parametrize("local", ["/tmp/x/evil", "alice/.sent", "../../etc", "a\\b", ".x"])
def test_imported_unsafe_user_gets_no_maildir_and_no_login(tmp_path, store, local):
    store.add_user("alice@example.org", password_hash=_HASH)
    address = f"{local}@example.org"
    _import(store, address)
    route = store.route(address)
    assert route.mailboxes == (address,)  # the directory still knows the account ...
    mail_dir = tmp_path / "data" / "mail"
    mailstore = MailStore(str(mail_dir))
    with pytest.raises(InvalidMailboxName):  # ... but it has no Maildir path
        mailstore.account(address)
    message = tmp_path / "msg.eml"
    message.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    agent = LocalAgent(mailstore, InlinePool(), "mx.example")
    entry = QueueEntry("6b0a0000000000000000b", "carol@remote.example",
                       [Recipient(address, address, True)], 0.0)
    results: list = []
    agent.deliver(entry, entry.recipients, str(message)).addCallback(results.extend)
    assert [r.status for r in results] == ["deferred"]  # kept in the queue, logged by it
    assert results[0].detail.startswith("451 4.3.0")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert not any("evil" in p or ".sent" in p or "etc" in p for p in before)

    config = Config()
    config.server.data_dir = str(tmp_path / "data")
    config.database.url = store.url
    config.limits.auth_failure_delay = 0
    directory = Directory(config, SimpleNamespace(db=InlinePool(), hash=InlinePool()))
    try:
        outcome: list = []
        directory.authenticate(address, PASSWORD).addBoth(outcome.append)
        assert outcome[0].check(UnauthorizedLogin)
        ok: list = []
        directory.authenticate("alice@example.org", PASSWORD).addBoth(ok.append)
        assert ok == ["alice@example.org"]
    finally:
        directory.close()
    assert not os.path.exists("/tmp/x/evil")


def test_sender_allowed():
    allowed = frozenset({"alice@example.org", "Shared@Example.org", "@example.net"})
    assert sender_allowed(allowed, "alice@example.org")
    assert sender_allowed(allowed, "ALICE+lists@example.org")
    assert sender_allowed(allowed, "shared@example.org")
    assert sender_allowed(allowed, "anyone@EXAMPLE.net")
    assert not sender_allowed(allowed, "bob@example.org")
    assert not sender_allowed(allowed, "alice@example.org.evil")
    assert not sender_allowed(allowed, "@example.net")
    assert not sender_allowed(allowed, "not an address")


ANY_CHARACTER = st.characters(exclude_categories=())  # surrogates too: undecodable bytes


@settings(max_examples=300, deadline=None)
@given(local=st.one_of(st.text(max_size=70), st.text(alphabet=ANY_CHARACTER, max_size=20),
                      st.text(alphabet="a./\\\x00\x85\u202e+", max_size=12)),
       domain=st.one_of(st.sampled_from(["example.org", "bücher.example", "EXAMPLE.org."]),
                        st.text(alphabet=ANY_CHARACTER, max_size=30)))
def test_any_address_user_add_accepts_has_a_maildir_under_mail_dir(local, domain):
    """Property: whatever `user add` accepts maps to a directory directly under
    <mail_dir>/<domain>/, and anything else is a one-line DirectoryError (never another
    exception)."""
    try:
        address = mailbox_address(f"{local}@{domain}")
    except DirectoryError as e:
        assert "\n" not in str(e)
        return
    mail_dir = "/srv/mail"
    path = MailStore(mail_dir).account(address).path
    assert os.path.dirname(os.path.dirname(path)) == mail_dir
    assert os.path.normpath(path) == path and os.path.basename(path) not in (".", "..")
    assert mailbox_address_problem(address) is None

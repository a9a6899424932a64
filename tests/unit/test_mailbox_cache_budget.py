"""The store's folder states in memory: bounded (LRU by count and estimated bytes) and dropped
once no Folder uses them (docs/design/maildir.md, "Folder states in memory")."""
from __future__ import annotations

import gc
import os

from mailsuite.mailbox.index import MESSAGE_BYTES
from mailsuite.mailbox.store import MailStore

from tests.unit.imapkit import world  # noqa: F401
from tests.unit.test_mailbox_store import deliver


def make_account(tmp_path, **limits):
    store = MailStore(str(tmp_path / "mail"), **limits)
    account = store.account("alice@example.org")
    account.ensure_layout()
    return store, account


def test_an_unused_folder_over_the_budget_is_dropped_when_its_last_folder_goes(tmp_path):
    store, account = make_account(tmp_path, folder_cache_bytes=50 * MESSAGE_BYTES)
    deliver(account.path, 100)
    inbox = account.folder("INBOX")
    second = account.folder("INBOX")  # two sessions on one folder share one state
    assert len(inbox.sync()) == 100
    assert store.cached_folders() == {}  # in use: not part of the cache
    del inbox
    gc.collect()
    assert store.cached_folders() == {}  # still used by the second session
    assert account.path in store.loaded_folders()
    del second
    gc.collect()
    # Unused and larger than the whole budget: gone from memory, not only from the cache.
    assert store.cached_folders() == {}
    assert account.path not in store.loaded_folders()


def test_small_unused_folders_stay_cached_up_to_the_count_and_least_recent_goes(tmp_path):
    store, account = make_account(tmp_path, max_cached_folders=2)
    names = ["Sent", "Drafts", "Trash"]
    for name in names:
        f = account.folder(name)
        f.sync()
        del f
        gc.collect()
    cached = store.cached_folders()
    paths = {n: os.path.join(account.path, "." + n) for n in names}
    assert set(cached) == {paths["Drafts"], paths["Trash"]}
    # Using Drafts again, then Sent, leaves Trash the least recently used one: it goes.
    account.folder("Drafts").sync()
    account.folder("Sent").sync()
    gc.collect()
    assert set(store.cached_folders()) == {paths["Drafts"], paths["Sent"]}
    assert all(b > 0 for b in store.cached_folders().values())


def test_a_folder_reopened_after_eviction_has_the_same_uids_flags_and_modseqs(tmp_path):
    store, account = make_account(tmp_path, max_cached_folders=0, folder_cache_bytes=0)
    deliver(account.path, 30)
    inbox = account.folder("INBOX")
    inbox.sync()
    inbox.add_flags(3, ["\\Seen", "$Work"])
    inbox.add_flags(7, ["\\Flagged"])
    inbox.expunge([5])
    before = [(m.uid, m.key, m.flags, m.size, m.internaldate) for m in inbox.sync()]
    modseqs = inbox.modseqs(range(1, 31))
    highest = inbox.highest_modseq()
    del inbox
    gc.collect()
    assert account.path not in store.loaded_folders()
    again = account.folder("INBOX")
    assert [(m.uid, m.key, m.flags, m.size, m.internaldate) for m in again.sync()] == before
    assert again.modseqs(range(1, 31)) == modseqs
    assert again.highest_modseq() == highest


def test_imap_sessions_hold_a_folder_and_close_releases_it(world):  # noqa: F811
    """Over IMAP: a selected folder stays in memory; after CLOSE (and LOGOUT of the other
    session) the store drops it, its cache budget being smaller than the folder."""
    world.store = MailStore(world.config.mail_dir, folder_cache_bytes=20 * MESSAGE_BYTES)
    for i in range(40):
        world.append("alice@example.org", "Big", b"Subject: %d\r\n\r\nx\r\n" % i)
    gc.collect()
    big = world.maildir("alice@example.org", "Big")
    assert big not in world.store.loaded_folders()
    a, b = world.connect(), world.connect()
    a.cmd(b"s SELECT Big")
    b.cmd(b"s EXAMINE Big")
    a.cmd(b"f FETCH 1:* (UID FLAGS BODY.PEEK[HEADER])")
    a.cmd(b"c CLOSE")
    gc.collect()
    assert big in world.store.loaded_folders()  # b still shows it
    b.cmd(b"l LOGOUT")
    b.close()  # the protocol object lives on (b holds it), its selection does not
    gc.collect()
    assert big not in world.store.loaded_folders()
    assert world.store.cached_folders() == {}
    a.cmd(b"s SELECT Big")  # reopened from disk: the same messages
    assert any(b"40 EXISTS" in line for line in a.cmd(b"n NOOP") + a.cmd(b"e EXAMINE Big"))

"""What a synced folder answers without its lock (docs/design/maildir.md, "Reading without the
lock"): the lock's holder may be fsyncing for another session, and readers must not queue
behind it. The folder's lock is replaced by one that refuses to be taken."""
from __future__ import annotations

import threading

import pytest

from mailsuite.mailbox.store import NoSuchMessage
from mailsuite.imap.fetch import extract_header
from mailsuite.imap.selection import refresh_folder, sync_folder
from tests.unit.test_mailbox_store import account  # noqa: F401 (the fixture: a laid-out account)

BODY = b"From: a@example.net\r\nSubject: hi\r\n\r\nhello\r\n"


class Busy:
    """A lock another thread holds: acquire(blocking=False) fails, waiting is a test failure."""

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if blocking:
            raise AssertionError("waited for the folder lock")
        return False

    def release(self) -> None:
        raise AssertionError("released a lock it did not take")

    def __enter__(self):
        self.acquire()

    def __exit__(self, *exc):
        return False


def test_open_and_headers_of_a_synced_folder_take_no_lock(account):
    folder = account.folder("INBOX")
    uids = [folder.append(BODY) for _ in range(3)]
    folder.sync()
    state = folder._state
    real, state.lock = state.lock, Busy()
    try:
        with folder.open_message(uids[1]) as f:
            assert f.read() == BODY
        assert set(folder.headers(uids, extract_header)) == set(uids)
        with pytest.raises(NoSuchMessage):
            folder.open_message(999)  # never listed, no pin: gone for good
    finally:
        state.lock = real


def test_a_pinned_expunged_message_is_read_from_its_held_copy_without_the_lock(account):
    viewer = account.folder("INBOX")
    viewer.selected = True
    uid = viewer.append(BODY)
    viewer.sync()  # the viewer shows uid
    other = account.folder("INBOX")
    assert other.expunge([uid]) == [uid]
    state = viewer._state
    real, state.lock = state.lock, Busy()
    try:
        with viewer.open_message(uid) as f:
            assert f.read() == BODY
        # Announced: the pin goes back; with the lock busy the file stays until a sync.
        assert viewer.release([uid])
        viewer.drain_held()
        assert uid in state.held
    finally:
        state.lock = real
    other.sync()
    assert uid not in state.held


def test_refresh_is_none_while_the_token_holds_and_a_state_after_a_change(account):
    folder = account.folder("INBOX")
    folder.append(BODY)
    sync_folder(folder)  # the first sync gives the messages their mod-sequences
    st = sync_folder(folder)
    assert refresh_folder(folder, st.token) is None
    uid = account.folder("INBOX").append(BODY, flags=["$Work"])
    fresh = refresh_folder(folder, st.token)
    assert fresh is not None and fresh.infos[-1].uid == uid
    assert fresh.uidnext == uid + 1 and "$Work" in fresh.keywords
    assert fresh.uidvalidity == st.uidvalidity and fresh.highestmodseq > st.highestmodseq


def test_the_token_of_a_sync_holds_until_something_changes(account):
    folder = account.folder("INBOX")
    folder.append(BODY)
    st = sync_folder(folder)
    assert st.token == folder.state_token()
    assert refresh_folder(folder, st.token) is None


def test_refresh_after_a_change_of_this_process_syncs_without_state_token(account, monkeypatch):
    folder = account.folder("INBOX")
    folder.append(BODY)
    st = sync_folder(folder)
    uid = folder.append(BODY)  # another generation: the token cannot match
    monkeypatch.setattr(folder, "state_token", lambda: pytest.fail("stat()ed for the token"))
    fresh = refresh_folder(folder, st.token)
    assert fresh is not None and fresh.infos[-1].uid == uid
    monkeypatch.undo()
    assert refresh_folder(folder, fresh.token) is None


def test_a_change_by_another_process_after_a_sync_is_seen(account, tmp_path):
    from mailsuite.mailbox.store import MailStore
    folder = account.folder("INBOX")
    folder.append(BODY)
    st = sync_folder(folder)
    other = MailStore(str(tmp_path / "mail")).account("alice@example.org").folder("INBOX")
    uid = other.append(BODY)
    fresh = refresh_folder(folder, st.token)
    assert fresh is not None and fresh.infos[-1].uid == uid


def test_busy_lock_test_double_refuses_to_wait():
    with pytest.raises(AssertionError):
        with Busy():
            pass
    assert threading.RLock().acquire(blocking=False)  # the real lock type has the same call

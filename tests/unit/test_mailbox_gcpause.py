"""A full sync runs with the cyclic garbage collector paused and leaves it as it found it
(docs/design/maildir.md, "Syncing a folder"; mailsuite/mailbox/gcpause.py)."""
from __future__ import annotations

import gc

import pytest

from mailsuite.mailbox import index
from mailsuite.mailbox.gcpause import collector_paused
from tests.unit.test_mailbox_store import account, deliver  # noqa: F401 (fixture)


@pytest.fixture
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def _record_collector(monkeypatch) -> list[bool]:
    seen: list[bool] = []
    real = index.FolderIndex._sync

    def spy(self):
        seen.append(gc.isenabled())
        return real(self)

    monkeypatch.setattr(index.FolderIndex, "_sync", spy)
    return seen


def test_full_sync_pauses_the_collector_and_a_later_one_does_not(account, monkeypatch,
                                                                 collector_on):
    deliver(account.path, 20)
    seen = _record_collector(monkeypatch)
    inbox = account.folder("INBOX")
    assert len(inbox.sync()) == 20
    assert gc.isenabled()
    deliver(account.path, 1, start=20)
    assert len(inbox.sync()) == 21
    assert seen == [False, True]
    assert gc.isenabled()


def test_a_failed_full_sync_turns_the_collector_back_on(account, monkeypatch, collector_on):
    def broken(self):
        assert not gc.isenabled()
        raise OSError("disk gone")

    monkeypatch.setattr(index.FolderIndex, "_sync", broken)
    with pytest.raises(OSError):
        account.folder("INBOX").sync()
    assert gc.isenabled()


def test_overlapping_pauses_end_with_the_last_one(collector_on):
    outer, inner = collector_paused(), collector_paused()
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # the first to begin ends first
    assert not gc.isenabled()
    inner.__exit__(None, None, None)
    assert gc.isenabled()


def test_a_collector_someone_turned_off_stays_off(collector_on):
    gc.disable()
    with collector_paused():
        pass
    assert not gc.isenabled()

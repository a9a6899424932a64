"""A lockless read of dovecot-uidlist may see part of another process's append (a write that
crosses a page boundary becomes visible a page at a time): the half line is left for the next
read, which starts at a line boundary, so no key gets a wrong or a second UID."""
from __future__ import annotations

import os

import pytest

from mailsuite.mailbox.dotlock import DotLock
from mailsuite.mailbox.errors import LockBusy
from mailsuite.mailbox.maildir import UIDLIST
from mailsuite.mailbox.store import MailStore
from tests.unit.test_mailbox_store import deliver


@pytest.fixture
def inbox(tmp_path):
    account = MailStore(str(tmp_path / "mail")).account("alice@example.org")
    account.ensure_layout()
    deliver(account.path, 3)
    folder = account.folder("INBOX")
    assert [m.uid for m in folder.sync()] == [1, 2, 3]
    return account, folder


def another_process_files(account, n: int) -> str:
    """A message another process has put into cur/ and is numbering right now."""
    key = deliver(account.path, 1, start=n)[0]
    os.rename(os.path.join(account.path, "new", key), os.path.join(account.path, "cur", key))
    return key


@pytest.mark.parametrize("cut", [3, 12, 30])  # in the UID, in the key, just before the end
def test_a_half_appended_line_is_read_once_it_is_whole(inbox, cut):
    account, folder = inbox
    key = another_process_files(account, 10)
    line = f"4 :{key}\n".encode()
    path = os.path.join(account.path, UIDLIST)
    with DotLock(path), open(path, "ab") as f:  # the other process, appending
        f.write(line[:cut])  # what a reader can see halfway through the append
        f.flush()
        # Our sync now: the new file has no UID it can read, and numbering it needs the
        # dotlock, which is busy: it is left for later (the server's LockWaitingPool retries).
        with pytest.raises(LockBusy):
            folder.sync()
        f.write(line[cut:])
    assert {m.key: m.uid for m in folder.sync()}[key] == 4
    fresh = MailStore(account.store.mail_dir).account("alice@example.org").folder("INBOX")
    assert {m.key: m.uid for m in fresh.sync()}[key] == 4


"""dovecot-uidlist keeps the lines of expunged messages until enough have gathered for one
rewrite (docs/design/maildir.md, "Dovecot's files"): an EXPUNGE costs no rewrite and no fsync
of the whole list."""
from __future__ import annotations

import os

from mailsuite.mailbox import uidfile
from mailsuite.mailbox.maildir import UIDLIST, read_uidlist
from mailsuite.mailbox.store import MailStore
from tests.unit.test_mailbox_store import deliver


def uidlist_lines(path: str) -> list[str]:
    with open(os.path.join(path, UIDLIST)) as f:
        return f.read().splitlines()[1:]


def test_expunge_leaves_the_uidlist_alone_until_the_slack_is_used(tmp_path, monkeypatch):
    monkeypatch.setattr(uidfile, "UIDLIST_SLACK", 3)
    account = MailStore(str(tmp_path / "mail")).account("alice@example.org")
    account.ensure_layout()
    deliver(account.path, 8)
    inbox = account.folder("INBOX")
    inbox.sync()
    inode = os.stat(os.path.join(account.path, UIDLIST)).st_ino
    assert inbox.expunge([1]) == [1] and inbox.expunge([2]) == [2]
    assert os.stat(os.path.join(account.path, UIDLIST)).st_ino == inode  # not rewritten
    assert len(uidlist_lines(account.path)) == 8
    assert [m.uid for m in inbox.sync()] == [3, 4, 5, 6, 7, 8]
    # A fresh process reads the stale lines and still lists only what is there.
    fresh = MailStore(str(tmp_path / "mail")).account("alice@example.org").folder("INBOX")
    assert [m.uid for m in fresh.sync()] == [3, 4, 5, 6, 7, 8]
    assert inbox.expunge([3]) == [3]  # the third stale line: one rewrite drops them all
    assert [line.split(" ")[0] for line in uidlist_lines(account.path)] == \
        ["4", "5", "6", "7", "8"]
    assert read_uidlist(os.path.join(account.path, UIDLIST)).nextuid == 9
    deliver(account.path, 1, start=20)
    assert [m.uid for m in inbox.sync()] == [4, 5, 6, 7, 8, 9]

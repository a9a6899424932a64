"""The mailbox store with several processes on one Maildir: UIDs are never assigned twice."""
from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from mailsuite.mailbox.errors import LockBusy
from mailsuite.mailbox.maildir import UIDLIST, read_uidlist
from mailsuite.mailbox.store import MailStore
from tests.unit.test_mailbox_store import deliver


@pytest.fixture
def account(tmp_path):
    acct = MailStore(str(tmp_path / "mail")).account("alice@example.org")
    acct.ensure_layout()
    return acct


def _worker(mail_dir: str, rounds: int, queue) -> None:
    try:
        _work(mail_dir, rounds, queue)
    except BaseException as e:  # report instead of leaving the parent waiting
        queue.put(repr(e))


def _patiently(fn, *args):
    """What the server's LockWaitingPool does, in a plain process: the store never waits for
    a dotlock another process holds (LockBusy), the caller tries again."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return fn(*args)
        except LockBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.002)


def _work(mail_dir: str, rounds: int, queue) -> None:
    acct = MailStore(mail_dir).account("alice@example.org")
    inbox = acct.folder("INBOX")
    seen = {}
    for i in range(rounds):
        uid = _patiently(inbox.append, b"Subject: from %d\r\n\r\nx\r\n" % os.getpid())
        seen[_patiently(inbox.get, uid).key] = uid
        for m in _patiently(inbox.sync):
            seen.setdefault(m.key, m.uid)
            assert seen[m.key] == m.uid, "a key changed its UID"
    queue.put(seen)


def test_concurrent_processes_never_assign_a_uid_twice(account):
    mail_dir = account.store.mail_dir
    deliver(account.path, 50)  # unassigned mail that both processes race to number
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(mail_dir, 60, q)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    merged: dict[str, int] = {}
    for seen in results:
        assert isinstance(seen, dict), seen
        for key, uid in seen.items():
            assert merged.setdefault(key, uid) == uid
    final = MailStore(mail_dir).account("alice@example.org").folder("INBOX").sync()
    assert len(final) == 50 + 3 * 60
    uids = [m.uid for m in final]
    assert len(set(uids)) == len(uids) == 230
    assert uids == sorted(uids)
    for m in final:
        assert merged.get(m.key, m.uid) == m.uid
    ul = read_uidlist(os.path.join(account.path, UIDLIST))
    assert sorted(ul.uids.values()) == uids and ul.nextuid == max(uids) + 1

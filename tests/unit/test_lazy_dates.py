"""INTERNALDATE on demand (docs/design/maildir.md, "Dates on demand"): files another MDA put
into new/ are not stat()ed at the first sync when their name carries `,S=`; FETCH, SEARCH and
SORT still see their real dates (the file's mtime), and so does a fresh process."""
from __future__ import annotations

import os
import re

import pytest

from mailsuite.mailbox.index import UNDATED
from mailsuite.mailbox.store import MailStore
from tests.unit.imapkit import simple, tagged, world  # noqa: F401

ALICE = "alice@example.org"
# mtimes far from the delivery seconds in the names, so a date taken from a name is caught.
DAY = 86400
DATES = {1: 1_500_000_000, 2: 1_500_000_000 + 10 * DAY, 3: 1_500_000_000 + 20 * DAY}


def _mda_files(world) -> dict[int, str]:
    """Three messages written by another MDA: the 2nd without `,S=`; mtimes out of name order
    is avoided so UID n has DATES[n]."""
    root = world.maildir(ALICE)
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    names = {}
    for n in (1, 2, 3):
        data = simple(f"msg {n}", body="x" * (10 * n) + "\r\n")
        key = f"{1_700_000_000 + n}.M{n}P9Q{n}.otherhost"
        if n != 2:
            key += f",S={len(data)}"
        path = os.path.join(root, "new", key)
        with open(path, "wb") as f:
            f.write(data)
        os.utime(path, (DATES[n], DATES[n]))
        names[n] = key
    return names


def _sizes(n: int) -> int:
    return len(simple(f"msg {n}", body="x" * (10 * n) + "\r\n"))


def test_first_sync_dates_nothing_named_with_size(world):
    _mda_files(world)
    infos = world.store.account(ALICE).folder("INBOX").sync()
    dates = {i.uid: i.date for i in infos}
    assert dates[1] == UNDATED and dates[3] == UNDATED
    assert dates[2] == DATES[2]  # no ,S=: stat()ed for its size, dated on the way
    assert [i.size for i in infos] == [_sizes(1), _sizes(2), _sizes(3)]


def test_fetch_internaldate_and_size_of_mda_files(world):
    _mda_files(world)
    r = world.connect()
    r.cmd(b"s SELECT INBOX")
    resp = r.cmd(b"f FETCH 1:3 (INTERNALDATE RFC822.SIZE)")
    assert tagged(resp).startswith(b"f OK")
    got = {int(m.group(1)): (m.group(2), int(m.group(3))) for line in resp[:-1]
           if (m := re.match(rb'\* (\d+) FETCH \(INTERNALDATE "([^"]+)" RFC822.SIZE (\d+)\)',
                             line))}
    assert got == {1: (b"14-Jul-2017 02:40:00 +0000", _sizes(1)),
                   2: (b"24-Jul-2017 02:40:00 +0000", _sizes(2)),
                   3: (b"03-Aug-2017 02:40:00 +0000", _sizes(3))}


def test_search_since_before_on_lazy_dates(world):
    _mda_files(world)
    r = world.connect()
    r.cmd(b"s SELECT INBOX")
    assert r.cmd(b"a SEARCH SINCE 20-Jul-2017")[0] == b"* SEARCH 2 3"
    assert r.cmd(b"b SEARCH BEFORE 20-Jul-2017")[0] == b"* SEARCH 1"
    assert r.cmd(b"c SEARCH ON 3-Aug-2017")[0] == b"* SEARCH 3"


def test_sort_arrival_uses_file_dates(world):
    names = _mda_files(world)
    # Make arrival order differ from UID order: the 1st message arrived last.
    world.store.account(ALICE).folder("INBOX").sync()
    cur = os.path.join(world.maildir(ALICE), "cur", names[1] + ":2,")
    late = DATES[3] + DAY
    os.utime(cur, (late, late))
    world.store = MailStore(world.config.mail_dir)  # a fresh process: nothing dated in memory
    r = world.connect()
    r.cmd(b"s SELECT INBOX")
    assert r.cmd(b"a SORT (ARRIVAL) UTF-8 ALL")[0] == b"* SORT 2 3 1"
    assert r.cmd(b"b SORT (REVERSE ARRIVAL) UTF-8 ALL")[0] == b"* SORT 1 3 2"


def test_dates_read_once_are_kept_for_a_fresh_process(world):
    names = _mda_files(world)
    r = world.connect()
    r.cmd(b"s SELECT INBOX")
    r.cmd(b"f FETCH 1:3 INTERNALDATE")
    with open(os.path.join(world.maildir(ALICE), "mailsuite-index"), encoding="utf-8") as f:
        recorded = {line.split("\t")[0] for line in f.read().splitlines()[1:]}
    assert recorded == set(names.values())
    fresh = MailStore(world.config.mail_dir).account(ALICE).folder("INBOX").sync()
    assert [i.date for i in fresh] == [DATES[1], DATES[2], DATES[3]]


def test_internaldate_without_bulk_dating_is_still_real(world):
    _mda_files(world)
    infos = world.store.account(ALICE).folder("INBOX").sync()
    assert [i.internaldate for i in infos] == [DATES[1], DATES[2], DATES[3]]
    assert [i.date for i in infos] == [DATES[1], DATES[2], DATES[3]]  # memoized


def test_moved_message_keeps_its_date(world):
    _mda_files(world)
    account = world.store.account(ALICE)
    account.create_folder("Archive")
    inbox = account.folder("INBOX")
    inbox.sync()
    inbox.move([1], account.folder("Archive"))
    moved = account.folder("Archive").sync()
    assert [i.internaldate for i in moved] == [DATES[1]]
    copied_from = inbox.sync()
    inbox.copy([3], account.folder("Archive"))
    assert [i.internaldate for i in account.folder("Archive").sync()] == [DATES[1], DATES[3]]
    assert [i.internaldate for i in copied_from] == [DATES[2], DATES[3]]


def _renamed_by_another_process(world, infos) -> None:
    """Another process changed the flags of UIDs 1 and 3 after our sync: their files have
    new names, which our MessageInfos do not know yet."""
    cur = os.path.join(world.maildir(ALICE), "cur")
    for info in (infos[0], infos[2]):
        os.rename(os.path.join(cur, info.name), os.path.join(cur, info.key + ":2,FS"))


def test_a_file_renamed_by_another_process_keeps_its_date(world):
    _mda_files(world)
    folder = world.store.account(ALICE).folder("INBOX")
    infos = folder.sync()
    _renamed_by_another_process(world, infos)
    assert infos[0].internaldate == DATES[1]
    folder.ensure_dates(infos)
    assert [i.date for i in infos] == [DATES[1], DATES[2], DATES[3]]
    fresh = MailStore(world.config.mail_dir).account(ALICE).folder("INBOX").sync()
    assert [i.internaldate for i in fresh] == [DATES[1], DATES[2], DATES[3]]


def test_an_expunged_files_date_is_a_guess_never_recorded(world):
    _mda_files(world)
    folder = world.store.account(ALICE).folder("INBOX")
    infos = folder.sync()
    os.unlink(infos[2].path)  # expunged by another process
    folder.ensure_dates(infos)
    assert infos[2].date == UNDATED  # the name's delivery second was answered, not memoized
    assert infos[2].internaldate == 1_700_000_003  # SEARCH and SORT may go by the guess
    assert infos[2].known_date() is None  # FETCH never sends it
    with open(os.path.join(world.maildir(ALICE), "mailsuite-index"), encoding="utf-8") as f:
        recorded = {line.split("\t")[0] for line in f.read().splitlines()[1:]}
    assert infos[2].key not in recorded and infos[0].key in recorded


def _appended_by_another_process(world):
    """(our folder, the other process's, the UID it appended with DATES[2], our undated
    MessageInfo of it)."""
    _mda_files(world)
    ours = world.store.account(ALICE).folder("INBOX")
    ours.sync()
    other = MailStore(world.config.mail_dir).account(ALICE).folder("INBOX")
    uid = other.append(simple("appended"), internaldate=DATES[2])
    info = next(i for i in ours.sync() if i.uid == uid)
    return ours, other, uid, info


def _expunged_there(other, uid: int) -> None:
    other.sync()
    other.set_flags(uid, ["\\Deleted"])
    other.expunge([uid])


def test_a_message_expunged_elsewhere_before_it_was_dated_keeps_its_appended_date(world):
    ours, other, uid, info = _appended_by_another_process(world)
    _expunged_there(other, uid)
    assert info.internaldate == DATES[2]


def test_compacting_the_index_keeps_the_dates_other_processes_recorded(world):
    ours, other, uid, info = _appended_by_another_process(world)
    state = ours._state
    state.meta_lines = 10**6  # due for a rewrite of mailsuite-index
    state.meta_pending.append(info.key)
    state._save_meta()
    _expunged_there(other, uid)
    assert info.date == UNDATED and info.internaldate == DATES[2]


def test_fetch_leaves_out_a_message_expunged_elsewhere_whose_date_is_unknown(world):
    """Its INTERNALDATE cannot be known any more: FETCH sends nothing for it (as for a
    message whose file it cannot read: RFC 2180 §4.1.3), never a guessed date."""
    _mda_files(world)
    r = world.connect()
    r.cmd(b"s SELECT INBOX")
    folder = world.store.account(ALICE).folder("INBOX")
    os.unlink(folder.sync()[2].path)  # expunged by another process, never dated here
    for items in (b"(INTERNALDATE)", b"(UID INTERNALDATE RFC822.SIZE)", b"(INTERNALDATE BODY[])"):
        resp = r.cmd(b"f FETCH 1:3 " + items)
        assert tagged(resp).startswith(b"f OK")
        assert [line.split(b" ")[1] for line in resp[:-1] if b" FETCH (" in line] == \
            [b"1", b"2"], (items, resp)
        assert b"2017" in resp[0] and not any(b"2023" in line for line in resp)


def test_compacting_the_index_keeps_the_dates_of_keys_it_does_not_list(world):
    """A process rewriting mailsuite-index keeps the lines of messages other processes
    registered, listed or not here: a third that lists one undated needs its date once the
    second has expunged it."""
    _mda_files(world)
    ours = world.store.account(ALICE).folder("INBOX")
    ours.sync()
    third = MailStore(world.config.mail_dir).account(ALICE).folder("INBOX")
    third.sync()
    other = MailStore(world.config.mail_dir).account(ALICE).folder("INBOX")
    uid = other.append(simple("appended"), internaldate=DATES[2])
    info = next(i for i in third.sync() if i.uid == uid)
    assert info.date == UNDATED
    ours._state.meta_lines = 10**6  # due for a rewrite of mailsuite-index
    ours.append(simple("ours"))  # reads the uidlist, then rewrites the index
    _expunged_there(other, uid)
    assert info.known_date() == DATES[2]


@pytest.mark.parametrize("by_date, answer, undated, everything", [
    (b"SEARCH SINCE 1-Jan-2017", b"* SEARCH 1 2", b"SEARCH ALL", b"* SEARCH 1 2 3"),
    (b"SORT (REVERSE ARRIVAL) UTF-8 ALL", b"* SORT 2 1", b"SORT (SIZE) UTF-8 ALL",
     b"* SORT 1 2 3"),
])
def test_a_command_by_date_leaves_out_a_message_whose_date_is_unknown(world, by_date, answer,
                                                                         undated, everything):
    """The same message in a SEARCH by date or a SORT by ARRIVAL: it cannot be judged or
    placed, so it is left out and the answer says EXPUNGEISSUED (RFC 5530), never a result
    built on the delivery second in its name. The same command without a date lists it."""
    _mda_files(world)
    r = world.connect()
    r.cmd(b"s SELECT INBOX")
    folder = world.store.account(ALICE).folder("INBOX")
    os.unlink(folder.sync()[2].path)  # expunged by another process, never dated here
    resp = r.cmd(b"f " + by_date)
    assert resp[0] == answer and tagged(resp).startswith(b"f OK [EXPUNGEISSUED]"), resp
    resp = r.cmd(b"g " + undated)
    command = undated.split(b" ")[0]
    assert resp[0] == everything and tagged(resp) == b"g OK %s completed" % command, resp


def test_a_full_rebuild_keeps_the_date_of_a_renamed_message(world):
    """A full sync (after a rewrite of dovecot-uidlist elsewhere) builds a new MessageInfo for
    a file whose flags changed; its date, once known, stays known: read again, it could not be
    once another process expunges the file."""
    _mda_files(world)
    folder = world.store.account(ALICE).folder("INBOX")
    folder.sync()
    other = MailStore(world.config.mail_dir).account(ALICE).folder("INBOX")
    other.sync()
    other.add_flags(1, ["\\Seen"])  # a flag set this process then meets in a listing
    infos = folder.sync()
    folder.ensure_dates(infos)
    other.add_flags(3, ["\\Seen"])
    folder._state.synced = False  # as after a rewrite of dovecot-uidlist elsewhere
    renamed = {i.uid: i for i in folder.sync()}[3]
    assert renamed.flags == frozenset({"\\Seen"}) and renamed.date == DATES[3]

"""IMAP in memory: CONDSTORE and QRESYNC (RFC 7162; docs/design/imap.md, "CONDSTORE and
QRESYNC")."""
from __future__ import annotations

import re

from tests.unit.imapkit import simple, tagged, world  # noqa: F401

A = "alice@example.org"


def _setup(world, n=4, folder="Cond"):
    for i in range(n):
        world.append(A, folder, simple(f"c{i}"))
    return world.store.account(A).folder(folder).uidvalidity


def _modseq(line: bytes) -> int:
    return int(re.search(rb"MODSEQ \((\d+)\)", line).group(1))


def _highest(lines: list[bytes]) -> int:
    for line in lines:
        m = re.search(rb"\[HIGHESTMODSEQ (\d+)\]", line)
        if m:
            return int(m.group(1))
    raise AssertionError(lines)


def test_capabilities_and_enable(world):
    r = world.connect()
    caps = r.cmd(b"a CAPABILITY")[0].split()
    assert b"CONDSTORE" in caps and b"QRESYNC" in caps
    assert r.cmd(b"b ENABLE QRESYNC")[0] == b"* ENABLED QRESYNC"
    assert r.cmd(b"c ENABLE QRESYNC CONDSTORE")[0] == b"* ENABLED"
    assert tagged(r.cmd(b"d ENABLE")).startswith(b"d BAD")


def test_select_condstore_fetch_modseq_and_changedsince(world):
    _setup(world)
    r = world.connect()
    resp = r.cmd(b"s SELECT Cond (CONDSTORE)")
    highest = _highest(resp)
    resp = r.cmd(b"f FETCH 1:* (FLAGS MODSEQ)")
    assert len(resp) == 5 and all(_modseq(x) <= highest for x in resp[:-1])
    resp = r.cmd(b"t STORE 2 +FLAGS (\\Seen)")
    # This session selected first: the new messages are \Recent in it (RFC 3501 §2.3.2).
    assert resp[0].startswith(b"* 2 FETCH (FLAGS (\\Seen \\Recent) MODSEQ (")
    changed = _modseq(resp[0])
    assert changed > highest
    resp = r.cmd(b"c FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % highest)
    assert resp[:-1] == [b"* 2 FETCH (FLAGS (\\Seen \\Recent) MODSEQ (%d))" % changed]
    resp = r.cmd(b"u UID FETCH 1:* FLAGS (CHANGEDSINCE %d)" % changed)
    assert resp == [b"u OK FETCH completed"]
    resp = r.cmd(b"m FETCH 2 MODSEQ")
    assert resp[0] == b"* 2 FETCH (MODSEQ (%d))" % changed
    resp = r.cmd(b"st STATUS Cond (HIGHESTMODSEQ MESSAGES)")
    assert resp[0] == b'* STATUS "Cond" (HIGHESTMODSEQ %d MESSAGES 4)' % changed
    for bad in (b"FETCH 1 FLAGS (CHANGEDSINCE x)", b"FETCH 1 FLAGS (CHANGEDSINCE 1 BOGUS)",
                b"FETCH 1 FLAGS (CHANGEDSINCE 1 VANISHED)", b"SELECT Cond (BOGUS)",
                b"SELECT Cond (QRESYNC (1 1))"):
        assert tagged(r.cmd(b"x " + bad)).startswith(b"x BAD"), bad


def test_enabling_command_while_selected_sends_highestmodseq(world):
    _setup(world)
    r = world.connect()
    r.cmd(b"s SELECT Cond")
    resp = r.cmd(b"f FETCH 1 (MODSEQ)")
    assert resp[0].startswith(b"* OK [HIGHESTMODSEQ ") and resp[1].startswith(b"* 1 FETCH (MODSEQ (")
    # Once on, FLAGS responses carry MODSEQ.
    resp = r.cmd(b"g FETCH 1 FLAGS")
    assert b"MODSEQ (" in resp[0]


def test_conditional_store_and_modified(world):
    _setup(world)
    r = world.connect()
    highest = _highest(r.cmd(b"s SELECT Cond (CONDSTORE)"))
    r.cmd(b"a STORE 2 +FLAGS (\\Flagged)")
    resp = r.cmd(b"b STORE 1:3 (UNCHANGEDSINCE %d) +FLAGS.SILENT (\\Seen)" % highest)
    assert [x.split(b" MODSEQ")[0] for x in resp[:-1]] == [b"* 1 FETCH (", b"* 3 FETCH ("] or \
        [x[:11] for x in resp[:-1]] == [b"* 1 FETCH (", b"* 3 FETCH ("], resp
    assert tagged(resp) == b"b OK [MODIFIED 2] conditional STORE failed"
    resp = r.cmd(b"c UID STORE 1:4 (UNCHANGEDSINCE 0) +FLAGS (\\Deleted)")
    assert tagged(resp) == b"c OK [MODIFIED 1:4] conditional STORE failed" and len(resp) == 1
    resp = r.cmd(b"d FETCH 1:4 FLAGS")
    assert [b"\\Seen" in x for x in resp[:-1]] == [True, False, True, False]
    assert tagged(r.cmd(b"e STORE 1 (UNCHANGEDSINCE x) +FLAGS (\\Seen)")).startswith(b"e BAD")


def test_search_modseq(world):
    _setup(world)
    r = world.connect()
    r.cmd(b"s SELECT Cond")
    r.cmd(b"a STORE 3 +FLAGS (\\Seen)")
    resp = r.cmd(b"f FETCH 3 (MODSEQ)")  # enables CONDSTORE: HIGHESTMODSEQ first
    assert resp[0].startswith(b"* OK [HIGHESTMODSEQ")
    ms = _modseq(resp[1])
    assert r.cmd(b"b SEARCH MODSEQ %d" % ms)[0] == b"* SEARCH 3 (MODSEQ %d)" % ms
    assert r.cmd(b'c SEARCH MODSEQ "/flags/\\\\Seen" all %d' % ms)[0] == \
        b"* SEARCH 3 (MODSEQ %d)" % ms
    assert r.cmd(b"d SEARCH MODSEQ %d" % (ms + 1))[0] == b"* SEARCH"
    assert tagged(r.cmd(b'e SEARCH MODSEQ "/flags/x" bogus 1')).startswith(b"e BAD")


def test_unsolicited_fetch_carries_modseq(world):
    _setup(world)
    a, b = world.connect(), world.connect()
    a.cmd(b"e ENABLE CONDSTORE")
    a.cmd(b"s SELECT Cond")
    b.cmd(b"s SELECT Cond")
    b.cmd(b"t STORE 1 +FLAGS (\\Answered)")
    ms = _modseq(b.cmd(b"f FETCH 1 (MODSEQ)")[1])
    resp = a.cmd(b"n NOOP")
    assert resp[0] == b"* 1 FETCH (UID 1 FLAGS (\\Answered \\Recent) MODSEQ (%d))" % ms


def test_qresync_select_vanished_and_expunge_becomes_vanished(world):
    validity = _setup(world, 5)
    a, b = world.connect(), world.connect()
    a.cmd(b"e ENABLE QRESYNC")
    highest = _highest(a.cmd(b"s SELECT Cond"))
    b.cmd(b"s SELECT Cond")
    b.cmd(b"a STORE 2,4 +FLAGS.SILENT (\\Deleted)")
    b.cmd(b"b EXPUNGE")
    b.cmd(b"c STORE 1 +FLAGS (\\Flagged)")
    resp = a.cmd(b"n NOOP")
    assert resp[0] == b"* VANISHED 2,4", resp
    assert resp[1].startswith(b"* 1 FETCH (UID 1 FLAGS (\\Flagged \\Recent) MODSEQ (")
    a.cmd(b"t UID STORE 3 +FLAGS.SILENT (\\Deleted)")
    assert a.cmd(b"x EXPUNGE")[0] == b"* VANISHED 3"
    # UID FETCH ... (CHANGEDSINCE n VANISHED)
    resp = a.cmd(b"f UID FETCH 1:* FLAGS (CHANGEDSINCE %d VANISHED)" % highest)
    assert resp[0] == b"* VANISHED (EARLIER) 2:4", resp
    assert resp[1].startswith(b"* 1 FETCH (UID 1 FLAGS (\\Flagged \\Recent) MODSEQ (")
    # A new session with QRESYNC: what changed since `highest`, and [CLOSED] on reselect.
    c = world.connect()
    c.cmd(b"e ENABLE QRESYNC")
    resp = c.cmd(b"s SELECT Cond (QRESYNC (%d %d))" % (validity, highest))
    i = next(k for k, x in enumerate(resp) if x.startswith(b"* OK [HIGHESTMODSEQ"))
    assert resp[i + 1] == b"* VANISHED (EARLIER) 2:4"
    assert resp[i + 2].startswith(b"* 1 FETCH (UID 1 FLAGS (\\Flagged) MODSEQ (")
    assert tagged(resp).startswith(b"s OK")
    resp = c.cmd(b"t EXAMINE Cond (QRESYNC (%d %d 1:3 (1 1)))" % (validity, highest))
    assert resp[0] == b"* OK [CLOSED] previous mailbox closed"
    assert b"* VANISHED (EARLIER) 2:3" in resp
    # Another UIDVALIDITY: a plain SELECT.
    resp = c.cmd(b"u SELECT Cond (QRESYNC (%d %d))" % (validity + 1, highest))
    assert not any(x.startswith(b"* VANISHED") or b"FETCH" in x for x in resp)
    # With QRESYNC every FETCH carries the UID.
    assert c.cmd(b"v FETCH 1 FLAGS")[0].startswith(b"* 1 FETCH (UID 1 FLAGS")


def test_modseqs_survive_a_new_store_instance(world):
    _setup(world)
    r = world.connect()
    r.cmd(b"s SELECT Cond (CONDSTORE)")
    before = r.cmd(b"f FETCH 1:* (MODSEQ)")
    from mailsuite.mailbox.store import MailStore
    world.store = MailStore(world.config.mail_dir)  # a restarted server
    r2 = world.connect()
    r2.cmd(b"s SELECT Cond (CONDSTORE)")
    assert r2.cmd(b"f FETCH 1:* (MODSEQ)") == before

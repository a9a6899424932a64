"""IMAP in memory: LIST ... RETURN (STATUS (...)) (RFC 5819), STATUS SIZE (RFC 8438) and
STATUS DELETED (RFC 9051 §6.3.11)."""
from __future__ import annotations

from tests.unit.imapkit import simple, tagged, world  # noqa: F401


def test_list_status_follows_each_selectable_folder(world):
    one, two = simple("one"), simple("two")
    world.append("alice@example.org", "Work/Reports", one, flags=("\\Seen",))
    world.append("alice@example.org", "Work/Reports", two, flags=("\\Deleted",))
    c = world.connect()
    resp = c.cmd(b'a LIST "" "Work*" RETURN (STATUS (MESSAGES UNSEEN SIZE DELETED))')
    assert resp[:-1] == [
        b'* LIST (\\Noselect \\HasChildren) "/" "Work"',
        b'* LIST (\\HasNoChildren) "/" "Work/Reports"',
        b'* STATUS "Work/Reports" (MESSAGES 2 UNSEEN 1 SIZE %d DELETED 1)' % (len(one) + len(two)),
    ] or resp[:-1] == [
        b'* LIST (\\HasNoChildren) "/" "Work/Reports"',
        b'* STATUS "Work/Reports" (MESSAGES 2 UNSEEN 1 SIZE %d DELETED 1)' % (len(one) + len(two)),
        b'* LIST (\\Noselect \\HasChildren) "/" "Work"',
    ], resp
    resp = c.cmd(b'b LIST (SUBSCRIBED) "" "*" RETURN (STATUS (UIDNEXT) CHILDREN)')
    assert tagged(resp).startswith(b"b OK")
    for bad in (b'RETURN (STATUS)', b'RETURN (STATUS (BOGUS))', b'RETURN (STATUS ())'):
        assert tagged(c.cmd(b'c LIST "" "*" ' + bad)).startswith(b"c BAD"), bad


def test_status_size_and_deleted(world):
    msg = simple("one")
    world.append("alice@example.org", "", msg, flags=("\\Deleted",))
    c = world.connect()
    resp = c.cmd(b"a STATUS INBOX (SIZE DELETED MESSAGES)")
    assert resp[0] == b'* STATUS "INBOX" (SIZE %d DELETED 1 MESSAGES 1)' % len(msg)
    assert b"STATUS=SIZE" in c.cmd(b"b CAPABILITY")[0] and b"LIST-STATUS" in c.cmd(b"c CAPABILITY")[0]

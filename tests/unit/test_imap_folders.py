"""IMAP in memory: LIST, LSUB, CREATE, DELETE, RENAME, SUBSCRIBE, STATUS (authenticated state),
LIST-EXTENDED and SPECIAL-USE as Thunderbird sends them, and modified UTF-7 names."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.unit.imapkit import folder_names, simple, tagged, world  # noqa: F401


def test_list_extended_as_thunderbird_sends_it_and_children(world):
    r = world.connect()
    assert tagged(r.cmd(b"x CREATE Projects/2026")).startswith(b"x OK")
    resp = r.cmd(b'a LIST (SUBSCRIBED) "" "*" RETURN (SPECIAL-USE)')
    assert tagged(resp).startswith(b"a OK")
    sent = [line for line in resp if line.endswith(b'"Sent"')]
    assert sent and b"\\Sent" in sent[0] and b"\\Subscribed" in sent[0]
    resp = r.cmd(b'b LIST "" "%"')
    projects = [line for line in resp if line.endswith(b'"Projects"')][0]
    assert b"\\HasChildren" in projects
    resp = r.cmd(b'c LIST "" "Projects/%"')
    assert any(line.endswith(b'"Projects/2026"') and b"\\HasNoChildren" in line for line in resp)
    resp = r.cmd(b'd LIST "" ""')
    assert resp[0] == b'* LIST (\\Noselect) "/" ""'
    resp = r.cmd(b'e LIST "" "INBOX"')
    assert resp[0].endswith(b'"INBOX"')
    assert tagged(r.cmd(b'f LIST (FROB) "" "*"')).startswith(b"f BAD")


def test_subscribed_but_missing_folder_is_not_selectable(world):
    """docs/design/imap.md, "Folders": a deleted-but-subscribed folder must not look selectable."""
    r = world.connect()
    r.cmd(b"a CREATE Ghost")
    r.cmd(b"b SUBSCRIBE Ghost")
    # Gone behind our back (another tool), still in `subscriptions`.
    shutil.rmtree(world.maildir("alice@example.org", "Ghost"))
    resp = r.cmd(b'a LIST (SUBSCRIBED) "" "*" RETURN (SPECIAL-USE)')
    ghost = [line for line in resp if line.endswith(b'"Ghost"')]
    assert ghost and b"\\NonExistent" in ghost[0]
    resp = r.cmd(b'b LSUB "" "*"')
    ghost = [line for line in resp if line.endswith(b'"Ghost"')]
    assert ghost and b"\\Noselect" in ghost[0]
    resp = r.cmd(b'c LIST "" "*"')
    assert not [line for line in resp if line.endswith(b'"Ghost"')]


def test_create_delete_rename_and_case_preserved(world):
    """Names keep their case (Twisted's MemoryAccount upper-cased them)."""
    r = world.connect()
    r.cmd(b'a CREATE "Mixed Case"')
    r.cmd(b'b CREATE "' + "Ünïcode".encode("imap4-utf-7") + b'"')
    names = folder_names(r)
    assert "Mixed Case" in names and "Ünïcode" in names
    r.cmd(b'c RENAME "Mixed Case" "Renamed/Child"')
    names = folder_names(r)
    assert "Renamed/Child" in names and "Mixed Case" not in names
    r.cmd(b'd DELETE "Renamed/Child"')
    assert "Renamed/Child" not in folder_names(r)
    assert tagged(r.cmd(b'a CREATE "Sent"')).startswith(b"a NO")
    assert tagged(r.cmd(b'b DELETE "NoSuchFolder"')).startswith(b"b NO")
    assert tagged(r.cmd(b'c DELETE INBOX')).startswith(b"c NO")


def test_delete_keeps_the_subscription_unselectable_and_deselects(world):
    # RFC 3501 §6.3.6: the server never removes a subscription unilaterally; the missing
    # folder is shown \Noselect (LSUB) and \NonExistent (LIST (SUBSCRIBED)), never selectable.
    r = world.connect()
    r.cmd(b"a CREATE Old")
    r.cmd(b"b SUBSCRIBE Old")
    r.cmd(b"c SELECT Old")
    assert tagged(r.cmd(b"d DELETE Old")).startswith(b"d OK")
    assert [line for line in r.cmd(b'e LSUB "" "*"') if line.endswith(b'"Old"')] == \
        [b'* LSUB (\\Noselect) "/" "Old"']
    lines = [line for line in r.cmd(b'e LIST (SUBSCRIBED) "" "*"') if line.endswith(b'"Old"')]
    assert lines == [b'* LIST (\\NonExistent \\Subscribed) "/" "Old"']
    assert tagged(r.cmd(b"f FETCH 1 FLAGS")).startswith(b"f BAD")  # nothing selected any more


@pytest.mark.parametrize("name", [b'"../escape"', b'"a/../../escape"', b'".hidden"', b'"x\\\\y"',
                                  b'"/abs"', b'"foo/"/', b'{6}\r\nab\x01cd\x7f'])
def test_path_escaping_mailbox_names_are_refused(world, name):
    r = world.connect()
    mail_dir = world.config.mail_dir
    before = set(os.listdir(os.path.dirname(world.maildir("alice@example.org"))))
    before_root = set(os.listdir(mail_dir))
    if name.startswith(b"{"):
        r.send(b"a CREATE " + name.split(b"\r\n")[0] + b"\r\n")
        assert r.line().startswith(b"+")
        r.send(name.split(b"\r\n")[1] + b"\r\n")
        resp = r.response(b"a")
    else:
        resp = r.cmd(b"a CREATE " + name)
    assert tagged(resp).startswith((b"a NO", b"a BAD")), resp
    if not name.startswith(b"{"):
        assert tagged(r.cmd(b"b RENAME Junk " + name)).startswith((b"b NO", b"b BAD"))
        resp = r.cmd(b"c APPEND " + name + b" {4+}\r\nx\r\n\r\n")
        assert tagged(resp).startswith((b"c NO", b"c BAD")), resp
        assert tagged(r.cmd(b"d SELECT " + name)).startswith((b"d NO", b"d BAD"))
    assert set(os.listdir(os.path.dirname(world.maildir("alice@example.org")))) == before
    assert set(os.listdir(mail_dir)) == before_root
    assert tagged(r.cmd(b"b NOOP")).startswith(b"b OK")  # the session goes on


def test_status(world):
    world.append("alice@example.org", "StatusBox", simple("one"), flags=("\\Seen",))
    world.append("alice@example.org", "StatusBox", simple("two"))
    r = world.connect()
    resp = r.cmd(b"x STATUS StatusBox (MESSAGES UNSEEN UIDNEXT UIDVALIDITY RECENT)")
    st = dict(zip(*[iter(resp[0].split(b"(", 1)[1].rstrip(b")").split())] * 2))
    assert st[b"MESSAGES"] == b"2" and st[b"UNSEEN"] == b"1" and st[b"UIDNEXT"] == b"3"
    assert int(st[b"UIDVALIDITY"]) > 0
    assert tagged(r.cmd(b'a STATUS "Nope" (MESSAGES)')).startswith(b"a NO")
    assert tagged(r.cmd(b'b STATUS "StatusBox" (BOGUS)')).startswith(b"b BAD")


def test_mailbox_in_modified_utf7(world):
    r = world.connect()
    r.cmd(b'x CREATE "Entw&APw-rfe"')
    assert "Entwürfe" in folder_names(r)
    resp = r.cmd(b'a LIST "" "Entw*"')
    assert resp[0].endswith(b'"Entw&APw-rfe"'), resp
    assert tagged(r.cmd(b'b SELECT "Entw&APw-rfe"')).startswith(b"b OK")
    assert tagged(r.cmd(b'c SELECT "Entw&-bad"')).startswith((b"c BAD", b"c NO"))

"""CONDSTORE and QRESYNC (RFC 7162) against the real server with imaplib: a flag change in one
session is found by another's CHANGEDSINCE, an expunge by VANISHED (EARLIER), and the
mod-sequences survive a restart of the server (they live in the Maildir)."""
from __future__ import annotations

import imaplib
import re

from tests.harness import MailServer
from tests.scenario.imapraw import PASSWORD

MSG = (b"From: a@remote.example\r\nTo: alice@example.org\r\nSubject: %d\r\n"
       b"Date: Mon, 02 Feb 2026 10:00:00 +0000\r\n\r\nbody\r\n")


def _login(server: MailServer) -> imaplib.IMAP4_SSL:
    c = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.ssl_context())
    c.login("alice@example.org", PASSWORD)
    return c


def test_changedsince_and_vanished_between_sessions(make_server):
    server: MailServer = make_server(listeners=["imaps"])
    server.add_user("alice@example.org", PASSWORD)
    a, b = _login(server), _login(server)
    assert "CONDSTORE" in a.capabilities and "QRESYNC" in a.capabilities
    for i in range(4):
        assert a.append("INBOX", None, None, MSG % i)[0] == "OK"
    assert a.enable("CONDSTORE")[0] == "OK"
    assert a.select("INBOX")[0] == "OK"
    since = int(a.response("HIGHESTMODSEQ")[1][-1])
    uidvalidity = int(a.response("UIDVALIDITY")[1][-1])

    # Session B changes a flag.
    b.select("INBOX")
    assert b.uid("STORE", "2", "+FLAGS", r"(\Flagged)")[0] == "OK"

    # Session A asks what changed since it last looked.
    typ, data = a.uid("FETCH", "1:*", "(FLAGS) (CHANGEDSINCE %d)" % since)
    assert typ == "OK"
    lines = [d for d in data if d]
    assert len(lines) == 1 and b"UID 2" in lines[0] and b"\\Flagged" in lines[0], lines
    changed = int(re.search(rb"MODSEQ \((\d+)\)", lines[0]).group(1))
    assert changed > since

    # Session B expunges; a new QRESYNC session learns it with VANISHED (EARLIER).
    b.uid("STORE", "3", "+FLAGS.SILENT", r"(\Deleted)")
    assert b.expunge()[0] == "OK"
    b.logout()
    a.logout()

    c = _login(server)
    assert c.enable("QRESYNC")[0] == "OK"
    c.untagged_responses.clear()
    typ, _ = c._simple_command("SELECT", "INBOX (QRESYNC (%d %d))" % (uidvalidity, changed))
    assert typ == "OK"
    assert c.untagged_responses.get("VANISHED") == [b"(EARLIER) 3"], c.untagged_responses
    c.logout()

    # A restart keeps the mod-sequences: they are stored in the Maildir.
    server.stop()
    server.start()
    d = _login(server)
    d.select("INBOX")
    typ, data = d.uid("FETCH", "2", "(MODSEQ)")
    assert typ == "OK" and b"MODSEQ (%d)" % changed in data[0], data
    d.logout()

"""IMAP4rev2 (RFC 9051) against the real server with imaplib: ENABLE IMAP4rev2, a UTF-8 mailbox
name round trip, and the ESEARCH answer to SEARCH. The differences one by one are tested in
memory in tests/unit/test_imap_rev2.py."""
from __future__ import annotations

import imaplib

import pytest

from tests.harness import MailServer
from tests.scenario.imapraw import PASSWORD

NAME = "Entwürfe-€".encode()


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = MailServer(str(tmp_path_factory.mktemp("imaprev2")), listeners=["imaps"])
    s.start()
    s.add_user("alice@example.org", PASSWORD)
    yield s
    s.stop()


def test_enable_utf8_name_and_esearch(srv):
    m = imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=srv.ssl_context())
    try:
        assert "IMAP4REV2" in m.capabilities
        m.login("alice@example.org", PASSWORD)
        enabled = m.enable("IMAP4rev2")[0], m.untagged_responses.pop("ENABLED", None)
        assert enabled == ("OK", [b"IMAP4rev2"])
        assert m.create(b'"' + NAME + b'"')[0] == "OK"
        typ, data = m.list('""', '"Entw*"')
        assert typ == "OK" and data == [b'(\\HasNoChildren) "/" "' + NAME + b'"']
        msg = (b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n")
        assert m.append(b'"' + NAME + b'"', None, None, msg)[0] == "OK"
        typ, data = m.select(b'"' + NAME + b'"')
        assert typ == "OK" and data == [b"1"]
        assert "RECENT" not in m.untagged_responses
        typ, data = m.search(None, "ALL")
        assert typ == "OK" and data == [None]  # no `* SEARCH` ...
        esearch = m.untagged_responses.pop("ESEARCH")  # ... but `* ESEARCH (TAG "t") ALL 1`
        assert len(esearch) == 1 and esearch[0].startswith(b'(TAG "') \
            and esearch[0].endswith(b'") ALL 1')
        assert m.uid("SEARCH", "ALL")[0] == "OK"
        assert m.untagged_responses.pop("ESEARCH")[0].endswith(b'") UID ALL 1')
        typ, data = m.status(b'"' + NAME + b'"', "(MESSAGES UIDNEXT)")
        assert typ == "OK" and data == [b'"' + NAME + b'" (MESSAGES 1 UIDNEXT 2)']
    finally:
        m.logout()

"""SORT, THREAD, ESEARCH and SEARCHRES against the real server with imaplib, as a webmail client
(Roundcube) uses them: sort a folder, thread it, save a search and act on "$"."""
from __future__ import annotations

import imaplib

import pytest

from tests.harness import MailServer
from tests.scenario.imapraw import PASSWORD


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = MailServer(str(tmp_path_factory.mktemp("imapsort")), listeners=["imaps"])
    s.start()
    s.add_user("alice@example.org", PASSWORD)
    yield s
    s.stop()


def message(subject: str, date: str, mid: str, refs: str = "") -> bytes:
    extra = f"References: {refs}\r\n" if refs else ""
    return (f"From: Sender <sender@remote.example>\r\nTo: alice@example.org\r\nSubject: {subject}\r\n"
            f"Date: {date}\r\nMessage-ID: {mid}\r\n{extra}\r\nbody\r\n").encode()


def test_sort_thread_esearch_searchres(srv):
    m = imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=srv.ssl_context())
    m.login("alice@example.org", PASSWORD)
    caps = m.capabilities
    for cap in ("SORT", "SORT=DISPLAY", "THREAD=REFERENCES", "THREAD=ORDEREDSUBJECT", "ESEARCH",
                "SEARCHRES", "WITHIN"):
        assert cap in caps
    m.create("Threads")
    for subject, date, mid, refs in [
            ("Re: plans", "Tue, 03 Feb 2026 10:00:00 +0000", "<b@x>", "<a@x>"),
            ("plans", "Mon, 02 Feb 2026 10:00:00 +0000", "<a@x>", ""),
            ("[team] Re: Re: plans", "Wed, 04 Feb 2026 10:00:00 +0000", "<c@x>", "<a@x> <b@x>"),
            ("lunch", "Sun, 01 Feb 2026 10:00:00 +0000", "<d@x>", "")]:
        assert m.append("Threads", None, None, message(subject, date, mid, refs))[0] == "OK"
    assert m.select("Threads")[0] == "OK"

    assert m.sort("(DATE)", "UTF-8", "ALL") == ("OK", [b"4 2 1 3"])
    assert m.sort("(REVERSE DATE)", "UTF-8", "ALL") == ("OK", [b"3 1 2 4"])
    assert m.sort("(SUBJECT DATE)", "UTF-8", "ALL") == ("OK", [b"4 2 1 3"])
    typ, data = m.uid("SORT", "(REVERSE SUBJECT)", "UTF-8", "ALL")
    assert (typ, data) == ("OK", [b"1 2 3 4"])  # ties keep UID order
    assert m.thread("REFERENCES", "UTF-8", "ALL") == ("OK", [b"(4)(2 1 3)"])
    assert m.thread("ORDEREDSUBJECT", "UTF-8", "ALL") == ("OK", [b"(4)(2 (1)(3))"])

    typ, data = m._simple_command("SEARCH", "RETURN", "(MIN MAX SAVE)", "SUBJECT", "plans")
    assert typ == "OK"
    assert m.untagged_responses.pop("ESEARCH")[0].endswith(b"MIN 1 MAX 3")
    # MIN and MAX were asked: "$" holds only those two (RFC 5182 §2.1).
    typ, data = m.fetch("$", "(UID)")
    assert typ == "OK" and data == [b"1 (UID 1)", b"3 (UID 3)"]
    assert m.store("$", "+FLAGS", "(\\Flagged)")[0] == "OK"
    assert m.search(None, "FLAGGED") == ("OK", [b"1 3"])
    m.logout()

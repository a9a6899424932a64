"""A Maildir laid out by hand exactly as Dovecot leaves it (dovecot-uidlist v3 with chosen
UIDVALIDITY and UIDs, dovecot-keywords, flags in file names): IMAP must report exactly those
UIDs, UIDVALIDITY and flags, so clients do not download everything again after a migration."""
from __future__ import annotations

import os
import re

import pytest

from tests.harness import MailServer
from tests.scenario.imapraw import PASSWORD, Raw, tagged


def _msg(subject: str) -> bytes:
    return (f"From: old@example.org\r\nTo: dave@example.org\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@example.org>\r\n\r\nmigrated {subject}\r\n").encode()


def _write(folder: str, sub: str, base: str, info: str, data: bytes) -> str:
    os.makedirs(os.path.join(folder, sub), exist_ok=True)
    name = base + ",S=%d" % len(data)
    with open(os.path.join(folder, sub, name + info), "wb") as f:
        f.write(data)
    return name


def _maildir(path: str, subfolder: bool = False) -> None:
    for d in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, d), exist_ok=True)
    if subfolder:
        open(os.path.join(path, "maildirfolder"), "wb").close()


@pytest.fixture
def migrated(make_server):
    s: MailServer = make_server(listeners=["imap", "imaps"])
    s.add_user("dave@example.org", PASSWORD)
    root = s.maildir("dave@example.org")
    _maildir(root)
    n1 = _write(root, "cur", "1700000001.M1P1.oldhost", ":2,S", _msg("one"))
    n2 = _write(root, "cur", "1700000002.M2P1.oldhost", ":2,FRab", _msg("two"))
    n3 = _write(root, "cur", "1700000003.M3P1.oldhost", ":2,", _msg("three"))
    # Dovecot's uidlist: header `3 V<uidvalidity> N<nextuid> G<guid>`, then `<uid> :<name>`
    # (optionally with extension fields such as W<vsize> before the colon).
    with open(os.path.join(root, "dovecot-uidlist"), "w") as f:
        f.write("3 V1234567 N20 G0123456789abcdef0123456789abcdef\n")
        f.write(f"5 :{n1}\n7 W{len(_msg('two')) + 2} :{n2}\n12 :{n3}\n")
    with open(os.path.join(root, "dovecot-keywords"), "w") as f:
        f.write("0 $Junk\n1 $label1\n")
    # A message Dovecot never saw (delivered after the migration) gets UID 20 = N.
    _write(root, "new", "1700000009.M9P1.newhost", "", _msg("four"))
    archive = os.path.join(root, ".Archive.2026")
    _maildir(archive, subfolder=True)
    a1 = _write(archive, "cur", "1690000000.M5P5.oldhost", ":2,S", _msg("archived"))
    with open(os.path.join(archive, "dovecot-uidlist"), "w") as f:
        f.write(f"3 V7654321 N101 Gfedcba9876543210fedcba9876543210\n100 :{a1}\n")
    with open(os.path.join(root, "subscriptions"), "w") as f:
        f.write("V\t2\n\nArchive/2026\n")
    return s


def test_dovecot_uids_uidvalidity_and_flags_are_kept(migrated):
    r = Raw(migrated, login_as="dave@example.org")
    resp = r.cmd(b"a SELECT INBOX")
    text = b"\n".join(resp)
    assert b"[UIDVALIDITY 1234567]" in text
    assert b"* 4 EXISTS" in text
    assert b"[UIDNEXT 21]" in text
    assert b"$Junk" in text and b"$label1" in text  # keywords from dovecot-keywords in FLAGS
    resp = r.cmd(b"b UID FETCH 1:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    got = {}
    for line in resp[:-1]:
        uid = int(re.search(rb"UID (\d+)", line).group(1))
        flags = set(re.search(rb"FLAGS \(([^)]*)\)", line).group(1).split()) - {b"\\Recent"}
        subject = re.search(rb"Subject: (\w+)", line).group(1)
        got[uid] = (subject, flags)
    assert got == {
        5: (b"one", {b"\\Seen"}),
        7: (b"two", {b"\\Flagged", b"\\Answered", b"$Junk", b"$label1"}),
        12: (b"three", set()),
        20: (b"four", set()),
    }
    resp = r.cmd(b'c LIST "" "*"')
    assert any(line.endswith(b'"Archive/2026"') for line in resp)
    resp = r.cmd(b"d SELECT Archive/2026")
    assert b"[UIDVALIDITY 7654321]" in b"\n".join(resp)
    resp = r.cmd(b"e UID FETCH 1:* (UID FLAGS)")
    assert re.match(rb"\* 1 FETCH \(UID 100 FLAGS \(\\Seen\)\)", resp[0]), resp
    # A flag change from IMAP lands in the Maildir file name, where Dovecot would look.
    r.cmd(b"f SELECT INBOX")
    assert tagged(r.cmd(b"g UID STORE 12 +FLAGS (\\Flagged $Junk)")).startswith(b"g OK")
    names = os.listdir(os.path.join(migrated.maildir("dave@example.org"), "cur"))
    three = [n for n in names if n.startswith("1700000003.")][0]
    assert three.endswith(":2,Fa"), three
    r.close()
    with open(os.path.join(migrated.maildir("dave@example.org"), "dovecot-uidlist")) as f:
        assert f.readline().startswith("3 V1234567 ")

"""A Maildir laid out by hand exactly as Dovecot leaves it: the store must report Dovecot's
UIDs, UIDVALIDITY and flags, keep Dovecot's extension fields, and stay readable by Dovecot
after our changes. (The IMAP-level check of the same layout lives with the IMAP tests.)"""
from __future__ import annotations

import os

import pytest

from mailsuite.mailbox import uidfile
from mailsuite.mailbox.maildir import read_uidlist
from mailsuite.mailbox.store import MailStore
from mailsuite.pop3.server import uidl


def body(size: int, subject: str) -> bytes:
    head = f"From: old@example.net\r\nSubject: {subject}\r\n\r\n".encode()
    return head + b"x" * (size - len(head) - 2) + b"\r\n"


def write(path: str, data: bytes, mtime: float) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, (mtime, mtime))


@pytest.fixture
def dovecot_maildir(tmp_path):
    root = tmp_path / "mail" / "example.org" / "alice"
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True)
    (root / "dovecot-uidlist").write_bytes(
        b"3 V1234567890 N120 G0123456789abcdef0123456789abcdef\n"
        b"100 :1600000000.M1P1.oldhost,S=100,W=104:2,S\n"
        b"105 W300 S290 :1600000100.M2P1.oldhost:2,\n"
        b"110 :1600000200.M3P1.oldhost,S=50\n"
        b"111 :1600000250.M9P1.oldhost,S=77\n"  # expunged by Dovecot: no file any more
    )
    (root / "dovecot-keywords").write_bytes(b"0 $Forwarded\n1 $Junk\n2 $label1\n")
    write(str(root / "cur" / "1600000000.M1P1.oldhost,S=100,W=104:2,RSa"), body(100, "one"),
          1600000000)
    write(str(root / "cur" / "1600000100.M2P1.oldhost:2,FTbc"), body(290, "two"), 1600000100)
    write(str(root / "new" / "1600000200.M3P1.oldhost,S=50"), body(50, "three"), 1600000200)
    # Copied in later with a plain `cp`: not in the uidlist yet, gets the next UID (N120).
    write(str(root / "cur" / "1600000300.M4P1.oldhost,S=60:2,"), body(60, "four"), 1600000300)
    arch = root / ".Archive.2020"
    for sub in ("cur", "new", "tmp"):
        (arch / sub).mkdir(parents=True)
    (arch / "maildirfolder").write_bytes(b"")
    (arch / "dovecot-uidlist").write_bytes(b"3 V999 N8 G00\n7 :1500000000.M1P2.oldhost,S=40\n")
    write(str(arch / "cur" / "1500000000.M1P2.oldhost,S=40:2,S"), body(40, "old"), 1500000000)
    return MailStore(str(tmp_path / "mail")).account("alice@example.org")


def test_store_reports_dovecots_uids_uidvalidity_and_flags(dovecot_maildir):
    account = dovecot_maildir
    inbox = account.folder("INBOX")
    msgs = inbox.sync()
    assert inbox.uidvalidity == 1234567890
    assert [m.uid for m in msgs] == [100, 105, 110, 120]
    assert inbox.uidnext == 121
    flags = {m.uid: m.flags for m in msgs}
    assert flags[100] == {"\\Answered", "\\Seen", "$Forwarded"}
    assert flags[105] == {"\\Flagged", "\\Deleted", "$Junk", "$label1"}
    assert flags[110] == frozenset() and flags[120] == frozenset()
    assert [m.size for m in msgs] == [100, 290, 50, 60]
    assert [m.internaldate for m in msgs] == [1600000000, 1600000100, 1600000200, 1600000300]
    assert [uidl(m.key) for m in msgs] == ["1600000000.M1P1.oldhost,S=100,W=104",
                                           "1600000100.M2P1.oldhost",
                                           "1600000200.M3P1.oldhost,S=50",
                                           "1600000300.M4P1.oldhost,S=60"]
    assert account.list_folders() == ["INBOX", "Archive/2020"]
    archive = account.folder("Archive/2020")
    (old,) = archive.sync()
    assert (archive.uidvalidity, old.uid, old.flags, archive.uidnext) == (999, 7, {"\\Seen"}, 8)


def test_our_changes_stay_in_dovecots_format(dovecot_maildir, monkeypatch):
    monkeypatch.setattr(uidfile, "UIDLIST_SLACK", 1)  # the expunge rewrites dovecot-uidlist
    account = dovecot_maildir
    inbox = account.folder("INBOX")
    inbox.sync()
    inbox.add_flags(110, ["\\Seen", "$label1"])
    assert inbox.expunge() == [105]  # \Deleted
    uid = inbox.append(body(30, "five"), ["$NotJunk"])
    assert uid == 121
    root = account.path
    names = sorted(os.listdir(os.path.join(root, "cur")))
    assert "1600000200.M3P1.oldhost,S=50:2,Sc" in names
    assert "1600000000.M1P1.oldhost,S=100,W=104:2,RSa" in names
    assert not any(n.startswith("1600000100") for n in names)
    with open(os.path.join(root, "dovecot-keywords")) as f:
        assert f.read() == "0 $Forwarded\n1 $Junk\n2 $label1\n3 $NotJunk\n"
    ul = read_uidlist(os.path.join(root, "dovecot-uidlist"))
    assert ul.uidvalidity == 1234567890 and ul.guid == "0123456789abcdef0123456789abcdef"
    assert ul.nextuid == 122
    assert sorted(ul.uids.values()) == [100, 110, 120, 121]
    with open(os.path.join(root, "dovecot-uidlist")) as f:
        lines = f.read().splitlines()
    # Appends leave the header's N behind, as Dovecot's do; readers take max(N, last UID + 1).
    assert lines[0].startswith("3 V1234567890 N12") and " G0123456789abcdef" in lines[0]
    assert lines[-1].startswith("121 :")
    assert "100 :1600000000.M1P1.oldhost,S=100,W=104" in lines
    # A new process sees the same thing.
    again = MailStore(account.store.mail_dir).account("alice@example.org").folder("INBOX")
    assert [(m.uid, sorted(m.flags)) for m in again.sync()] == [
        (100, ["$Forwarded", "\\Answered", "\\Seen"]),
        (110, ["$label1", "\\Seen"]),
        (120, []),
        (121, ["$NotJunk"]),
    ]


def test_dovecot_extension_fields_survive_a_rewrite(dovecot_maildir, monkeypatch):
    monkeypatch.setattr(uidfile, "UIDLIST_SLACK", 1)
    inbox = dovecot_maildir.folder("INBOX")
    inbox.sync()
    inbox.expunge([120])  # one stale line is enough now: a full rewrite of dovecot-uidlist
    with open(os.path.join(dovecot_maildir.path, "dovecot-uidlist")) as f:
        assert "105 W300 S290 :1600000100.M2P1.oldhost" in f.read().splitlines()

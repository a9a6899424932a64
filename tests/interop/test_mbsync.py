"""mbsync (isync) syncs an account both ways over STARTTLS with certificate verification:
mail down, a flag change up, a new folder (with a message) up."""
from __future__ import annotations

import os
import smtplib
import subprocess

import pytest
from imapclient import IMAPClient

from tests.environment import require_program
from tests.harness import MailServer, subprocess_env

pytestmark = pytest.mark.external
PASSWORD = "secret-pw-1"


@pytest.fixture(scope="module", autouse=True)
def mbsync_installed():
    require_program("mbsync", "isync")


def client(server: MailServer, user: str = "alice@example.org") -> IMAPClient:
    c = IMAPClient("127.0.0.1", port=server.ports["imaps"], ssl=True,
                   ssl_context=server.ssl_context())
    c.login(user, PASSWORD)
    return c


def _config(server: MailServer, local: str, tls: str) -> str:
    # isync 1.4 spells it SSLType (1.5: TLSType). Host is "localhost": isync 1.4 matches the
    # certificate against DNS names only, and our self-signed one names localhost.
    port = server.ports["imap"] if tls == "STARTTLS" else server.ports["imaps"]
    return f"""IMAPAccount test
Host localhost
Port {port}
User alice@example.org
Pass {PASSWORD}
SSLType {tls}
CertificateFile {server.cafile}
AuthMechs LOGIN PLAIN

IMAPStore remote
Account test

MaildirStore local
Path {local}/
Inbox {local}/INBOX
SubFolders Verbatim

Channel test
Far :remote:
Near :local:
Patterns *
Create Both
Expunge Both
SyncState *
"""


def _mbsync(rc: str, home: str) -> subprocess.CompletedProcess:
    result = subprocess.run(["mbsync", "-c", rc, "-a"], capture_output=True, text=True, timeout=60,
                            env=subprocess_env(HOME=home))
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _local_files(local: str, folder: str) -> list[str]:
    out = []
    for sub in ("new", "cur"):
        d = os.path.join(local, folder, sub)
        if os.path.isdir(d):
            out += [os.path.join(d, n) for n in os.listdir(d)]
    return out


@pytest.mark.parametrize("tls", ["STARTTLS", "IMAPS"])
def test_mbsync_both_ways(make_server, tmp_path, tls):
    server = make_server(listeners=["mx", "imap", "imaps"])
    server.add_user("alice@example.org", PASSWORD)
    for i in range(3):
        with smtplib.SMTP("127.0.0.1", server.ports["mx"]) as s:
            s.sendmail("x@remote.example", ["alice@example.org"],
                       f"From: x@remote.example\r\nSubject: down {i}\r\n"
                       f"Message-ID: <down{i}@remote.example>\r\n\r\nbody {i}\r\n".encode())
    assert len(server.wait_for_messages("alice@example.org", 3)) == 3
    local = str(tmp_path / "local")
    os.makedirs(local)
    rc = str(tmp_path / "mbsyncrc")
    with open(rc, "w") as f:
        f.write(_config(server, local, tls))

    _mbsync(rc, str(tmp_path))
    # Mail down: three messages in the local INBOX, identical to the server's files once
    # mbsync's own changes are undone (it stores LF line endings and adds X-TUID).
    files = _local_files(local, "INBOX")
    assert len(files) == 3

    def normal(data: bytes) -> bytes:
        return b"".join(line for line in data.replace(b"\r\n", b"\n").splitlines(True)
                        if not line.startswith(b"X-TUID:"))

    remote_bodies = sorted(normal(open(p, "rb").read()) for p in server.messages("alice@example.org"))
    assert sorted(normal(open(p, "rb").read()) for p in files) == remote_bodies
    # The special folders created at first login came down too.
    for name in ("Sent", "Drafts", "Trash", "Junk", "Archive"):
        assert os.path.isdir(os.path.join(local, name, "cur")), name

    # A flag change up: mark one message flagged (F) and seen (S) locally.
    victim = sorted(files)[0]
    base, _, info = os.path.basename(victim).partition(":2,")
    flagged = os.path.join(local, "INBOX", "cur", base + ":2," + "".join(sorted(set(info) | {"F", "S"})))
    os.rename(victim, flagged)
    # A new folder up, with a message in it.
    newbox = os.path.join(local, "Projects")
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(newbox, sub))
    with open(os.path.join(newbox, "new", "1800000000.M1P1.client"), "wb") as f:
        f.write(b"From: alice@example.org\r\nSubject: up\r\n\r\nuploaded\r\n")

    _mbsync(rc, str(tmp_path))
    c = client(server)
    assert "Projects" in [f[2] for f in c.list_folders()]
    c.select_folder("Projects", readonly=True)
    ids = c.search("ALL")
    assert len(ids) == 1
    assert c.fetch(ids, ["BODY.PEEK[TEXT]"])[ids[0]][b"BODY[TEXT]"] == b"uploaded\r\n"
    c.select_folder("INBOX", readonly=True)
    assert len(c.search("FLAGGED")) == 1 and len(c.search("SEEN")) == 1
    c.logout()

    # A third run changes nothing and still succeeds (state files agree with the server).
    _mbsync(rc, str(tmp_path))
    assert len(_local_files(local, "INBOX")) == 3

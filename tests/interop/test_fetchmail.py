"""fetchmail (a real POP3 client) downloads over STLS and over pop3s, verifying the
server's certificate, keeps mail with `keep` and removes it without."""
from __future__ import annotations

import os
import subprocess

import pytest

from tests.environment import require_program
from tests.harness import HOST, subprocess_env

pytestmark = pytest.mark.external


@pytest.fixture(scope="module", autouse=True)
def fetchmail_installed():
    require_program("fetchmail")


def deliver(server, address: str, subject: str, n: int) -> str:
    md = server.maildir(address)
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(md, sub), exist_ok=True)
    data = (f"From: sender@example.net\r\nTo: {address}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@example.net>\r\n\r\n.leading dot line\r\nbody\r\n").encode()
    key = f"{1700000000 + n}.M{n}P77Q{n}.testhost,S={len(data)}"
    with open(os.path.join(md, "tmp", key), "wb") as f:
        f.write(data)
    os.rename(os.path.join(md, "tmp", key), os.path.join(md, "new", key))
    return key


def fetch(server, tmp_path, implicit_tls: bool, keep: bool) -> tuple[int, str]:
    out = tmp_path / "out.mbox"
    rc = tmp_path / "fetchmailrc"
    port = server.ports["pop3s" if implicit_tls else "pop3"]
    tls = "ssl" if implicit_tls else "sslproto 'tls1.2+'"  # sslproto without ssl = STLS required
    rc.write_text(
        "set no bouncemail\n"
        f"poll localhost via {HOST} service {port} protocol POP3 auth password uidl\n"
        f'  user "alice@example.org" there with password "secret-pw-1" is "nobody" here\n'
        f"  {tls} sslcertck sslcertfile \"{server.cafile}\" sslcommonname localhost\n"
        f"  {'keep' if keep else 'nokeep'} fetchall\n"
        f"  mda \"/bin/sh -c 'cat >> {out}'\"\n"
    )
    os.chmod(rc, 0o600)
    env = subprocess_env(FETCHMAILHOME=str(tmp_path), HOME=str(tmp_path))
    result = subprocess.run(
        ["fetchmail", "-f", str(rc), "-i", str(tmp_path / "fetchids"), "--nosyslog", "-v",
         "--pidfile", str(tmp_path / "fetchmail.pid")],
        capture_output=True, text=True, timeout=60, env=env,
    )
    mbox = out.read_text() if out.exists() else ""
    if out.exists():
        out.unlink()
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 1 = no mail
    return result.returncode, mbox + "\n----\n" + result.stdout + result.stderr


def test_fetchmail_stls_then_pop3s(server, tmp_path):
    deliver(server, "alice@example.org", "first-message", 1)
    deliver(server, "alice@example.org", "second-message", 2)

    code, out = fetch(server, tmp_path, implicit_tls=False, keep=True)
    assert code == 0, out
    assert "STLS" in out or "stls" in out.lower()
    assert "Subject: first-message" in out and "Subject: second-message" in out
    assert ".leading dot line" in out and "..leading" not in out.split("----")[0]
    assert len(server.messages("alice@example.org")) == 2  # keep

    deliver(server, "alice@example.org", "third-message", 3)
    code, out = fetch(server, tmp_path, implicit_tls=True, keep=False)
    assert code == 0, out
    assert "Subject: third-message" in out
    assert server.messages("alice@example.org") == []  # fetched without keep: removed at QUIT
    code, out = fetch(server, tmp_path, implicit_tls=True, keep=False)
    assert code == 1, out  # nothing left


def test_fetchmail_refuses_a_server_it_cannot_verify(server, tmp_path):
    """sslcertck really checks: with another CA file fetchmail must not log in."""
    deliver(server, "alice@example.org", "secret-message", 1)
    other = tmp_path / "other-ca.pem"
    from mailsuite.tls import create_self_signed

    create_self_signed("other.example", str(other), str(tmp_path / "other-key.pem"))
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f"poll localhost via {HOST} service {server.ports['pop3s']} protocol POP3\n"
        f'  user "alice@example.org" there with password "secret-pw-1" is "nobody" here\n'
        f"  ssl sslcertck sslcertfile \"{other}\" sslcommonname localhost nokeep\n"
        f"  mda \"/bin/sh -c 'cat >> {tmp_path / 'out'}'\"\n"
    )
    os.chmod(rc, 0o600)
    result = subprocess.run(
        ["fetchmail", "-f", str(rc), "-i", str(tmp_path / "ids"), "--nosyslog",
         "--pidfile", str(tmp_path / "pid")],
        capture_output=True, text=True, timeout=60,
        env=subprocess_env(FETCHMAILHOME=str(tmp_path), HOME=str(tmp_path)),
    )
    assert result.returncode not in (0, 1)
    assert len(server.messages("alice@example.org")) == 1
    assert not (tmp_path / "out").exists()

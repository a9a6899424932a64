"""swaks (the Swiss Army Knife for SMTP, Debian package) against the real server: MX, submission
with STARTTLS + AUTH, and implicit TLS on the submissions port."""
from __future__ import annotations

import shutil
import subprocess
import uuid

import pytest

from tests.environment import require_program
from tests.harness import HOST, MailServer
from tests.polling import wait_until

SWAKS = shutil.which("swaks") or "/usr/bin/swaks"
pytestmark = pytest.mark.external


@pytest.fixture(scope="module")
def smtp_server(tmp_path_factory):
    require_program("swaks")
    s = MailServer(str(tmp_path_factory.mktemp("swaks")),
                   listeners=["mx", "submission", "submissions"])
    s.start()
    try:
        s.add_user("alice@example.org")
        s.add_user("bob@example.org")
        yield s
    finally:
        s.stop()


def swaks(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SWAKS, "--server", HOST, "--port", str(port), "--timeout", "20",
                           *args], capture_output=True, text=True, timeout=60)


def stored_message(server: MailServer, address: str, marker: str) -> bytes | None:
    """The message in `address`'s Maildir containing `marker`, if it is there now."""
    for path in server.messages(address):
        with open(path, "rb") as f:
            data = f.read()
        if marker.encode() in data:
            return data
    return None


def find_message(server: MailServer, address: str, marker: str, timeout: float = 15.0) -> bytes:
    """The stored message for `address` containing `marker`, waiting for its delivery."""
    return wait_until(lambda: stored_message(server, address, marker), timeout,
                      message=f"a message with {marker} for {address}")


def test_swaks_mx(smtp_server):
    t = uuid.uuid4().hex
    r = swaks(smtp_server.ports["mx"], "--to", "Alice+swaks@example.org", "--from",
              "someone@remote.example", "--helo", "mta.remote.example", "--header",
              f"Subject: {t}", "--body", "hello from swaks")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "<-  250 2.0.0 Ok: queued as " in r.stdout
    data = find_message(smtp_server, "alice@example.org", t)
    assert data is not None and b"hello from swaks" in data
    assert b"Received: from mta.remote.example" in data and b"with ESMTP id" in data


def test_swaks_mx_unknown_user(smtp_server):
    r = swaks(smtp_server.ports["mx"], "--to", "nobody@example.org", "--from",
              "someone@remote.example")
    assert r.returncode != 0
    assert "<** 550 5.1.1" in r.stdout


def test_swaks_submission_starttls_auth_plain(smtp_server):
    t = uuid.uuid4().hex
    r = swaks(smtp_server.ports["submission"], "-tls", "--auth", "PLAIN", "--auth-user",
              "alice@example.org", "--auth-password", "secret-pw-1", "--from",
              "alice@example.org", "--to", "bob@example.org", "--header", f"Subject: {t}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "<~  235 2.7.0" in r.stdout
    data = find_message(smtp_server, "bob@example.org", t)
    assert data is not None and b"with ESMTPSA id" in data


def test_swaks_submission_auth_login_implicit_tls(smtp_server):
    t = uuid.uuid4().hex
    r = swaks(smtp_server.ports["submissions"], "--tlsc", "--auth", "LOGIN", "--auth-user",
              "bob@example.org", "--auth-password", "secret-pw-1", "--from", "bob@example.org",
              "--to", "alice@example.org", "--header", f"Subject: {t}")
    assert r.returncode == 0, r.stdout + r.stderr
    data = find_message(smtp_server, "alice@example.org", t)
    assert data is not None and b"with ESMTPSA id" in data


def test_swaks_submission_without_tls_cannot_auth(smtp_server):
    r = swaks(smtp_server.ports["submission"], "--auth", "PLAIN", "--auth-user",
              "alice@example.org", "--auth-password", "secret-pw-1", "--from",
              "alice@example.org", "--to", "bob@example.org")
    # swaks refuses itself when AUTH is not advertised; either way nothing is sent.
    assert r.returncode != 0
    assert "AUTH" not in "".join(l for l in r.stdout.splitlines() if l.startswith("<-  250-"))


def test_swaks_pipelining(smtp_server):
    t = uuid.uuid4().hex
    r = swaks(smtp_server.ports["mx"], "--pipeline", "--to", "alice@example.org,bob@example.org",
              "--from", "someone@remote.example", "--header", f"Subject: {t}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert find_message(smtp_server, "alice@example.org", t) is not None
    assert find_message(smtp_server, "bob@example.org", t) is not None

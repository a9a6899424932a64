"""The README walk-through, step by step, against a real server: what a new user does first."""
from __future__ import annotations

import email
import email.policy
import re
import subprocess

import pytest

from tests.environment import require_program
from tests.harness import subprocess_env

pytestmark = pytest.mark.external
PASSWORD = "correct horse battery staple"


def read(path: str) -> email.message.EmailMessage:
    with open(path, "rb") as f:
        return email.message_from_binary_file(f, policy=email.policy.default)


def test_walkthrough(make_server):
    swaks = require_program("swaks")
    server = make_server()
    server.admin("domain", "add", "example.org")
    server.admin("user", "add", "alice@example.org", "--password-stdin", input=PASSWORD + "\n")
    server.admin("alias", "add", "info@example.org", "alice@example.org")

    # Another server delivers to the alias on the MX port.
    mx = subprocess.run([swaks, "--server", "127.0.0.1", "--port", str(server.ports["mx"]),
                         "--from", "someone@elsewhere.test", "--to", "info@example.org",
                         "--header", "Subject: walkthrough via MX"],
                        capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert mx.returncode == 0, mx.stdout + mx.stderr
    assert re.search(r"^<-  250 .*queued", mx.stdout, re.M), mx.stdout

    # Alice sends through submission: STARTTLS with the certificate verified, then AUTH.
    sub = subprocess.run([swaks, "--server", "127.0.0.1", "--port", str(server.ports["submission"]),
                          "--tls", "--tls-verify", "--tls-ca-path", server.cafile,
                          "--auth", "PLAIN", "--auth-user", "alice@example.org",
                          "--auth-password", PASSWORD,
                          "--from", "alice@example.org", "--to", "alice+notes@example.org",
                          "--header", "Subject: walkthrough via submission"],
                         capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert sub.returncode == 0, sub.stdout + sub.stderr
    assert "<~  235 " in sub.stdout  # authenticated (inside TLS: swaks marks TLS lines with ~)
    assert re.search(r"^<~  250 .*queued", sub.stdout, re.M), sub.stdout

    messages = server.wait_for_messages("alice@example.org", count=2)
    assert len(messages) == 2
    subjects = sorted(str(read(path)["Subject"]) for path in messages)
    assert subjects == ["walkthrough via MX", "walkthrough via submission"]
    for path in messages:
        message = read(path)
        assert message["Return-Path"] and message["Received"] and message["Delivered-To"]
    assert "queue is empty" in server.admin("queue", "list").stdout.lower()


def test_submission_refuses_wrong_password(make_server):
    swaks = require_program("swaks")
    server = make_server()
    server.add_user("alice@example.org", PASSWORD)
    result = subprocess.run([swaks, "--server", "127.0.0.1", "--port", str(server.ports["submissions"]),
                             "--tlsc", "--tls-verify", "--tls-ca-path", server.cafile,
                             "--auth", "PLAIN", "--auth-user", "alice@example.org",
                             "--auth-password", "wrong", "--from", "alice@example.org",
                             "--to", "alice@example.org"],
                            capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert result.returncode != 0
    assert "535 " in result.stdout
    assert server.messages("alice@example.org") == []

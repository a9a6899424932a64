"""The `mailsuite` admin command run as a real subprocess (`python -m mailsuite.admin.cli
--config FILE ...`), exactly as an operator runs it: exit statuses, a password on standard input
or typed at a terminal prompt, one-line errors, PostgreSQL, and a running server (`twistd -n
mailsuite`) that sees CLI changes at once. Every command's behaviour is tested in process in
tests/unit/test_admin_directory.py.
"""
from __future__ import annotations

import os
import pty
import select
import smtplib
import subprocess
import sys
import time

import pytest
from passlib.hash import sha512_crypt

from mailsuite.directory import DirectoryStore
from mailsuite.directory import passwords
from tests.admincli import AdminCommand
from tests.environment import PgSchema
from tests.harness import REPO_ROOT as REPO
from tests.harness import subprocess_env
from tests.polling import wait_until
PW = "Secret pw 1"


class CLI(AdminCommand):
    """The admin command against one configuration file, as a subprocess."""

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "mailsuite.admin.cli", "--config", self.config_path, *args]

    def run(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args), input=input, capture_output=True, text=True,
                              timeout=60, cwd=REPO, env=subprocess_env())



@pytest.fixture
def cli(tmp_path) -> CLI:
    return CLI(str(tmp_path))


# -- the real command: exit statuses, standard input, one-line errors ---------------------------
def test_exit_statuses_and_password_stdin(cli):
    """The in-process tests (tests/unit/test_admin_directory.py) cover every command; here the
    process itself: what it prints, how it exits, and a password read from a pipe."""
    assert cli.ok("domain", "list") == ""  # works on a fresh data directory, before any server
    assert cli.ok("domain", "add", "example.org") == "added domain example.org\n"
    assert cli.ok("user", "add", "Alice@Example.org", "--password-stdin",
                  input=PW + "\r\n") == "added user alice@example.org\n"
    store = cli.store()
    try:
        assert passwords.verify_password(PW, store.password_record("alice@example.org")[1])[0]
    finally:
        store.close()
    cli.refused("user", "add", "alice@example.org", "--password-stdin", input=PW + "\n",
                match="user alice@example.org already exists")
    cli.refused("user", "add", "carol@example.org", "--password-stdin", input="",
                match="empty password refused")
    for args in [(), ("domain", "frobnicate"), ("user", "add", "x@example.org", "--hash-stdin",
                                                "--password-stdin")]:
        result = cli.run(*args)
        assert result.returncode == 2, (args, result)
        assert "usage:" in result.stderr and "Traceback" not in result.stderr


def run_on_terminal(argv: list[str], answers: list[str], timeout: float = 60.0
                    ) -> tuple[int, str]:
    """Run argv on a new pseudo-terminal (getpass reads /dev/tty); answer each prompt that ends
    in ': ' with the next of `answers`. (exit status, everything the terminal showed)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes the command, with the pty as controlling terminal
        try:
            os.chdir(REPO)
            os.execve(argv[0], argv, subprocess_env())
        finally:
            os._exit(127)
    shown = b""
    since_answer = b""  # output since the last answer: the next prompt must appear in it
    pending = list(answers)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
            since_answer += chunk
            if pending and since_answer.endswith(b": "):
                os.write(fd, pending.pop(0).encode() + b"\n")
                since_answer = b""
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), shown.decode(errors="replace")


def test_password_prompt_on_a_terminal(cli):
    cli.ok("domain", "add", "example.org")
    status, shown = run_on_terminal(cli.argv("user", "add", "carol@example.org"),
                                    ["first pw", "other pw"])
    assert status == 1, shown
    assert "Password: " in shown and "Password (again): " in shown
    assert "mailsuite: passwords do not match" in shown and "Traceback" not in shown
    assert "first pw" not in shown  # getpass turned echo off
    assert cli.ok("user", "list") == ""

    status, shown = run_on_terminal(cli.argv("user", "add", "carol@example.org"),
                                    ["same pw", "same pw"])
    assert status == 0, shown
    assert "added user carol@example.org" in shown
    store = cli.store()
    try:
        assert passwords.verify_password("same pw",
                                         store.password_record("carol@example.org")[1])[0]
    finally:
        store.close()
    # passwd prompts the same way; an unknown user is refused before any prompt.
    status, shown = run_on_terminal(cli.argv("user", "passwd", "nobody@example.org"), [])
    assert status == 1 and "no user nobody@example.org" in shown and "Password" not in shown


def test_unreachable_database_is_one_line(tmp_path):
    cli = CLI(str(tmp_path), "postgresql+psycopg://nobody:hidden@127.0.0.1:1/none"
                             "?connect_timeout=3")
    line = cli.refused("domain", "list", match="database postgresql+psycopg://nobody:***@")
    assert "hidden" not in line
    missing = tmp_path / "missing.toml"
    result = subprocess.run([sys.executable, "-m", "mailsuite.admin.cli", "--config",
                             str(missing), "domain", "list"], capture_output=True, text=True,
                            timeout=60, cwd=REPO, env=subprocess_env())
    assert result.returncode == 1 and result.stderr.count("\n") == 1


def test_cli_on_postgresql(tmp_path, postgresql_url):
    pg = PgSchema()
    try:
        cli = CLI(str(tmp_path), pg.url)
        cli.ok("domain", "add", "example.org")
        cli.ok("user", "add", "alice@example.org", "--password-stdin", input=PW + "\n")
        cli.ok("alias", "add", "sales@example.org", "alice@example.org")
        cli.refused("user", "add", "alice@example.org", "--password-stdin", input=PW + "\n",
                    match="already exists")
        assert cli.ok("domain", "list") == "example.org\n"
        assert cli.ok("user", "list") == "alice@example.org\n"
        cli.refused("domain", "remove", "example.org", match="--force")
        cli.ok("domain", "remove", "example.org", "--force")
        assert cli.ok("domain", "list") == ""
    finally:
        pg.drop()


# -- a running server sees changes without restart -----------------------------------------------
def rcpt(server, address: str) -> int:
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as client:
        client.ehlo("client.test")
        client.mail("sender@remote.example")
        return client.rcpt(address)[0]


def submission_login(server, user: str, password: str) -> int:
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as client:
        client.starttls(context=server.ssl_context())
        client.ehlo("client.test")
        try:
            return client.login(user, password)[0]
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code


def test_running_server_sees_cli_changes(make_server):
    server = make_server(listeners=["mx", "submission"],
                         extra={"limits": {"auth_failure_delay": 0.0}})
    server.admin("domain", "add", "example.org")
    assert rcpt(server, "carol@example.org") == 550

    server.admin("user", "add", "carol@example.org", "--password-stdin", input=PW + "\n")
    assert rcpt(server, "Carol+tag@example.org") == 250
    assert submission_login(server, "carol@example.org", PW) == 235

    server.admin("alias", "add", "sales@example.org", "carol@example.org")
    assert rcpt(server, "sales@example.org") == 250
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as client:
        client.sendmail("sender@remote.example", ["sales@example.org"],
                        b"Subject: via alias\r\n\r\nhello\r\n")
    assert server.wait_for_messages("carol@example.org"), server.log_text()[-3000:]

    server.admin("user", "passwd", "carol@example.org", "--password-stdin", input="changed\n")
    assert submission_login(server, "carol@example.org", PW) == 535
    server.admin("user", "disable", "carol@example.org")
    assert submission_login(server, "carol@example.org", "changed") == 535
    server.admin("user", "enable", "carol@example.org")
    assert submission_login(server, "carol@example.org", "changed") == 235

    # A Dovecot hash imported with the CLI logs in, and is rehashed to argon2id by the server.
    dovecot = "{SHA512-CRYPT}" + sha512_crypt.using(rounds=5000).hash("dave pw")
    server.admin("user", "add", "dave@example.org", "--hash-stdin", input=dovecot + "\n")
    assert submission_login(server, "Dave@example.org", "dave pw") == 235
    store = DirectoryStore(f"sqlite:///{server.data_dir}/mailsuite.db")
    try:
        assert store.password_record("dave@example.org")[1].startswith("$argon2id$")
    finally:
        store.close()
    assert submission_login(server, "dave@example.org", "dave pw") == 235

    # A route found a moment ago may still be remembered for [directory] lookup_cache_ttl
    # seconds (docs/design/directory.md, "Lookup cache"): a removal is seen within it.
    server.admin("alias", "remove", "sales@example.org")
    wait_until(lambda: rcpt(server, "sales@example.org") == 550, timeout=10,
               message="the alias removal seen by RCPT")
    server.admin("user", "remove", "carol@example.org")
    wait_until(lambda: rcpt(server, "carol@example.org") == 550, timeout=10,
               message="the user removal seen by RCPT")
    server.admin("domain", "remove", "example.org", "--force")  # dave is still there
    assert rcpt(server, "dave@example.org") != 250  # no longer hosted: relay denied

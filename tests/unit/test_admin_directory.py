"""The `mailsuite` admin command for domains, users and aliases, run in process through its
entry point (`mailsuite.admin.cli.main`) with standard input replaced and output captured.

Refusals must be one line on stderr ("mailsuite: ..."), no traceback, exit status 1; usage
errors exit 2. tests/scenario/test_admin_cli.py runs the real command as a subprocess (exit
statuses, standard input, the terminal prompt, PostgreSQL, a running server).
"""
from __future__ import annotations

import io
import sys
from dataclasses import dataclass

import pytest
from passlib.hash import sha512_crypt

from mailsuite.admin import cli as admin_cli
from mailsuite.directory import passwords
from tests.admincli import AdminCommand

PW = "Secret pw 1"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class CLI(AdminCommand):
    """The admin command against one configuration file, called in this process."""

    def __init__(self, base: str, capsys, monkeypatch):
        super().__init__(base)
        self.capsys = capsys
        self.monkeypatch = monkeypatch

    def run(self, *args: str, input: str | None = None) -> Result:
        self.capsys.readouterr()  # drop anything printed before this command
        self.monkeypatch.setattr(sys, "stdin", io.StringIO(input or ""))
        try:
            code = admin_cli.main(["--config", self.config_path, *args])
        except SystemExit as e:  # argparse: usage errors
            code = e.code
        out, err = self.capsys.readouterr()
        return Result(code, out, err)



@pytest.fixture
def cli(tmp_path, capsys, monkeypatch) -> CLI:
    return CLI(str(tmp_path), capsys, monkeypatch)


# -- domains -------------------------------------------------------------------------------------
def test_domain_add_list_remove(cli):
    assert cli.ok("domain", "list") == ""  # works on a fresh data directory, before any server
    assert cli.ok("domain", "add", "Example.ORG") == "added domain example.org\n"
    cli.ok("domain", "add", "example.net")
    # `domain list`: exactly one domain per line and nothing else (scripts rely on it).
    assert cli.ok("domain", "list") == "example.net\nexample.org\n"
    cli.refused("domain", "add", "example.org", match="domain example.org already exists")
    cli.refused("domain", "add", "bad_domain..org", match="invalid domain")
    assert "removed domain example.net" in cli.ok("domain", "remove", "example.net")
    assert cli.ok("domain", "list") == "example.org\n"
    cli.refused("domain", "remove", "example.net", match="unknown domain example.net")


def test_remove_domain_with_users_needs_force(cli):
    cli.ok("domain", "add", "example.org")
    cli.ok("user", "add", "alice@example.org", "--password-stdin", input=PW + "\n")
    cli.ok("alias", "add", "sales@example.org", "alice@example.org")
    cli.refused("domain", "remove", "example.org",
                match="domain example.org still has 1 user and 1 alias; remove them first or "
                      "use --force")
    assert cli.ok("user", "list") == "alice@example.org\n"
    out = cli.ok("domain", "remove", "example.org", "--force")
    assert "with 1 user(s) and 1 alias(es)" in out
    assert cli.ok("domain", "list") == ""
    cli.refused("user", "list", "example.org", match="unknown domain example.org")
    cli.ok("domain", "add", "example.org")
    assert cli.ok("user", "list") == "" and cli.ok("alias", "list") == ""


# -- users ---------------------------------------------------------------------------------------
@pytest.fixture
def two_users(cli):
    """example.org with alice (password PW) and bob ("bob pw"), and a store on the database."""
    cli.ok("domain", "add", "example.org")
    assert cli.ok("user", "add", "Alice@Example.org", "--password-stdin",
                  input=PW + "\n") == "added user alice@example.org\n"
    cli.ok("user", "add", "bob@example.org", "--password-stdin", input="bob pw\r\n")
    store = cli.store()
    yield store
    store.close()


def test_user_add_and_refusals(cli, two_users):
    store = two_users
    _, stored, enabled = store.password_record("alice@example.org")
    assert enabled and stored.startswith("$argon2id$")
    assert passwords.verify_password(PW, stored)[0]
    assert passwords.verify_password("bob pw", store.password_record("bob@example.org")[1])[0]
    cli.refused("user", "add", "ALICE@example.org", "--password-stdin", input=PW + "\n",
                match="user alice@example.org already exists")
    cli.refused("user", "add", "carol@example.com", "--password-stdin", input=PW + "\n",
                match="unknown domain example.com")
    for bad in ["carol", "carol@@example.org", "ca rol@example.org"]:
        cli.refused("user", "add", bad, "--password-stdin", input=PW + "\n",
                    match="invalid address")
    cli.refused("user", "add", "carol@example.org", "--password-stdin", input="\n",
                match="empty password refused")
    cli.refused("user", "add", "carol@example.org", "--password-stdin", input="",
                match="empty password refused")
    assert cli.ok("user", "list") == "alice@example.org\nbob@example.org\n"
    cli.refused("user", "list", "unknown.example", match="unknown domain unknown.example")


def test_user_passwd_disable_enable_remove(cli, two_users):
    store = two_users
    assert cli.ok("user", "passwd", "alice@example.org", "--password-stdin",
                  input="new pw\n") == "changed the password of alice@example.org\n"
    stored = store.password_record("alice@example.org")[1]
    assert passwords.verify_password("new pw", stored)[0]
    assert not passwords.verify_password(PW, stored)[0]
    cli.refused("user", "passwd", "nobody@example.org", "--password-stdin", input="x\n",
                match="no user nobody@example.org")
    cli.refused("user", "passwd", "alice@example.org", "--password-stdin", input="\n",
                match="empty password refused")

    cli.ok("user", "disable", "bob@example.org")
    assert store.password_record("bob@example.org")[2] is False
    assert cli.ok("user", "list", "example.org") == (
        "alice@example.org\nbob@example.org\tdisabled\n")
    cli.ok("user", "enable", "BOB@example.org")
    assert store.password_record("bob@example.org")[2] is True
    cli.refused("user", "disable", "nobody@example.org", match="no user nobody@example.org")
    cli.refused("user", "enable", "x@unknown.example", match="unknown domain unknown.example")

    assert "removed user bob@example.org" in cli.ok("user", "remove", "bob@example.org")
    assert store.password_record("bob@example.org") is None
    cli.refused("user", "remove", "bob@example.org", match="no user bob@example.org")


def test_user_import_existing_hash(cli, two_users):
    store = two_users
    dovecot = "{SHA512-CRYPT}" + sha512_crypt.using(rounds=5000).hash("dave pw")
    cli.ok("user", "add", "dave@example.org", "--hash-stdin", input=dovecot + "\n")
    assert store.password_record("dave@example.org")[1] == dovecot
    cli.refused("user", "add", "erin@example.org", "--hash-stdin", input="garbage\n",
                match="unrecognised password hash")
    cli.refused("user", "passwd", "dave@example.org", "--hash-stdin", input="{FOO}x\n",
                match="unrecognised password hash")
    assert cli.run("user", "add", "erin@example.org", "--hash-stdin", "--password-stdin",
                   input="x\n").returncode == 2  # one or the other


# -- aliases -------------------------------------------------------------------------------------
def test_alias_commands(cli):
    cli.ok("domain", "add", "example.org")
    cli.ok("domain", "add", "example.net")
    cli.ok("user", "add", "alice@example.org", "--password-stdin", input=PW + "\n")
    assert cli.ok("alias", "add", "Sales@example.org", "alice@example.org",
                  "Partner@Remote.Example") == (
        "added alias sales@example.org -> alice@example.org, Partner@remote.example\n")
    cli.ok("alias", "add", "@example.net", "alice@example.org")
    cli.ok("alias", "add", "info@example.net", "sales@example.org")
    assert cli.ok("alias", "list") == (
        "@example.net -> alice@example.org\n"
        "info@example.net -> sales@example.org\n"
        "sales@example.org -> alice@example.org, Partner@remote.example\n")
    assert cli.ok("alias", "list", "example.org") == (
        "sales@example.org -> alice@example.org, Partner@remote.example\n")
    cli.refused("alias", "add", "sales@elsewhere.example", "alice@example.org",
                match="alias source sales@elsewhere.example is not in a hosted domain")
    cli.refused("alias", "add", "sales@example.org", "not-an-address",
                match="invalid address 'not-an-address'")
    cli.refused("alias", "add", "sa les@example.org", "alice@example.org",
                match="invalid address")
    cli.refused("alias", "add", "sales@example.org", "alice@example.org",
                match="alias sales@example.org -> alice@example.org already exists")
    cli.refused("alias", "list", "unknown.example", match="unknown domain unknown.example")
    cli.refused("alias", "remove", "sales@example.org", "bob@example.org",
                match="alias sales@example.org has no target bob@example.org")
    cli.refused("alias", "remove", "nothing@example.org", match="no alias nothing@example.org")
    cli.ok("alias", "remove", "sales@example.org", "partner@remote.example")
    assert "sales@example.org -> alice@example.org\n" in cli.ok("alias", "list")
    cli.ok("alias", "remove", "@example.net")
    cli.ok("alias", "remove", "SALES@example.org")
    assert cli.ok("alias", "list") == "info@example.net -> sales@example.org\n"


def test_usage_errors_exit_non_zero(cli):
    for args in [(), ("domain",), ("domain", "frobnicate"), ("user", "add"),
                 ("alias", "add", "sales@example.org")]:
        result = cli.run(*args)
        assert result.returncode == 2, (args, result)
        assert "usage:" in result.stderr and "Traceback" not in result.stderr


def test_missing_configuration_file_is_one_line(cli, tmp_path):
    cli.config_path = str(tmp_path / "missing.toml")
    cli.refused("domain", "list", match="does not exist")

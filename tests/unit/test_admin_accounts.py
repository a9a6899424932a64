"""`mailsuite admin add|passwd|delete|list` and the ms_admin table (mailsuite/directory/admins.py)."""
from __future__ import annotations

import io
import sys

import pytest

from mailsuite.admin.cli import main
from mailsuite.directory import DirectoryStore, passwords
from mailsuite.directory.admins import AdminStore
from tests.harness import write_toml


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    config = str(tmp_path / "mailsuite.toml")
    write_toml(config, {"server": {"data_dir": str(tmp_path / "data")}})

    def run(*args: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main(["--config", config, "admin", *args])
        out, err = capsys.readouterr()
        return code, out, err

    run.store = lambda: AdminStore(DirectoryStore(f"sqlite:///{tmp_path}/data/mailsuite.db"))
    return run


def test_add_list_passwd_delete(cli):
    assert cli("add", "Root", "--password-stdin", stdin="pw-one\n")[:2] == (0, "added admin root\n")
    stored = cli.store().password_hash("root")
    assert stored.startswith("$argon2id$") and passwords.verify_password("pw-one", stored)[0]
    assert cli("list")[:2] == (0, "root\n")
    assert cli("passwd", "root", "--password-stdin", stdin="pw-two\n")[0] == 0
    assert passwords.verify_password("pw-two", cli.store().password_hash("root"))[0]
    assert cli("delete", "ROOT")[:2] == (0, "deleted admin root\n")
    assert cli("list")[1] == ""


def test_refusals_are_one_line(cli):
    cli("add", "root", "--password-stdin", stdin="pw-one\n")
    assert cli("add", "root", "--password-stdin", stdin="pw\n")[::2] == (
        1, "mailsuite: admin root already exists\n")
    assert cli("add", "bad name", "--password-stdin", stdin="pw\n")[0] == 1
    assert cli("add", "other", "--password-stdin", stdin="\n")[2] == (
        "mailsuite: empty password refused\n")
    assert cli("passwd", "nobody", "--password-stdin", stdin="pw\n")[2] == (
        "mailsuite: no admin nobody\n")
    assert cli("delete", "nobody")[2] == "mailsuite: no admin nobody\n"
    assert cli("list")[1] == "root\n"


def test_an_admin_is_not_a_mail_user(cli, tmp_path):
    cli("add", "root@example.org", "--password-stdin", stdin="pw-one\n")
    store = DirectoryStore(f"sqlite:///{tmp_path}/data/mailsuite.db")
    assert store.password_record("root@example.org") is None

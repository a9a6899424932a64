"""The admin command refuses bad input in one line, always (docs/design/directory.md, "The admin
command"): passwords on standard input that are too long, not UTF-8 or more than one line;
arguments with control characters or undecodable bytes; usage errors; `--config ''`, huge or
binary configuration files; a SQLite URL under a missing directory. Also `user sender`.
(The same as real subprocesses: tests/scenario/test_attack_cli.py.)"""
from __future__ import annotations

import io
import os
import sys

import pytest

from mailsuite.admin import cli as admin_cli
from mailsuite.directory.store import MAX_PASSWORD
from tests.harness import write_toml
from tests.unit.test_admin_directory import CLI, PW, cli  # noqa: F401


def one_line(result, code: int, match: str) -> str:
    assert result.returncode == code, (result.returncode, result.stderr, result.stdout)
    assert "Traceback" not in result.stderr and "unexpected error" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mailsuite"), result.stderr
    assert match in lines[0], (match, lines[0])
    return lines[0]


def run_bytes(cli: CLI, *args: str, stdin: bytes):  # noqa: F811
    """Like cli.run, with standard input as bytes behind a text wrapper (as sys.stdin is)."""
    cli.capsys.readouterr()
    cli.monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code = admin_cli.main(["--config", cli.config_path, *args])
    out, err = cli.capsys.readouterr()
    return type("R", (), {"returncode": code, "stdout": out, "stderr": err})


@pytest.fixture
def domain(cli, prepared_directory):  # noqa: F811
    prepared_directory(os.path.join(cli.data_dir, "mailsuite.db"))  # not a new one per test
    cli.ok("domain", "add", "example.org")
    return cli


@pytest.mark.parametrize("stdin, match", [
    (b"a" * 1_000_000 + b"\n", f"password longer than {MAX_PASSWORD} octets refused"),
    (b"a" * (MAX_PASSWORD + 1), f"password longer than {MAX_PASSWORD} octets refused"),
    (b"caf\xe9\n", "the password on standard input is not valid UTF-8"),
    (b"\xff\xfe\n", "not valid UTF-8"),
    (b"first\nsecond\n", "standard input holds more than one line"),
    (b"first\n\n", "standard input holds more than one line"),
    (b"first\r\nsecond", "standard input holds more than one line"),
    (b"pass\x00word\n", "must not contain line breaks or NUL"),
    (b"pass\rword\n", "must not contain line breaks or NUL"),
    (b"\n", "empty password refused"),
    (b"", "empty password refused"),
], ids=["1MB", "1025", "latin1", "bom", "two-lines", "blank-line", "crlf-two", "nul", "cr",
        "newline", "nothing"])
def test_bad_passwords_on_stdin_are_one_line(domain, stdin, match):
    one_line(run_bytes(domain, "user", "add", "carol@example.org", "--password-stdin",
                       stdin=stdin), 1, match)
    assert domain.ok("user", "list") == ""


def test_passwd_reads_stdin_the_same_way(domain):
    domain.ok("user", "add", "carol@example.org", "--password-stdin", input=PW + "\n")
    for stdin, match in [(b"x" * 5000, "longer than"), (b"\xff\n", "not valid UTF-8"),
                         (b"a\nb\n", "more than one line")]:
        one_line(run_bytes(domain, "user", "passwd", "carol@example.org", "--password-stdin",
                           stdin=stdin), 1, match)


@pytest.mark.parametrize("stdin", [b"p" * MAX_PASSWORD, b"p" * MAX_PASSWORD + b"\n",
                                   "pässwörd\r\n".encode(), b"no newline"],
                         ids=["max", "max-lf", "utf8-crlf", "no-lf"])
def test_one_line_of_up_to_max_octets_is_accepted(domain, stdin):
    result = run_bytes(domain, "user", "add", "carol@example.org", "--password-stdin", stdin=stdin)
    assert result.returncode == 0, result.stderr


def test_hash_stdin_is_bounded_too(domain):
    one_line(run_bytes(domain, "user", "add", "carol@example.org", "--hash-stdin",
                       stdin=b"{PLAIN}" + b"x" * 100_000), 1, "password hash longer than")
    one_line(run_bytes(domain, "user", "add", "carol@example.org", "--hash-stdin",
                       stdin=b"{PLAIN}x\n{PLAIN}y\n"), 1, "more than one line")


@pytest.mark.parametrize("argument, match", [
    ("a\x00b@example.org", "contains a control character"),
    ("alice@example.org\n", "contains a control character"),
    ("\x1b[31malice@example.org", "contains a control character"),
    ("a\x85@example.org", "contains a control character"),
    ("\udcffalice@example.org", "is not valid UTF-8"),  # what Python makes of a byte 0xff
    ("a" * 5000 + "@example.org", "longer than 4096 characters"),
], ids=["nul", "lf", "esc", "c1", "byte-ff", "5000"])
def test_bad_arguments_are_one_line_usage_errors(domain, argument, match):
    one_line(domain.run("user", "add", argument, "--password-stdin", input=PW), 2, match)
    assert domain.ok("user", "list") == ""


@pytest.mark.parametrize("local", ["/tmp/x/evil", "alice/.sent", "a\\b", "a\u202eb", "a\u200bb"])
def test_user_add_refuses_unsafe_names(domain, local):
    one_line(domain.run("user", "add", f"{local}@example.org", "--password-stdin",
                        input=PW + "\n"), 1, "invalid address")
    assert not os.path.exists("/tmp/x/evil")


def test_usage_errors_are_one_line(domain):
    for args in [(), ("domain",), ("user", "frobnicate"), ("user", "add"),
                 ("user", "sender"), ("--bogus",), ("user", "add", "a@b.c", "--pw")]:
        one_line(domain.run(*args), 2, "usage:")


def test_config_file_problems_are_one_line(cli, tmp_path):  # noqa: F811
    result = cli.run  # keep the fixture's stdin handling
    cli.config_path = ""
    one_line(result("domain", "list"), 1, "configuration file name is empty")
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (2 * 1024 * 1024))
    cli.config_path = str(big)
    one_line(result("domain", "list"), 1, "larger than 1048576 octets")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    cli.config_path = str(binary)
    one_line(result("domain", "list"), 1, "not valid")
    cli.config_path = str(tmp_path)
    one_line(result("domain", "list"), 1, "is a directory")


def test_sqlite_url_under_a_missing_directory_is_refused(cli, tmp_path):  # noqa: F811
    typo = tmp_path / "no-such-dir" / "mailsuite.db"
    write_toml(cli.config_path, {"server": {"data_dir": cli.data_dir},
                                 "database": {"url": "sqlite:///" + str(typo)}})
    one_line(cli.run("domain", "add", "example.org"), 1,
             "no-such-dir of the SQLite database does not exist")
    assert not typo.parent.exists()
    # The default database under data_dir is created, directory and all (a first run).
    write_toml(cli.config_path, {"server": {"data_dir": str(tmp_path / "fresh" / "data")}})
    cli.ok("domain", "add", "example.org")
    assert (tmp_path / "fresh" / "data" / "mailsuite.db").is_file()


def test_user_sender_commands(domain):
    domain.ok("user", "add", "alice@example.org", "--password-stdin", input=PW + "\n")
    assert domain.ok("user", "sender", "add", "Alice@example.org", "Info@Example.org") == (
        "alice@example.org may now send as info@example.org\n")
    domain.ok("user", "sender", "add", "alice@example.org", "@example.net")
    assert domain.ok("user", "sender", "list") == (
        "alice@example.org\t@example.net\nalice@example.org\tinfo@example.org\n")
    assert domain.ok("user", "sender", "list", "alice@example.org").count("\n") == 2
    domain.refused("user", "sender", "add", "alice@example.org", "info@example.org",
                   match="alice@example.org may already send as info@example.org")
    domain.refused("user", "sender", "add", "nobody@example.org", "info@example.org",
                   match="no user nobody@example.org")
    domain.refused("user", "sender", "add", "alice@example.org", "not an address",
                   match="invalid address")
    domain.refused("user", "sender", "list", "nobody@example.org",
                   match="no user nobody@example.org")
    assert domain.ok("user", "sender", "remove", "alice@example.org", "info@example.org") == (
        "alice@example.org may no longer send as info@example.org\n")
    domain.refused("user", "sender", "remove", "alice@example.org", "info@example.org",
                   match="has no extra sender address info@example.org")
    assert domain.ok("user", "sender", "list") == "alice@example.org\t@example.net\n"


def test_no_terminal_to_prompt_on_is_one_line(domain, monkeypatch):
    """Without --password-stdin and without a terminal, getpass would read standard input after a
    multi-line warning: refuse instead, saying what to do."""
    from mailsuite.admin import user_cmd

    monkeypatch.setattr(user_cmd, "_has_terminal", lambda: False)
    one_line(domain.run("user", "add", "carol@example.org", input="pw\n"), 1,
             "no terminal to ask for the password on: give it with --password-stdin")


def test_dkim_show_stays_under_dkim_dir(domain, tmp_path):
    """`dkim show` names a directory under <data_dir>/dkim: a path is not a domain."""
    for bad in ["../../etc", "/etc", "exa/mple.org"]:
        one_line(domain.run("dkim", "show", bad), 1, "invalid domain")

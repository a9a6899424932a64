"""Attack: hostile input to the admin command, as real subprocesses (`python -m
mailsuite.admin.cli`), as a script or a careless operator would give it: a 1 MB password, a
password that is not UTF-8, several lines on standard input, undecodable bytes and control
characters in arguments, a configuration file of any size or an empty name, a SQLite URL under a
directory that does not exist (refused by the CLI and by the server at start-up, except the
default database under data_dir). Every one is refused in one line with exit status 1 or 2, no
traceback, and changes nothing.

Prints `ATTACK cli: refused=N/M one_line=N/M` (no server runs: there is no RSS to report).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.harness import REPO_ROOT, MailServer, subprocess_env, write_toml


def run(config: str | None, args: list, stdin: bytes = b"") -> subprocess.CompletedProcess:
    argv: list = [sys.executable, "-m", "mailsuite.admin.cli"]
    if config is not None:
        argv += ["--config", config]
    return subprocess.run(argv + args, input=stdin, capture_output=True, timeout=60,
                          cwd=REPO_ROOT, env=subprocess_env())


@pytest.fixture
def config(tmp_path) -> str:
    path = str(tmp_path / "mailsuite.toml")
    write_toml(path, {"server": {"data_dir": str(tmp_path / "data")}})
    assert run(path, ["domain", "add", "example.org"]).returncode == 0
    return path


def test_hostile_cli_input_is_refused_in_one_line(config, tmp_path):
    big = tmp_path / "big.toml"
    big.write_bytes(b"# padding\n" * 200_000)  # 2 MB of comments: valid TOML, too large
    typo = tmp_path / "typo.toml"
    write_toml(str(typo), {"server": {"data_dir": str(tmp_path / "data")},
                           "database": {"url": "sqlite:///" + str(tmp_path / "nodir" / "x.db")}})
    add = ["user", "add", "carol@example.org", "--password-stdin"]
    cases = [
        ("1 MB password", config, add, b"x" * 1_000_000 + b"\n", 1, "longer than 1024 octets"),
        ("latin-1 password", config, add, b"caf\xe9\n", 1, "not valid UTF-8"),
        ("two lines", config, add, b"first\nsecond\n", 1, "more than one line"),
        ("undecodable argument", config, ["user", "add", b"\xff@example.org",
                                          "--password-stdin"], b"pw\n", 2, "not valid UTF-8"),
        ("control character", config, ["user", "add", "a\x1b[2J@example.org",
                                       "--password-stdin"], b"pw\n", 2, "control character"),
        ("slash in local part", config, ["user", "add", "/tmp/x/evil@example.org",
                                         "--password-stdin"], b"pw\n", 1, "unsafe"),
        ("empty config name", "", ["domain", "list"], b"", 1, "file name is empty"),
        ("huge config", str(big), ["domain", "list"], b"", 1, "larger than 1048576 octets"),
        ("config is /dev/zero", "/dev/zero", ["domain", "list"], b"", 1,
         "not a regular file"),
        ("SQLite under a missing directory", str(typo), ["domain", "list"], b"", 1,
         "does not exist"),
        ("usage error", config, ["user", "frobnicate"], b"", 2, "usage:"),
    ]
    refused = one_line = 0
    for name, cfg, args, stdin, code, match in cases:
        result = run(cfg, args, stdin)
        err = result.stderr.decode("utf-8", "replace")
        assert "Traceback" not in err, (name, err)
        refused += result.returncode == code
        lines = err.splitlines()
        one_line += len(lines) == 1 and match in lines[0]
        assert result.returncode == code, (name, result.returncode, err)
        assert len(lines) == 1 and match in lines[0], (name, err)
    print(f"\nATTACK cli: refused={refused}/{len(cases)} one_line={one_line}/{len(cases)}")
    assert run(config, ["user", "list"]).stdout == b""  # nothing was added
    assert not os.path.exists(tmp_path / "nodir") and not os.path.exists("/tmp/x/evil")


def test_server_refuses_sqlite_under_a_missing_directory(tmp_path):
    url = "sqlite:///" + str(tmp_path / "no-such-dir" / "mailsuite.db")
    server = MailServer(str(tmp_path / "server"), listeners=["mx"],
                        extra={"database": {"url": url}})
    with pytest.raises(RuntimeError) as info:
        server.start(timeout=60)
    output = str(info.value)
    assert ("mailsuite: [database] url: the directory " + str(tmp_path / "no-such-dir")
            + " of the SQLite database does not exist") in output, output
    assert "Traceback" not in output
    assert not os.path.exists(tmp_path / "no-such-dir")


def test_server_creates_the_default_database_spelt_out(tmp_path):
    """The default database (data_dir/mailsuite.db) is created with data_dir, also when the
    URL names it explicitly."""
    base = tmp_path / "server"
    url = "sqlite:///" + str(base / "data" / "mailsuite.db")
    server = MailServer(str(base), listeners=["mx"], extra={"database": {"url": url}})
    server.start()
    try:
        assert os.path.isfile(base / "data" / "mailsuite.db")
    finally:
        server.stop()


def test_server_refuses_an_empty_config_name(tmp_path):
    """`twistd mailsuite --config ''` is a mistake (an unset variable), not "the defaults"."""
    from tests.harness import twistd_command

    result = subprocess.run(twistd_command() + ["-n", "--pidfile=", "--logfile",
                                                str(tmp_path / "twistd.log"), "mailsuite",
                                                "--config", ""],
                            capture_output=True, timeout=60, cwd=str(tmp_path),
                            env=subprocess_env())
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode != 0
    assert "mailsuite: the configuration file name is empty" in err, err
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "mailsuite-data")

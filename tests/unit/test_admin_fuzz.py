"""Fuzzing the admin command's argument and standard-input handling, in process
(`mailsuite.admin.cli.main`). Whatever the arguments and standard input:

- the exit status is 0, 1 or 2;
- a refusal is exactly one line on stderr starting with "mailsuite", never a traceback and never
  the catch-all "unexpected error" (that would be a bug the net caught);
- nothing is written outside the data directory.

The seed corpus (tests/unit/corpus/admin_cli/*.json: argv, standard input in base64, optionally
repeated) holds the attack inputs and is replayed first. Commands that would reach the network
(`dns --check`) or generate keys (`dkim generate`) are left out.
"""
from __future__ import annotations

import base64
import io
import json
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailsuite.admin import cli as admin_cli
from mailsuite.admin import user_cmd
from mailsuite.directory import DirectoryStore
from tests.harness import write_toml

CORPUS = os.path.join(os.path.dirname(__file__), "corpus", "admin_cli")

COMMANDS = [
    ["domain", "add"], ["domain", "list"], ["domain", "remove"], ["user", "add"],
    ["user", "list"], ["user", "remove"], ["user", "passwd"], ["user", "disable"],
    ["user", "enable"], ["user", "sender", "add"], ["user", "sender", "remove"],
    ["user", "sender", "list"], ["alias", "add"], ["alias", "list"], ["alias", "remove"],
    ["dns"], ["dkim", "show"], ["queue", "list"], ["queue", "show"], ["user"], [],
]
OPTIONS = ["--password-stdin", "--hash-stdin", "--force", "--help", "-h", "--all", "--", "-",
           "--config", "--pass", "--selector"]
HOSTILE_TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=80)
ADDRESSY = st.builds(lambda a, b: f"{a}@{b}", HOSTILE_TEXT, st.sampled_from(
    ["example.org", "EXAMPLE.org", "", "..", "exa/mple.org", "bücher.example", "example.net"]))
ARGUMENT = st.one_of(HOSTILE_TEXT, ADDRESSY, st.sampled_from(OPTIONS),
                     st.sampled_from(["alice@example.org", "@example.org", "example.org"]),
                     st.text(max_size=5000, alphabet="a/.\\@"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    data = base / "data"
    config = base / "mailsuite.toml"
    write_toml(str(config), {"server": {"data_dir": str(data)}})
    store = DirectoryStore("sqlite:///" + str(data / "mailsuite.db"))
    store.prepare()
    store.add_domain("example.org")
    store.add_user("alice@example.org", password_hash="{PLAIN}secret")
    store.close()
    return str(base), str(config)


def run(config: str, argv: list[str], stdin: bytes, capsys, monkeypatch) -> tuple[int, str]:
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    # Never wait at a developer's terminal: the prompt answers at once.
    monkeypatch.setattr(user_cmd, "_has_terminal", lambda: True)
    monkeypatch.setattr(user_cmd.getpass, "getpass", lambda prompt="": "fuzz pw")
    if "--config" not in argv:
        argv = ["--config", config, *argv]
    code = admin_cli.main(argv)
    _out, err = capsys.readouterr()
    return code, err


def check(code: int, err: str, base: str, before: set[str]) -> None:
    assert code in (0, 1, 2), (code, err)
    assert "Traceback" not in err and "unexpected error" not in err, err
    if code != 0:
        assert err.count("\n") == 1 and err.endswith("\n") and err.startswith("mailsuite"), err
    # Nothing outside the base directory (the only place a command here may write).
    assert _outside(base) == before


def _outside(base: str) -> set[str]:
    parent = os.path.dirname(base)
    return {n for n in os.listdir(parent)} | {n for n in os.listdir("/tmp") if "evil" in n}


def corpus() -> list[tuple[str, list[str], bytes]]:
    cases = []
    for name in sorted(os.listdir(CORPUS)):
        with open(os.path.join(CORPUS, name)) as f:
            case = json.load(f)
        stdin = base64.b64decode(case["stdin_b64"]) * case.get("stdin_repeat", 1)
        cases.append((name, case["argv"], stdin))
    return cases


@pytest.mark.parametrize("name, argv, stdin", corpus(), ids=[c[0] for c in corpus()])
def test_corpus(setup, capsys, monkeypatch, name, argv, stdin):
    base, config = setup
    before = _outside(base)
    code, err = run(config, argv, stdin, capsys, monkeypatch)
    check(code, err, base, before)
    assert code != 0, (name, err)  # every seed is an attack input that must be refused


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(command=st.sampled_from(COMMANDS), arguments=st.lists(ARGUMENT, max_size=4),
       stdin=st.one_of(st.binary(max_size=200), st.sampled_from([b"pw\n", b"", b"\xff\n",
                                                                 b"a" * 2000])))
def test_fuzz_arguments_and_stdin(setup, capsys, monkeypatch, command, arguments, stdin):
    base, config = setup
    if "--config" in arguments:
        # `--config X` reads a file: only the fixture's own, an empty or a missing name.
        arguments = [a for a in arguments if a != "--config"] + ["--config", ""]
    before = _outside(base)
    code, err = run(config, [*command, *arguments], stdin, capsys, monkeypatch)
    check(code, err, base, before)

"""`mailsuite limits show|reset` through the CLI's own entry point (cli.main), on a SQLite
directory that a DirectoryStore (playing the server) fills with counters."""
from __future__ import annotations

import time

import pytest

from mailsuite.admin import cli, limits_cmd
from mailsuite.directory import DirectoryStore
from tests.harness import write_toml


@pytest.fixture
def env(tmp_path):
    config_path = str(tmp_path / "mailsuite.toml")
    write_toml(config_path, {
        "server": {"data_dir": str(tmp_path / "data")},
        "ratelimit": {"mx_connections_per_minute": 5, "submission_messages_per_hour": 0},
        "greylist": {"enabled": True, "delay": 120},
        "dnsbl": {"sites": ["zen.spamhaus.org=127.0.0.[2..11]*3",
                            "list.dnswl.org=127.0.[0..255].[1..3]*-5"], "threshold": 3},
    })
    store = DirectoryStore("sqlite:///" + str(tmp_path / "data" / "mailsuite.db"))
    store.prepare()
    yield config_path, store
    store.close()


def run(env, capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["--config", env[0], "limits", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_show_on_a_fresh_directory(env, capsys):
    code, out, err = run(env, capsys, "show")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "[ratelimit]"
    assert lines[1].split()[:2] == ["mx_connections_per_minute", "5"]
    assert lines[3].split()[:2] == ["submission_messages_per_hour", "off"]
    assert "exempt_networks                 127.0.0.0/8, ::1/128" in out
    assert "  enabled       yes" in out and "  delay         120 s" in out
    assert "  threshold     3" in out
    assert "  site          zen.spamhaus.org=127.0.0.[2..11]*3  (weight +3)" in out
    assert "list.dnswl.org=127.0.[0..255].[1..3]*-5  (weight -5, allow list)" in out
    assert lines[-2:] == ["rate windows: 0",
                          "greylist: 0 pending, 0 passed, 0 whitelisted networks"]


def test_show_lists_the_current_windows_and_greylist_counts(env, capsys, monkeypatch):
    store = env[1]
    now = 1_700_000_000 - 1_700_000_000 % 60 + 18
    monkeypatch.setattr(limits_cmd, "_now", lambda: now)
    for _ in range(3):
        store.rate_hit("mx-conn:198.51.100.7", 60, 5, now)
    store.rate_hit("sub-rcpt:alice@example.org", 3600, 1000, now, cost=4)
    store.rate_hit("mx-conn:198.51.100.8", 60, 5, now - 120)  # an ended window: not shown
    store.greylist_check("198.51.100.0/24", "a@b.example", "alice@example.org", now - 200, 120,
                         3600, 86400)
    store.greylist_check("198.51.100.0/24", "a@b.example", "alice@example.org", now, 120, 3600,
                         86400)
    store.greylist_check("203.0.113.0/24", "<>", "alice@example.org", now, 120, 3600, 86400)
    code, out, err = run(env, capsys, "show")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    at = lines.index("rate windows: 2")
    conn = lines[at + 1].split()
    assert conn[:2] == ["mx-conn:198.51.100.7", "3/5"]
    assert conn[2:] == ["window", "ends", "in", "42", "s"]
    assert lines[at + 2].split()[:2] == ["sub-rcpt:alice@example.org", "4/1000"]
    assert lines[at + 3] == "greylist: 1 pending, 1 passed, 1 whitelisted network"


def test_reset_forgets_a_counter(env, capsys):
    env[1].rate_hit("mx-conn:198.51.100.7", 60, 5, time.time())
    assert run(env, capsys, "reset", "mx-conn:198.51.100.7") == (
        0, "reset mx-conn:198.51.100.7 (1 window removed)\n", "")
    code, out, err = run(env, capsys, "reset", "mx-conn:198.51.100.7")
    assert (code, out, err) == (1, "", "mailsuite: no rate counter mx-conn:198.51.100.7\n")


def test_bad_dnsbl_site_is_one_line(env, capsys, tmp_path):
    write_toml(env[0], {"server": {"data_dir": str(tmp_path / "data")},
                        "dnsbl": {"sites": ["zen.spamhaus.org=127.0.0.[2..300]"]}})
    code, out, err = run(env, capsys, "show")
    assert code == 1 and out == ""
    assert err.startswith("mailsuite: [dnsbl] sites: 'zen.spamhaus.org=127.0.0.[2..300]': ")
    assert err.count("\n") == 1


def test_usage_errors(env, capsys):
    code, _, err = run(env, capsys)
    assert code == 2 and err.count("\n") == 1
    code, _, err = run(env, capsys, "reset")
    assert code == 2 and err.count("\n") == 1

"""bench/scaleout.py works: a tiny run with one and two instances on one PostgreSQL database and
one data_dir delivers every message, idles every IMAP session and prints a row per instance
count. No figure is judged here (docs/scale-out.md holds the measured ones)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.environment import require_postgresql, require_program
from tests.harness import REPO_ROOT

pytestmark = pytest.mark.external


def test_scaleout_prints_a_row_per_instance_count(tmp_path):
    require_program("smtp-source", "postfix")
    database_url = require_postgresql()
    out_json = str(tmp_path / "out.json")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "bench", "scaleout.py"),
         "--instances", "1", "2", "--messages", "20", "--sessions", "10", "12", "--users", "3",
         "--database-url", database_url, "--json", out_json],
        capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["instances", "msg/s"], result.stdout
    assert "10 IMAP sessions" in lines[0] and "12 IMAP sessions" in lines[0], lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["1", "2"], result.stdout
    with open(out_json) as f:
        rows = json.load(f)["rows"]
    assert [row["instances"] for row in rows] == [1, 2]
    for row in rows:
        assert row["msg_per_s"] > 0 and row["tracebacks"] == 0, row
        assert len(row["idle_pss_mib"]) == row["instances"], row
        assert [(s["sessions"], s["idling"]) for s in row["storms"]] == [(10, 10), (12, 12)], row
        assert all(len(s["pss_mib"]) == row["instances"] for s in row["storms"]), row

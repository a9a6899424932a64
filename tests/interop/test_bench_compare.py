"""bench/compare.py works: a tiny run against a private Postfix + Dovecot and a private mailsuite
runs every workload on both servers and prints the table and the summary line. No figure is
judged here (docs/performance.md holds the measured ones); under CI a missing Postfix, Dovecot
or imaptest fails the test."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.daemons import dovecot_unusable, postfix_unusable
from tests.environment import require_program, unavailable
from tests.interop.test_imaptest import imaptest_binary

pytestmark = pytest.mark.external

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--rounds", "1", "--messages", "200", "--smtp-messages", "40", "--clients", "5",
        "--logins", "3", "--imaptest-clients", "2", "--imaptest-secs", "2"]


def test_compare_runs_every_workload_on_both_servers(tmp_path):
    for reason in (postfix_unusable(), dovecot_unusable()):
        if reason:
            unavailable(reason)
    require_program("smtp-source", "postfix")
    require_program("doveadm", "dovecot-core")
    binary = imaptest_binary()
    out_json = str(tmp_path / "out.json")
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "bench", "compare.py"),
                             *TINY, "--imaptest", binary, "--json", out_json],
                            capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("summary: ") and " workloads at goal; worst: " in lines[-1], \
        result.stdout
    with open(out_json) as f:
        rows = {row["name"]: row for row in json.load(f)["rows"]}
    expected = {"smtp-2k", "smtp-100k", "submission", "select-first", "fetch-flags",
                "fetch-headers", "login", "idle-clients", "imaptest-default-2",
                "imaptest-logout0-2", "memory-idle", "memory-after-folders"}
    assert set(rows) == expected
    for name, row in rows.items():
        for side in ("reference", "mailsuite"):
            assert len(row["values"].get(side, [])) == 1, (name, side, row)
            assert row["values"][side][0] > 0, (name, side, row)
        # the table shows the row with both medians and a ratio
        [line] = [line for line in lines if line.startswith(name + " ")]
        assert row["ratio"] is not None and f" {row['ratio']:.2f}x " in line, line
    header = [line for line in lines if line.startswith("workload ")]
    assert header and "reference" in header[0] and "mailsuite" in header[0]

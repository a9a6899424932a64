"""Driving the `mailsuite` admin command in tests: one configuration file, and the checks every
command's test makes (success with nothing on stderr; a refusal in exactly one line). The unit
layer runs the command in process, the scenario layer as a subprocess: each supplies `run`."""
from __future__ import annotations

import os
from typing import Any

from mailsuite.directory import DirectoryStore
from tests.harness import write_toml


class AdminCommand:
    def __init__(self, base: str, database_url: str = ""):
        self.data_dir = os.path.join(base, "data")
        self.config_path = os.path.join(base, "mailsuite.toml")
        sections: dict = {"server": {"data_dir": self.data_dir,
                                     "admin_address": "admin@admin.example"}}
        if database_url:
            sections["database"] = {"url": database_url}
        write_toml(self.config_path, sections)
        self.database_url = database_url or "sqlite:///" + os.path.join(self.data_dir,
                                                                         "mailsuite.db")

    def run(self, *args: str, input: str | None = None) -> Any:
        """A result with `returncode`, `stdout` and `stderr`."""
        raise NotImplementedError

    def ok(self, *args: str, input: str | None = None) -> str:
        result = self.run(*args, input=input)
        assert result.returncode == 0, (args, result.stderr, result.stdout)
        assert result.stderr == "", (args, result.stderr)
        return result.stdout

    def refused(self, *args: str, input: str | None = None, match: str) -> str:
        """Run a command that must be refused: exit 1, one line on stderr naming the problem."""
        result = self.run(*args, input=input)
        assert result.returncode == 1, (args, result.returncode, result.stderr, result.stdout)
        assert "Traceback" not in result.stderr, result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("mailsuite: "), result.stderr
        assert match in lines[0], (match, lines[0])
        return lines[0]

    def store(self) -> DirectoryStore:
        return DirectoryStore(self.database_url)

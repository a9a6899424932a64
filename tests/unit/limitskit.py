"""Shared by the unit tests of the trust checks: a real Directory on a SQLite file with inline
pools and a fake clock, a spy that records which directory methods were called, a directory
that is down, a fake DnsClient, and the log lines emitted."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher

from mailsuite.config import Config
from mailsuite.directory import Directory, DirectoryUnavailable
from mailsuite.pools import InlinePool


def make_directory(tmp_path: Any, clock: task.Clock, db_url: str) -> Directory:
    """The Directory on `db_url` (the unit tests pass conftest's `prepared_directory` copy)."""
    config = Config()
    config.server.data_dir = str(tmp_path / "data")
    config.database.url = db_url
    pools = SimpleNamespace(db=InlinePool(), hash=InlinePool(), io=InlinePool())
    directory = Directory(config, pools, reactor=clock)
    directory.prepare()
    return directory


class Spy:
    """Passes every call on to `target` and records its name."""

    def __init__(self, target: Any):
        self._target = target
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return attr(*args, **kwargs)

        return call


class DownDirectory:
    """Every trust call fails as Directory does when the database is unreachable."""

    def __init__(self) -> None:
        self.calls = 0

    def _down(self, *args: Any) -> defer.Deferred:
        self.calls += 1
        return defer.fail(DirectoryUnavailable("database sqlite:///x: unable to open"))

    greylist_check = rate_hit = rate_counters = purge_trust = _down


HANG = object()


class FakeDns:
    """A DnsClient: answers by name from `answers` (a list of A records, an exception to fail
    with, or HANG to answer only when the test calls `fire`); unknown names are NXDOMAIN ([])."""

    def __init__(self, answers: dict[str, Any] | None = None):
        self.answers = answers or {}
        self.queries: list[tuple[str, str]] = []
        self.hanging: dict[str, list[defer.Deferred]] = {}

    def query(self, name: str, qtype: str) -> defer.Deferred:
        self.queries.append((name, qtype))
        answer = self.answers.get(name, [])
        if answer is HANG:
            d: defer.Deferred = defer.Deferred()
            self.hanging.setdefault(name, []).append(d)
            return d
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(list(answer))

    def fire(self, name: str, records: list) -> None:
        for d in self.hanging.pop(name, []):
            d.callback(records)


class LogLines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, event: dict) -> None:
        text = formatEvent(event)
        if text:
            self.lines.append(text)

    def matching(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]

    def __enter__(self) -> "LogLines":
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        globalLogPublisher.removeObserver(self)


def result_of(d: defer.Deferred) -> Any:
    """The result of a Deferred that has fired (inline pools, fakes); fails the test if not."""
    out: list = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]

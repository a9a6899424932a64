"""A WorkPool whose jobs run only when the test says so: a slow disk, or a thread pool caught
between two jobs (docs/design/testing.md, "Fakes and clocks")."""
from __future__ import annotations

from twisted.internet import defer


class ManualPool:
    def __init__(self) -> None:
        self.jobs: list[tuple] = []

    def run(self, fn, *args, **kwargs) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.jobs.append((fn, args, kwargs, d))
        return d

    def run_in_line(self, key, fn, *args, **kwargs) -> defer.Deferred:
        return self.run(fn, *args, **kwargs)  # one job at a time anyway

    def names(self) -> list[str]:
        """The functions queued, oldest first."""
        return [getattr(fn, "__name__", repr(fn)) for fn, *_ in self.jobs]

    def step(self) -> bool:
        """Run the oldest job; False when there was none."""
        if not self.jobs:
            return False
        fn, args, kwargs, d = self.jobs.pop(0)
        defer.maybeDeferred(fn, *args, **kwargs).chainDeferred(d)
        return True

    def drain(self) -> None:
        """Run jobs until none is left, including those the jobs queued."""
        while self.step():
            pass

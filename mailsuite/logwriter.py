"""The log file written off the reactor thread (docs/design/queue.md, "The mail log").

twistd writes every log line to its file as it is emitted: a format, a write() and a flush() on
the reactor thread for each of the several lines a message makes. `BufferedLogObserver` sits in
front of twistd's file observer: events are collected (from any thread) and every `interval`
seconds of the injected clock the batch goes to a writer with one thread, which formats and writes
them, so the file gets them in the order they were emitted, at most about `interval` (plus the
time of the write before) after. At stop the last batch is written and waited for; later events
(the rest of the shutdown) are written directly again, in order.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import FileLogObserver, ILogObserver, LogPublisher
from twisted.python import threadable
from zope.interface import implementer

from mailsuite.pools import WorkerPool, WorkPool

FLUSH_INTERVAL = 0.1  # seconds a line may wait before it is handed to the writer
MAX_PENDING = 10_000  # events: past this, a batch is handed over at once (bounded memory)

LogEvent = dict[str, Any]


@implementer(ILogObserver)
class BufferedLogObserver:
    """Buffers events for `wrapped` and hands them over in batches to `writer` (one thread)."""

    def __init__(self, wrapped: Callable[[LogEvent], None], clock: IReactorTime,
                 writer: WorkPool, interval: float = FLUSH_INTERVAL,
                 max_pending: int = MAX_PENDING):
        self.wrapped = wrapped
        self._clock = clock
        self._writer = writer
        self._interval = interval
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._pending: list[LogEvent] = []
        self._buffering = False
        self._loop: task.LoopingCall | None = None
        self._in_flight: defer.Deferred | None = None  # the last batch handed to the writer

    def __call__(self, event: LogEvent) -> None:
        with self._lock:
            if self._buffering:
                self._pending.append(event)
                if len(self._pending) < self._max_pending:
                    return
                over = True
            else:
                over = False
        if over:
            if threadable.isInIOThread():  # else the next tick hands them over
                self.flush()
            return
        self.wrapped(event)

    def start(self) -> None:
        with self._lock:
            self._buffering = True
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False)

    def _tick(self) -> None:
        self.flush()  # not waited for: the writer's one thread keeps the batches in order

    def flush(self) -> defer.Deferred:
        """Hand what is buffered to the writer; fires once it is written."""
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return self._in_flight if self._in_flight is not None else defer.succeed(None)
        d = self._writer.run(self._write, batch)
        d.addErrback(lambda _: None)  # the file observer reports its own failures
        self._in_flight = d

        def done(result: Any) -> Any:
            if self._in_flight is d:
                self._in_flight = None
            return result

        return d.addBoth(done)

    def _write(self, batch: list[LogEvent]) -> None:
        for event in batch:
            self.wrapped(event)

    def stop(self) -> defer.Deferred:
        """Write everything buffered, then switch back to writing each event directly."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        d = self.flush()
        return d.addBoth(lambda _: self._direct())

    def _direct(self) -> None:
        with self._lock:
            self._buffering = False
            rest, self._pending = self._pending, []
            for event in rest:  # under the lock: a direct write from another thread waits
                self.wrapped(event)


def buffer_file_observers(publisher: LogPublisher, clock: IReactorTime, writer: WorkPool,
                          interval: float = FLUSH_INTERVAL) -> list[BufferedLogObserver]:
    """Put a BufferedLogObserver in front of each file observer of `publisher` (the one twistd
    installs for --logfile); returns them, started."""
    found = []
    for observer in list(getattr(publisher, "_observers", [])):
        if isinstance(observer, FileLogObserver):
            buffered = BufferedLogObserver(observer, clock, writer, interval)
            publisher.removeObserver(observer)
            publisher.addObserver(buffered)
            buffered.start()
            found.append(buffered)
    return found


class BufferedLogging(service.MultiService):
    """Runs `inner` (the whole process) with the log file written off the reactor thread:
    buffering starts after `inner` started and ends, every line written, after it stopped."""

    def __init__(self, inner: service.IService, publisher: LogPublisher | None = None,
                 reactor: Any = None, interval: float = FLUSH_INTERVAL):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        if publisher is None:
            from twisted.logger import globalLogPublisher as publisher
        self._inner = inner
        self._publisher = publisher
        self._reactor = reactor
        self._interval = interval
        self._writer = WorkerPool("log", 1, reactor)
        self._observers: list[BufferedLogObserver] = []
        inner.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        self._observers = buffer_file_observers(self._publisher, self._reactor, self._writer,
                                                self._interval)

    def stopService(self) -> defer.Deferred:
        service.Service.stopService(self)
        d = defer.maybeDeferred(self._inner.stopService)
        d.addBoth(lambda _: defer.gatherResults([o.stop() for o in self._observers]))
        d.addBoth(lambda _: self._writer.stop())
        return d

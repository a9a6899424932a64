"""The log file written in batches (docs/design/queue.md, "The mail log").

twistd writes every log line to its file as it is emitted: a format, a write() and a flush() on
the reactor thread for each of the several lines a message makes. `BufferedLogObserver` sits in
front of twistd's file observer: events are collected (from any thread) and written together,
in the order they were emitted, either at the end of the reactor iteration (the default) or
after `interval` seconds by a writer thread of their own. At stop the last batch is written and
waited for; later events (the rest of the shutdown) are written directly again, in order.
"""
from __future__ import annotations

import re
import string
import threading
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import (FileLogObserver, ILogObserver, LogPublisher, formatTime,
                            timeFormatRFC3339)

try:  # Twisted's own pieces of formatEventAsClassicLogText, so the text stays the same
    from twisted.logger._format import _formatEvent, _formatSystem, _formatTraceback
except ImportError:  # another Twisted: `faster_text` keeps twisted's formatter
    _formatEvent = None  # type: ignore[assignment]
from twisted.python import threadable
from zope.interface import implementer

from mailsuite.pools import WorkerPool, WorkPool

FLUSH_INTERVAL = 0.0  # seconds a line may wait: 0 = until the end of this reactor iteration
MAX_PENDING = 10_000  # events: past this, a batch is handed over at once (bounded memory)

LogEvent = dict[str, Any]
# Wraps a file observer's formatEvent (e.g. to name the process in every line: workers.py).
Reformat = Callable[[Callable[[LogEvent], Any]], Callable[[LogEvent], Any]]
# The buffered observers in front of this process's log files, for `flush_all`.
_ACTIVE: list["BufferedLogObserver"] = []


def flush_all() -> defer.Deferred:
    """Hand every buffered line to the OS now (write(2), no fsync); fires once they are. The
    queue calls it before the envelope update that records a delivery, so a kill -9 cannot
    take a delivery's line with it (docs/design/queue.md, "The mail log")."""
    if not _ACTIVE:
        return defer.succeed(None)
    return defer.gatherResults([o.flush() for o in list(_ACTIVE)], consumeErrors=True)


@implementer(ILogObserver)
class BufferedLogObserver:
    """Buffers events for `wrapped` and writes them in batches: after `interval` seconds of
    `clock` (0: at the end of the current reactor iteration, before the reactor sends what
    the handlers wrote, so a line still reaches the file before the reply it goes with), on
    the calling thread, or through `writer` (a pool of one thread) when one is given."""

    def __init__(self, wrapped: Callable[[LogEvent], None], clock: IReactorTime,
                 writer: WorkPool | None = None, interval: float = FLUSH_INTERVAL,
                 max_pending: int = MAX_PENDING,
                 call_from_thread: Callable[..., Any] | None = None,
                 in_reactor_thread: Callable[[], bool] = threadable.isInIOThread):
        self.wrapped = wrapped
        self._clock = clock
        self._writer = writer
        self._interval = interval
        self._max_pending = max_pending
        self._call_from_thread = call_from_thread
        self._in_reactor_thread = in_reactor_thread
        # Re-entrant: a signal handler (twistd's "Received SIGTERM") logs on the reactor thread
        # in the middle of whatever it interrupted, a batch being written under this lock too.
        self._lock = threading.RLock()
        self._pending: list[LogEvent] = []
        self._buffering = False
        self._scheduled = False  # a flush is on the clock (or on its way there)
        self._in_flight: defer.Deferred | None = None  # the last batch handed to the writer

    def __call__(self, event: LogEvent) -> None:
        with self._lock:
            if self._buffering:
                self._pending.append(event)
                schedule = not self._scheduled
                self._scheduled = True
                over = len(self._pending) >= self._max_pending
            else:
                schedule = over = False
                self.wrapped(event)  # under the lock: after any batch being written directly
        if over and self._in_reactor_thread():
            self.flush()
        elif schedule:
            if self._in_reactor_thread() or self._call_from_thread is None:
                self._clock.callLater(self._interval, self.flush)
            else:
                self._call_from_thread(self._clock.callLater, self._interval, self.flush)

    def start(self) -> None:
        with self._lock:
            self._buffering = True

    def flush(self) -> defer.Deferred:
        """Write (or hand to the writer) what is buffered; fires once it is written."""
        with self._lock:
            batch, self._pending = self._pending, []
            self._scheduled = False
            if batch and self._writer is None:
                self._write(batch)
                return defer.succeed(None)
        if not batch:
            return self._in_flight if self._in_flight is not None else defer.succeed(None)
        assert self._writer is not None
        d = self._writer.run(self._write, batch)
        d.addErrback(lambda _: None)  # the file observer reports its own failures
        self._in_flight = d

        def done(result: Any) -> Any:
            if self._in_flight is d:
                self._in_flight = None
            return result

        return d.addBoth(done)

    def _write(self, batch: list[LogEvent]) -> None:
        out = getattr(self.wrapped, "_outFile", None)
        if not isinstance(self.wrapped, FileLogObserver) or out is None:
            for event in batch:
                self.wrapped(event)
            return
        # twistd's file observer: the same text it would write, in one write and one flush.
        text = "".join(t for t in map(self.wrapped.formatEvent, batch) if t)
        if text:
            encoding = getattr(self.wrapped, "_encoding", None)
            out.write(text if encoding is None else text.encode(encoding))
            out.flush()

    def stop(self) -> defer.Deferred:
        """Write everything buffered, then switch back to writing each event directly."""
        d = self.flush()
        return d.addBoth(lambda _: self._direct())

    def _direct(self) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        with self._lock:
            self._buffering = False
            rest, self._pending = self._pending, []
            for event in rest:  # under the lock: a direct write from another thread waits
                self.wrapped(event)


def buffer_file_observers(publisher: LogPublisher, clock: IReactorTime,
                          writer: WorkPool | None = None, interval: float = FLUSH_INTERVAL,
                          call_from_thread: Callable[..., Any] | None = None,
                          ) -> list[BufferedLogObserver]:
    """Put a BufferedLogObserver in front of each file observer of `publisher` (the one twistd
    installs for --logfile); returns them, started."""
    found = []
    for observer in list(getattr(publisher, "_observers", [])):
        if isinstance(observer, FileLogObserver):
            buffered = BufferedLogObserver(observer, clock, writer, interval,
                                           call_from_thread=call_from_thread)
            publisher.removeObserver(observer)
            publisher.addObserver(buffered)
            buffered.start()
            found.append(buffered)
            _ACTIVE.append(buffered)
    return found


def faster_text(format_event: Callable[[LogEvent], Any]) -> Callable[[LogEvent], Any]:
    """`ClassicText` in place of the formatter of twisted's `textFileLogObserver` (what twistd
    installs for its log file) when it uses the default time format; any other as it is."""
    if (_formatEvent is None or getattr(format_event, "__qualname__", "")
            != "textFileLogObserver.<locals>.formatEvent"):
        return format_event
    try:
        free = dict(zip(format_event.__code__.co_freevars,
                        (c.cell_contents for c in format_event.__closure__ or ())))
    except ValueError:  # an empty cell
        return format_event
    if free.get("timeFormat") != timeFormatRFC3339:
        return format_event
    return ClassicText()


class ClassicText:
    """The same text as twisted's `formatEventAsClassicLogText` with the RFC 3339 time
    (`<time> [<system>] <text>`, continuation lines indented by a tab), with the time prefix
    made once per second: that format has no finer field, and making it costs more than
    the rest of a line (a time zone look-up, a datetime, strftime)."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._stamp = ""
        self._formats: dict[str, list[tuple[str, str | None]]] = {}

    def __call__(self, event: LogEvent) -> str | None:
        text = self._text(event)
        if "log_failure" in event:
            text = "\n".join((text, _formatTraceback(event["log_failure"])))
        if not text:
            return None
        when = event.get("log_time")
        if when is None:
            stamp = "-"
        else:
            second = int(when // 1)
            if second != self._second:
                self._stamp, self._second = formatTime(float(second), timeFormatRFC3339), second
            stamp = self._stamp
        level = event.get("log_level")
        namespace = event.get("log_namespace")
        if "log_system" in event or level is None or type(namespace) is not str:
            system = _formatSystem(event)
        else:
            system = f"{namespace}#{level.name}"  # what _formatSystem makes of these
        line = f"{stamp} [{system}] {text}"
        return line.replace("\n", "\n\t") + "\n"

    def _text(self, event: LogEvent) -> str:
        """What twisted's _formatEvent makes of the event. A format whose fields are all plain
        names ("accepted {queue_id} from=<{sender}>", the mail log's "{text}") is parsed once
        and filled in directly: the same format(value, "") per field that str.format does,
        without string.Formatter's Python-level parsing of every line. Anything else, or any
        error, goes to twisted's formatter."""
        fmt = event.get("log_format")
        if type(fmt) is not str or "log_flattened" in event:
            return _formatEvent(event)
        pieces = self._formats.get(fmt)
        if pieces is None:
            pieces = _plain_fields(fmt)
            if len(self._formats) < MAX_FORMATS:
                self._formats[fmt] = pieces
        if not pieces:
            return _formatEvent(event)
        try:
            return "".join([literal if name is None else literal + format(event[name], "")
                            for literal, name in pieces])
        except Exception:
            return _formatEvent(event)  # says the event could not be formatted, as twisted does


# Distinct log formats ClassicText keeps parsed (the code has a few hundred).
MAX_FORMATS = 1024
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _plain_fields(fmt: str) -> list[tuple[str, str | None]]:
    """(literal text, field name or None) pieces of `fmt`, or [] when a field has a conversion,
    a format spec, an index, an attribute or a call: those go to twisted's formatter."""
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError:
        return []
    pieces: list[tuple[str, str | None]] = []
    for literal, name, spec, conversion in parsed:
        if name is not None and (spec or conversion or not _NAME.match(name)):
            return []
        pieces.append((literal, name))
    return pieces or [("", None)]


class BufferedLogging(service.MultiService):
    """Runs `inner` (the whole process) with the log file written in batches: buffering starts
    after `inner` started and ends, every line written, after it stopped. With `thread` the
    batches are written by a thread of their own, every `interval` seconds; without (the
    default) at the end of each reactor iteration, so a line is in the file before the reply
    it goes with leaves (readers of the log, tests among them, may rely on that).
    `reformat` wraps the formatter of the log file's observers from the start on (before the
    listeners bind: twistd has daemonized by then)."""

    def __init__(self, inner: service.IService, publisher: LogPublisher | None = None,
                 reactor: Any = None, interval: float = FLUSH_INTERVAL, thread: bool = False,
                 reformat: Reformat | None = None):
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
        self._reformat = reformat
        self._writer: WorkerPool | None = WorkerPool("log", 1, reactor) if thread else None
        self._observers: list[BufferedLogObserver] = []
        inner.setServiceParent(self)

    def privilegedStartService(self) -> None:
        for observer in list(getattr(self._publisher, "_observers", [])):
            if isinstance(observer, FileLogObserver):
                observer.formatEvent = faster_text(observer.formatEvent)
                if self._reformat is not None:
                    observer.formatEvent = self._reformat(observer.formatEvent)
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        self._observers = buffer_file_observers(
            self._publisher, self._reactor, self._writer, self._interval,
            call_from_thread=getattr(self._reactor, "callFromThread", None))
        if self._writer is None and self._observers:
            self._flush_before_each_poll()

    def _flush_before_each_poll(self) -> None:
        """A line emitted by a timed call is flushed by a callLater(0) only in the next
        iteration, after the poll that sends the reply it goes with; writing the batch just
        before every poll (where the reactor sends what handlers wrote) keeps the order."""
        iterate = getattr(self._reactor, "doIteration", None)
        if iterate is None:
            return
        observers = list(self._observers)

        def do_iteration(delay: Any) -> Any:
            for observer in observers:
                observer.flush()
            return iterate(delay)

        self._reactor.doIteration = do_iteration
        self._hooked = True

    def stopService(self) -> defer.Deferred:
        service.Service.stopService(self)
        if getattr(self, "_hooked", False):
            self._hooked = False
            try:
                del self._reactor.doIteration  # the class's own again
            except AttributeError:
                pass
        d = defer.maybeDeferred(self._inner.stopService)
        d.addBoth(lambda _: defer.gatherResults([o.stop() for o in self._observers]))
        if self._writer is not None:
            d.addBoth(lambda _: self._writer.stop() if self._writer is not None else None)
        return d

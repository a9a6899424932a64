"""The log file is written by a thread of its own (mailsuite/logwriter.py): lines keep their
order, reach the file within one flush interval of the (fake) clock, and none is lost at stop."""
from __future__ import annotations

import io

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import LogPublisher, textFileLogObserver

from mailsuite.logwriter import BufferedLogging, BufferedLogObserver, buffer_file_observers
from mailsuite.pools import InlinePool
from tests.unit.manualpool import ManualPool


def event(n: int) -> dict:
    return {"n": n}


def written(seen: list[dict]) -> list[int]:
    return [e["n"] for e in seen]


def reactor_thread() -> bool:
    return True


def test_nothing_is_written_on_the_emitting_thread_and_all_is_written_in_order_at_the_tick():
    seen: list[dict] = []
    clock = task.Clock()
    buffered = BufferedLogObserver(seen.append, clock, InlinePool(), interval=0.1,
                                   in_reactor_thread=reactor_thread)
    buffered.start()
    for n in range(5):
        buffered(event(n))
    clock.advance(0.05)
    assert seen == []  # not yet: the emitter (the reactor) never waits for the file
    clock.advance(0.05)
    assert written(seen) == [0, 1, 2, 3, 4]
    buffered(event(5))
    clock.advance(0.1)
    assert written(seen) == [0, 1, 2, 3, 4, 5]


def slow_writer_observer():
    """A started observer whose writer thread runs only when the test drains it."""
    seen: list[dict] = []
    clock = task.Clock()
    writer = ManualPool()
    buffered = BufferedLogObserver(seen.append, clock, writer, interval=0.1,
                                   in_reactor_thread=reactor_thread)
    buffered.start()
    return seen, clock, writer, buffered


def test_batches_keep_their_order_behind_a_slow_writer():
    seen, clock, writer, buffered = slow_writer_observer()
    buffered(event(1))
    clock.advance(0.1)
    buffered(event(2))
    clock.advance(0.1)
    assert seen == [] and len(writer.jobs) == 2
    writer.drain()
    assert written(seen) == [1, 2]


def test_stop_writes_everything_buffered_and_then_writes_directly():
    seen, clock, writer, buffered = slow_writer_observer()
    buffered(event(1))
    clock.advance(0.1)  # batch [1] is with the writer, not written yet
    buffered(event(2))
    stopped: list = []
    buffered.stop().addBoth(stopped.append)
    buffered(event(3))  # emitted during the stop: after 1 and 2
    assert stopped == [] and seen == []
    writer.drain()
    assert stopped == [None]
    assert written(seen) == [1, 2, 3]
    buffered(event(4))  # stopped: written at once, in order
    assert written(seen) == [1, 2, 3, 4]
    clock.advance(1)
    assert written(seen) == [1, 2, 3, 4]


def test_the_file_observer_twistd_installs_gets_a_buffer_in_front():
    out = io.StringIO()
    publisher = LogPublisher()
    publisher.addObserver(textFileLogObserver(out))
    clock = task.Clock()
    [buffered] = buffer_file_observers(publisher, clock, InlinePool(), interval=0.1)
    buffered._in_reactor_thread = reactor_thread
    for n in range(3):
        publisher({"log_format": "line {n}", "n": n, "log_time": 0.0, "log_system": "-"})
    assert out.getvalue() == ""
    clock.advance(0.1)
    assert [line.split("] ")[-1] for line in out.getvalue().splitlines()] == [
        "line 0", "line 1", "line 2"]
    buffered.stop()


def test_buffered_logging_flushes_after_the_inner_service_stopped():
    out = io.StringIO()
    publisher = LogPublisher()
    publisher.addObserver(textFileLogObserver(out))
    clock = task.Clock()

    class Inner(service.Service):
        def stopService(self) -> None:
            super().stopService()
            publisher({"log_format": "inner stopped", "log_time": 0.0, "log_system": "-"})

    top = BufferedLogging(Inner(), publisher=publisher, reactor=clock)
    top.startService()
    publisher({"log_format": "serving", "log_time": 0.0, "log_system": "-"})
    assert out.getvalue() == ""  # until the end of this reactor iteration
    done: list = []
    defer.maybeDeferred(top.stopService).addBoth(done.append)
    assert [line.split("] ")[-1] for line in out.getvalue().splitlines()] == [
        "serving", "inner stopped"]


def test_by_default_a_batch_is_written_on_the_reactor_at_the_end_of_the_iteration():
    """Before the reactor gets to send the reply the line goes with (a callLater(0) runs first)."""
    seen: list[dict] = []
    clock = task.Clock()
    buffered = BufferedLogObserver(seen.append, clock, in_reactor_thread=reactor_thread)
    buffered.start()
    buffered(event(1))
    buffered(event(2))
    assert seen == [] and len(clock.getDelayedCalls()) == 1  # one flush for the batch
    clock.advance(0)
    assert written(seen) == [1, 2]


def test_an_event_from_another_thread_asks_the_reactor_for_the_flush():
    seen: list[dict] = []
    clock = task.Clock()
    handed: list = []
    buffered = BufferedLogObserver(seen.append, clock, call_from_thread=lambda f, *a: handed.append(
        (f, a)), in_reactor_thread=lambda: False)
    buffered.start()
    buffered(event(1))
    assert clock.getDelayedCalls() == [] and len(handed) == 1
    f, args = handed[0]
    f(*args)  # what the reactor does with it
    clock.advance(0)
    assert written(seen) == [1]


def test_lines_are_in_the_file_before_the_reactor_polls_and_sends_replies():
    """Also a line emitted by a timed call (its callLater(0) flush would come one poll late)."""
    out = io.StringIO()
    publisher = LogPublisher()
    publisher.addObserver(textFileLogObserver(out))

    class FakeReactor(task.Clock):
        def __init__(self) -> None:
            super().__init__()
            self.seen_at_poll: list[str] = []

        def doIteration(self, delay):
            self.seen_at_poll.append(out.getvalue())

    reactor = FakeReactor()
    top = BufferedLogging(service.Service(), publisher=publisher, reactor=reactor)
    top.startService()
    publisher({"log_format": "before the reply", "log_time": 0.0, "log_system": "-"})
    reactor.doIteration(0)
    assert reactor.seen_at_poll[0].endswith("before the reply\n")
    top.stopService()
    assert "doIteration" not in vars(reactor)  # the reactor's own method again


def test_a_line_logged_while_a_batch_is_written_does_not_deadlock():
    """A signal handler logs on the reactor thread in the middle of whatever it interrupted:
    here, the formatting of a batch (a worker stopped by SIGTERM while it wrote its log)."""
    import threading

    out = io.StringIO()
    observer = textFileLogObserver(out)
    clock = task.Clock()
    buffered = BufferedLogObserver(observer, clock, in_reactor_thread=reactor_thread)
    format_event = observer.formatEvent

    def interrupted(event):
        if event.get("log_format") == "interrupted":
            buffered({"log_format": "Received SIGTERM", "log_time": 0.0, "log_system": "-"})
        return format_event(event)

    observer.formatEvent = interrupted
    buffered.start()
    buffered({"log_format": "interrupted", "log_time": 0.0, "log_system": "-"})
    writer = threading.Thread(target=buffered.flush, daemon=True)
    writer.start()
    writer.join(10)  # only a deadlock takes this long
    assert not writer.is_alive()
    clock.advance(0)
    assert out.getvalue().splitlines()[-1].endswith("Received SIGTERM")


def test_the_log_file_text_is_twisteds_with_the_time_made_once_per_second():
    from twisted.logger import LogLevel
    from twisted.python.failure import Failure

    from mailsuite.logwriter import ClassicText, faster_text

    twisted_text = textFileLogObserver(io.StringIO()).formatEvent
    fast = faster_text(twisted_text)
    assert isinstance(fast, ClassicText)
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    base = 1_790_000_000.0
    events = [
        dict(log_format="hello {x}", x=1, log_time=base + 0.2, log_namespace="a.b",
             log_level=LogLevel.info),
        dict(log_format="same second {x}", x="a\nb", log_time=base + 0.9, log_system="sys"),
        dict(log_format="next second", log_time=base + 1.0, log_namespace="n",
             log_level=LogLevel.warn),
        dict(log_format="back in time", log_time=base - 3600.5),
        dict(log_format="boom", log_failure=failure, log_time=base, log_level=LogLevel.error),
        dict(log_time=base), dict(log_format="", log_time=base), dict(log_format="no time"),
        dict(log_format="{unclosed", log_time=base),
        # The mail log's shape ("{text}"; maillog.py), taken without the formatter.
        dict(log_format="{text}", text="queue_id=Q1 status=removed", log_time=base + 0.5,
             log_namespace="mailsuite.maillog", log_level=LogLevel.info),
        dict(log_format="{text}", text="two\nlines", log_time=base, log_system="sys"),
        dict(log_format="{text}", text=7, log_time=base, log_namespace="n",
             log_level=LogLevel.info),
        dict(log_format="{text}", log_time=base, log_namespace="n", log_level=LogLevel.info),
        dict(log_format="{text}", text="", log_time=base, log_namespace=None,
             log_level=LogLevel.info),
        # Plain-name formats are filled in directly; the rest go to twisted's formatter.
        dict(log_format="accepted {queue_id} from=<{sender}> size={size} auth={auth} {{x}}",
             queue_id="Q1", sender="a@b", size=12, auth=None, log_time=base),
        dict(log_format="{x:>5}|{x!r}|{d[k]}|{d.keys}|{f()}", x="a", d={"k": 1}, f=lambda: 2,
             log_time=base),
        dict(log_format="{missing} here", log_time=base),
        dict(log_format="{}", log_time=base), dict(log_format=b"bytes {x}", x=1, log_time=base),
        dict(log_format="{level}", level=LogLevel.warn, log_time=base),
    ]
    for e in events + events:  # the second time with the formats already parsed
        assert fast(e) == twisted_text(e), e
    other = textFileLogObserver(io.StringIO(), timeFormat="%H:%M:%S.%f").formatEvent
    assert faster_text(other) is other  # a finer format than seconds: not cached


def test_twistds_file_observer_gets_the_faster_formatter_before_any_reformat():
    from mailsuite.logwriter import ClassicText

    publisher = LogPublisher()
    observer = textFileLogObserver(io.StringIO())
    publisher.addObserver(observer)
    wrapped = []

    def reformat(inner):
        wrapped.append(inner)
        return inner

    top = BufferedLogging(service.Service(), publisher=publisher, reactor=task.Clock(),
                          reformat=reformat)
    top.privilegedStartService()
    assert isinstance(wrapped[0], ClassicText)

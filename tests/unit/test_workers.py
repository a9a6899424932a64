"""Worker processes on the shared listening sockets (mailsuite/workers.py): the setting, the
descriptor plan, supervision with a fake spawner and task.Clock, the log lines, and what
make_service builds for the first process and for a worker."""
from __future__ import annotations

import io
import os

import pytest
from twisted.application import service
from twisted.internet import error, task
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogPublisher, textFileLogObserver
from twisted.python.failure import Failure

from mailsuite import workers
from mailsuite.config import AUTO_WORKERS_MAX, Config, ConfigError, load
from mailsuite.logwriter import BufferedLogging


# -- the setting and the plan ----------------------------------------------------------------

def test_one_process_per_cpu_unless_configured(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5})
    assert Config().server.workers == 0 and Config().workers == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert Config().workers == AUTO_WORKERS_MAX
    path = tmp_path / "m.toml"
    path.write_text("[server]\nworkers = 1\n")
    assert load(str(path)).workers == 1
    path.write_text("[server]\nworkers = 12\n")
    assert load(str(path)).workers == 12


@pytest.mark.parametrize("count", [-1, workers.MAX_WORKERS + 1])
def test_a_count_out_of_range_stops_start_up(count):
    config = Config()
    config.server.workers = count
    with pytest.raises(ConfigError, match=r"\[server\] workers"):
        workers.check_settings(config)


def test_the_listening_sockets_follow_stdio_in_the_worker():
    child_fds, adopt, table_fd = workers.fd_plan({"mx": 17, "imap": 12, "pop3s": 30})
    assert adopt == {"imap": 3, "mx": 4, "pop3s": 5}
    assert child_fds == {0: "w", 1: "r", 2: "r", 3: 12, 4: 17, 5: 30}
    assert table_fd is None
    argv = workers.worker_command("/etc/m.toml", adopt, 4242)
    assert argv[1:] == ["-m", "mailsuite.worker", "--parent", "4242", "--config", "/etc/m.toml",
                        "--listen", "imap=3", "--listen", "mx=4", "--listen", "pop3s=5"]


def test_the_connection_table_follows_the_sockets_with_the_workers_slot():
    child_fds, adopt, table_fd = workers.fd_plan({"mx": 17, "imap": 12}, counts=40)
    assert (adopt, table_fd) == ({"imap": 3, "mx": 4}, 5)
    assert child_fds == {0: "w", 1: "r", 2: "r", 3: 12, 4: 17, 5: 40}
    argv = workers.worker_command("", adopt, 4242, (table_fd, 2))
    assert argv[-4:] == ["--counts", "5", "--slot", "2"]


def test_a_worker_parses_its_arguments():
    from mailsuite.worker import _parse

    args = _parse(["--parent", "7", "--config", "c.toml", "--listen", "mx=3", "--listen",
                   "imaps=4"])
    assert (args.parent, args.config, args.listen) == (7, "c.toml", {"mx": 3, "imaps": 4})
    assert args.counts is None
    assert _parse(["--parent", "7", "--counts", "5", "--slot", "3"]).counts == (5, 3)
    with pytest.raises(SystemExit):
        _parse(["--parent", "7", "--listen", "mx"])
    with pytest.raises(SystemExit):
        _parse(["--parent", "7", "--counts", "5"])


def test_the_spawner_passes_the_table_and_clears_a_dead_workers_row(tmp_path):
    from mailsuite.conncount import ConnectionTable

    table = ConnectionTable.create(3, ["mx"], str(tmp_path))
    spawned = []

    class Reactor:
        def spawnProcess(self, proto, exe, argv, env, path, childFDs):
            spawned.append((argv, childFDs))
            return FakeProcess(99, proto)

    config = Config()
    spawn = workers.process_spawner(Reactor(), config, lambda: {"mx": 17}, table)
    worker_row = ConnectionTable.attach(os.dup(table.fileno()), ["mx"], 2).listener("mx")
    worker_row.add("192.0.2.1", "192.0.2.0/24", 1, 1)
    proto = workers.LogLines(None, None, publish=lambda event: None)
    process = spawn(2, proto)
    argv, child_fds = spawned[0]
    assert argv[-4:] == ["--counts", "4", "--slot", "2"]
    assert child_fds[4] == table.fileno()
    assert table.listener("mx").elsewhere("192.0.2.1", "192.0.2.0/24").ip == 1
    process.end(signal=9)
    assert table.listener("mx").elsewhere("192.0.2.1", "192.0.2.0/24").total == 0


def test_the_spawner_hands_over_copies_of_the_tls_files_and_the_configuration(tmp_path):
    """Read by the first process before twistd drops privileges; a worker (started later)
    reads the copies it inherits (docs/design/architecture.md, "Worker processes")."""
    spawned = []

    class Reactor:
        def spawnProcess(self, proto, exe, argv, env, path, childFDs):
            spawned.append((argv, childFDs))
            return FakeProcess(99, proto)

    for name, text in (("c.pem", b"CERT"), ("k.pem", b"KEY"), ("m.toml", b"[server]\n")):
        (tmp_path / name).write_bytes(text)
    config = load(str(tmp_path / "m.toml"))
    config.tls.cert, config.tls.key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    tls = workers.tls_files(config)
    spawn = workers.process_spawner(Reactor(), config, lambda: {"mx": 17}, None, tls)
    for name in ("c.pem", "k.pem", "m.toml"):
        (tmp_path / name).unlink()  # or unreadable once privileges are dropped
    spawn(1, workers.LogLines(None, None, publish=lambda event: None))
    argv, child_fds = spawned[0]
    cert_fd, key_fd = (int(n) for n in argv[argv.index("--tls-fds") + 1].split(","))
    config_fd = int(argv[argv.index("--config") + 1].removeprefix("/proc/self/fd/"))
    assert [os.pread(child_fds[fd], 100, 0) for fd in (cert_fd, key_fd, config_fd)] == [
        b"CERT", b"KEY", b"[server]\n"]
    assert len(set(child_fds)) == len(child_fds) and child_fds[3] == 17
    from mailsuite.worker import _parse

    assert _parse(argv[3:]).tls_fds == (cert_fd, key_fd)
    assert workers.tls_files(Config()) is None  # the self-signed pair: read by each worker


# -- supervision -----------------------------------------------------------------------------

class FakeProcess:
    def __init__(self, pid: int, proto):
        self.pid = pid
        self.proto = proto
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        if self.pid is None:
            raise error.ProcessExitedAlready()
        self.signals.append(name)

    def end(self, code: int | None = 0, signal: int | None = None) -> None:
        reason = error.ProcessDone(0) if code == 0 and signal is None else \
            error.ProcessTerminated(code, signal)
        self.proto.processEnded(Failure(reason))
        self.pid = None


class Spawner:
    def __init__(self, clock):
        self.clock = clock
        self.started: list[tuple[float, int, FakeProcess]] = []
        self.fail = 0

    def __call__(self, slot, proto):
        if self.fail:
            self.fail -= 1
            raise OSError("fork: Resource temporarily unavailable")
        process = FakeProcess(1000 + len(self.started), proto)
        proto.makeConnection(process)
        self.started.append((self.clock.seconds(), slot, process))
        return process

    def live(self):
        return [p for _, _, p in self.started if p.pid is not None]


def supervisor(count=2, **kwargs):
    clock = task.Clock()
    spawn = Spawner(clock)
    lines: list[dict] = []
    sup = workers.Supervisor(count, spawn, clock, publish=lines.append, **kwargs)
    return sup, spawn, clock


def test_starts_the_workers_and_restarts_one_that_dies(caplog_events):
    sup, spawn, clock = supervisor(count=2)
    sup.startService()
    assert [slot for _, slot, _ in spawn.started] == [1, 2]
    clock.advance(100)
    spawn.started[0][2].end(signal=9)
    assert len(spawn.started) == 2  # not at once: after the first delay
    clock.advance(workers.RESTART_DELAYS[0] - 0.01)
    assert len(spawn.started) == 2
    clock.advance(0.01)
    assert [slot for _, slot, _ in spawn.started] == [1, 2, 1]
    assert any("worker 1 (pid 1000) was killed by SIGKILL; restarting it in 1 s" in text
               for text in caplog_events())


def test_a_worker_dying_young_waits_longer_each_time_then_the_minute_bound():
    sup, spawn, clock = supervisor(count=1, max_starts_per_minute=4)
    sup.startService()
    delays = []
    for _ in range(5):
        spawn.live()[0].end(code=1)
        before = clock.seconds()
        while len(spawn.live()) == 0:
            clock.advance(0.5)
        delays.append(clock.seconds() - before)
    # 1, 2, 4 s doubling; the fourth start in a minute waits until the first start is a
    # minute old (t = 60: the starts were at 0, 1, 3, 7); the next one doubles again (16 s).
    assert delays[:3] == [1.0, 2.0, 4.0]
    assert spawn.started[4][0] == 60.0
    assert delays[4] == 16.0
    assert len(spawn.started) == 6


def test_a_worker_that_lived_long_is_restarted_after_the_shortest_delay_again():
    sup, spawn, clock = supervisor(count=1)
    sup.startService()
    for _ in range(3):  # dying young: 1, 2, 4
        spawn.live()[0].end(code=1)
        clock.advance(10)
    clock.advance(workers.STABLE_AFTER)
    spawn.live()[0].end(code=1)
    clock.advance(workers.RESTART_DELAYS[0])
    assert len(spawn.live()) == 1


def test_a_failed_spawn_is_tried_again_later():
    sup, spawn, clock = supervisor(count=1)
    spawn.fail = 1
    sup.startService()
    assert spawn.live() == []
    clock.advance(workers.RESTART_DELAYS[0])
    assert len(spawn.live()) == 1


def test_stop_sends_sigterm_then_sigkill_after_the_bound_and_restarts_nothing():
    sup, spawn, clock = supervisor(count=2, stop_timeout=20.0)
    sup.startService()
    first, second = spawn.live()
    first.end(code=1)  # a restart is pending when the stop comes
    done = sup.stopService()
    fired = []
    done.addCallback(fired.append)
    assert second.signals == ["TERM"] and first.signals == []
    clock.advance(19.9)
    assert second.signals == ["TERM"] and not fired
    clock.advance(0.1)
    assert second.signals == ["TERM", "KILL"] and not fired
    second.end(signal=9)
    assert fired == [None]
    clock.advance(100)
    assert len(spawn.started) == 2  # no restart after the stop


def test_stop_fires_as_soon_as_every_worker_ended_and_kills_nobody():
    sup, spawn, clock = supervisor(count=2)
    sup.startService()
    fired = []
    sup.stopService().addCallback(fired.append)
    for process in spawn.live():
        assert process.signals == ["TERM"]
        process.end(code=0)
    assert fired == [None]
    assert clock.getDelayedCalls() == []  # the SIGKILL timer is gone


# -- the log ---------------------------------------------------------------------------------

def test_a_workers_stdout_lines_are_published_whole_and_as_they_came():
    published: list[dict] = []
    ended = []

    class Sup:
        def ended(self, slot, pid, reason):
            ended.append((slot, pid))

    lines = workers.LogLines(Sup(), "slot", published.append)
    lines.makeConnection(FakeProcess(77, lines))
    lines.childDataReceived(1, b"2024 [pid=77 a] one\n2024 [pid=77 a] tw")
    lines.childDataReceived(1, b"o\n2024 [pid=77 a] thr")
    lines.childDataReceived(2, b"Traceback (most recent call last):\n")
    assert [e[workers.LINE_KEY] for e in published][:2] == ["2024 [pid=77 a] one\n",
                                                          "2024 [pid=77 a] two\n"]
    assert published[2][workers.LINE_KEY].endswith(
        " [pid=77 stderr] Traceback (most recent call last):\n")
    lines.processEnded(Failure(error.ProcessDone(0)))
    assert published[3][workers.LINE_KEY] == "2024 [pid=77 a] thr\n"
    assert ended == [("slot", 77)]


def test_a_line_without_end_is_not_held_without_bound():
    published: list[dict] = []
    lines = workers.LogLines(None, None, published.append)
    lines.childDataReceived(1, b"x" * (workers.MAX_LINE + 1))
    assert len(published) == 1


def test_every_line_of_the_file_names_the_process():
    out = io.StringIO()
    observer = textFileLogObserver(out)
    observer.formatEvent = workers.format_with_pid(observer.formatEvent, 4321)
    observer({"log_format": "listening", "log_time": 0.0, "log_system": "-"})
    observer({workers.LINE_KEY: "as the worker wrote it\n", "log_format": "x",
              "log_time": 0.0})
    first, second = out.getvalue().splitlines()
    assert first.endswith(" [pid=4321 -] listening")
    assert second == "as the worker wrote it"


def test_a_workers_log_lines_are_made_by_the_faster_formatter(monkeypatch):
    import twisted.logger._file as twisted_file

    from mailsuite.worker import log_observer

    made = []
    real = twisted_file.formatTime  # what twisted's text observer makes each line's time with
    monkeypatch.setattr(twisted_file, "formatTime",
                        lambda *a, **k: made.append(a) or real(*a, **k))
    out = io.StringIO()
    observer = log_observer(out, 4321)
    base = 1_790_000_000.0
    for i in range(5):  # twisted's own formatter makes the time again for every line
        observer({"log_format": "delivered {n}", "n": i, "log_time": base + i / 10,
                  "log_system": "-"})
    assert made == []
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and lines[4].endswith(" [pid=4321 -] delivered 4")
    twisted_text = textFileLogObserver(io.StringIO()).formatEvent(
        {"log_format": "delivered {n}", "n": 4, "log_time": base + 0.4, "log_system": "-"})
    assert lines[4] + "\n" == twisted_text.replace(" [", " [pid=4321 ", 1)

def test_buffered_logging_names_the_process_from_its_first_line():
    publisher = LogPublisher()
    out = io.StringIO()
    publisher.addObserver(textFileLogObserver(out))
    top = BufferedLogging(service.Service(), publisher=publisher, reactor=task.Clock(),
                          reformat=lambda f: workers.format_with_pid(f, 99))
    top.privilegedStartService()
    publisher({"log_format": "binding", "log_time": 0.0, "log_system": "-"})
    assert "[pid=99 -] binding" in out.getvalue()


# -- what make_service builds ----------------------------------------------------------------

def _config(tmp_path, monkeypatch, count=1) -> Config:
    monkeypatch.setattr("twisted.names.client.getResolver", lambda: None)
    config = Config()
    config.server.data_dir = str(tmp_path)
    config.server.hostname = "mx.example.org"
    config.server.workers = count
    return config


def test_the_first_process_supervises_workers_only_when_asked(tmp_path, monkeypatch):
    from mailsuite.service import make_service

    one = make_service(_config(tmp_path, monkeypatch), reactor=MemoryReactorClock())
    assert "workers" not in {s.name for s in one.getServiceNamed("front")}
    two = make_service(_config(tmp_path, monkeypatch, 3), reactor=MemoryReactorClock())
    sup = two.getServiceNamed("front").getServiceNamed("workers")
    assert isinstance(sup, workers.Supervisor) and len(sup.slots) == 2


def _factory(top, name):
    """The LimitedFactory under the listener `name` (beneath TLS when it has it)."""
    factory = top.getServiceNamed("front").getServiceNamed(f"listen-{name}").factory
    return getattr(factory, "wrappedFactory", factory)


def test_the_mail_listeners_count_in_a_table_only_with_workers(tmp_path, monkeypatch):
    from mailsuite.service import make_service

    one = make_service(_config(tmp_path, monkeypatch), reactor=MemoryReactorClock())
    assert _factory(one, "mx").shared is None
    three = make_service(_config(tmp_path, monkeypatch, 3), reactor=MemoryReactorClock())
    assert _factory(three, "mx").shared is not None
    assert _factory(three, "imaps").shared is not None
    assert _factory(three, "metrics").shared is None  # stays in the first process


def test_a_worker_counts_in_its_row_of_the_inherited_table(tmp_path, monkeypatch):
    from mailsuite.conncount import ConnectionTable
    from mailsuite.service import make_service

    first = ConnectionTable.create(2, workers.SHARED_LISTENERS, str(tmp_path))
    top = make_service(_config(tmp_path, monkeypatch, 2), reactor=MemoryReactorClock(),
                       inherited={"mx": 3}, counts=(os.dup(first.fileno()), 1))
    _factory(top, "mx").shared.add("192.0.2.1", "192.0.2.0/24", 1, 1)
    assert first.listener("mx").elsewhere("192.0.2.1", "192.0.2.0/24").total == 1


def test_a_worker_serves_only_the_sockets_it_inherited(tmp_path, monkeypatch):
    from mailsuite.service import make_service

    config = _config(tmp_path, monkeypatch, 2)
    config.reports.sender = "reports@example.org"  # the daily sender: first process only
    top = make_service(config, reactor=MemoryReactorClock(), inherited={"mx": 3, "imaps": 4})
    front = list(top.getServiceNamed("front"))
    listeners = {s.name[7:]: s for s in front if s.name and s.name.startswith("listen-")}
    assert sorted(listeners) == ["imaps", "mx"]
    assert all(isinstance(s, workers.AdoptedListener) for s in listeners.values())
    assert listeners["mx"].fd == 3
    assert not any(isinstance(s, workers.Supervisor) for s in front)
    from mailsuite.reports.sender import ReportService

    assert not any(isinstance(s, ReportService) for s in front)


@pytest.fixture
def caplog_events():
    """The text of every log event emitted while the test runs."""
    from twisted.logger import formatEvent, globalLogPublisher

    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield lambda: [formatEvent(e) for e in seen]
    globalLogPublisher.removeObserver(seen.append)


def test_worker_listeners_are_smtp_unless_configured(tmp_path):
    assert Config().server.worker_listeners == ["mx", "submission", "submissions"]
    config = Config()
    config.server.worker_listeners = ["mx", "imaps", "metrics"]
    with pytest.raises(ConfigError, match=r"worker_listeners: 'metrics'"):
        workers.check_settings(config)


"""Several processes serving the same listening sockets ([server] workers; docs/design/
architecture.md, "Worker processes").

The first process (`twistd mailsuite`) binds every listener as always, then starts workers - 1
copies of itself (`python -m mailsuite.worker`, mailsuite/worker.py) that inherit the mail
listeners' sockets as file descriptors 3, 4, ... and adopt them; the kernel hands each new
connection to whichever process accepts first. Each worker builds the rest of the service on its
own (pools, queue runner, caches), as a separate instance on the same data_dir would
(docs/scale-out.md), except the connection counts: every process has a row of one shared
table (mailsuite/conncount.py), inherited after the sockets, so the limits count the whole
server. The first process supervises them: it restarts one that dies, stops them when it stops,
and writes their log lines into its own log.
"""
from __future__ import annotations

import collections
import ctypes
import os
import signal
import socket
import sys
import time
from typing import Any, Callable, Protocol

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IReactorTime
from twisted.logger import LogLevel, Logger, globalLogPublisher

from mailsuite.config import Config, ConfigError
from mailsuite.conncount import ConnectionTable

log = Logger()

# The listeners workers share. The HTTP ones (metrics, admin, autoconfig) stay in the first
# process: /metrics is served by one process, which gathers the workers' figures
# (mailsuite/metrics_gather.py), not by a random one of them.
SHARED_LISTENERS = ("mx", "submission", "submissions", "imap", "imaps", "pop3", "pop3s")
MAX_WORKERS = 64
FIRST_INHERITED_FD = 3  # after stdin, stdout and stderr

# A worker that lived this long before it died is restarted after the shortest delay again.
STABLE_AFTER = 60.0
RESTART_DELAYS = (1.0, 30.0)  # seconds: first delay, doubling up to the second
MAX_STARTS_PER_MINUTE = 5  # per worker slot; beyond, the next start waits for the window
STOP_TIMEOUT = 20.0  # seconds from SIGTERM to SIGKILL when the first process stops

# The key of a log event that carries a line a worker already formatted (see LogLines).
LINE_KEY = "mailsuite_worker_line"
MAX_LINE = 64 * 1024  # octets of a worker's line held before it is written as it is


def check_settings(config: Config) -> None:
    workers = config.server.workers
    if not 0 <= workers <= MAX_WORKERS:
        raise ConfigError(f"[server] workers = {workers}: give 1 to {MAX_WORKERS} processes, "
                          "or 0 for one per CPU")
    for name in config.server.worker_listeners:
        if name not in SHARED_LISTENERS:
            raise ConfigError(f"[server] worker_listeners: {name!r} is not one of "
                              f"{', '.join(SHARED_LISTENERS)}")


class ProcessHandle(Protocol):
    """What the supervisor uses of a spawned process (Twisted's IProcessTransport)."""

    pid: int | None

    def signalProcess(self, signal: str) -> None: ...


# spawn(slot, process protocol) -> the process; the protocol hears of its output and its end.
Spawner = Callable[[int, protocol.ProcessProtocol], ProcessHandle]


# -- the first process: which descriptors go where -----------------------------------------

def fd_plan(listening: dict[str, int], counts: int | None = None
            ) -> tuple[dict[int, Any], dict[str, int], int | None]:
    """Map the first process's listening descriptors (name -> fd), and the connection table's
    descriptor `counts` if there is one, to the worker's descriptors: (childFDs for
    reactor.spawnProcess, name -> the descriptor the worker adopts, the table's descriptor in
    the worker, right after the sockets)."""
    child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}  # stdin: a pipe we never write to
    adopt: dict[str, int] = {}
    for n, name in enumerate(sorted(listening)):
        child_fds[FIRST_INHERITED_FD + n] = listening[name]
        adopt[name] = FIRST_INHERITED_FD + n
    if counts is None:
        return child_fds, adopt, None
    return child_fds, adopt, _pass_on(child_fds, counts)


def _pass_on(child_fds: dict[int, Any], fd: int) -> int:
    """Give the worker `fd` at its next free descriptor; returns that descriptor."""
    n = max(child_fds) + 1
    child_fds[n] = fd
    return n


def worker_command(config_path: str, adopt: dict[str, int], parent_pid: int,
                   counts: tuple[int, int] | None = None,
                   tls: tuple[int, int] | None = None) -> list[str]:
    """The worker's command line; `counts`: (the table's descriptor in the worker, its slot);
    `tls`: the descriptors of the certificate and key the first process read (tls_files)."""
    argv = [sys.executable, "-m", "mailsuite.worker", "--parent", str(parent_pid)]
    if config_path:
        argv += ["--config", config_path]
    for name, fd in sorted(adopt.items()):
        argv += ["--listen", f"{name}={fd}"]
    if counts is not None:
        argv += ["--counts", str(counts[0]), "--slot", str(counts[1])]
    if tls is not None:
        argv += ["--tls-fds", f"{tls[0]},{tls[1]}"]
    return argv


def tls_files(config: Config) -> tuple[int, int] | None:
    """The configured certificate and key, read now (before twistd drops privileges: a
    root-only key, such as Let's Encrypt's, is readable only now) into two memory files the
    workers inherit (docs/design/architecture.md, "Worker processes"); None for the
    self-signed pair in data_dir, which the workers read themselves."""
    if not (config.tls.cert and config.tls.key):
        return None
    return memory_copy(config.tls.cert, "mailsuite-tls-cert"), memory_copy(config.tls.key,
                                                                            "mailsuite-tls-key")


def memory_copy(path: str, name: str) -> int:
    """A memory file (memfd) holding what `path` holds now, for workers to inherit."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    with open(path, "rb") as f:
        os.pwrite(fd, f.read(), 0)
    return fd


def process_spawner(reactor: Any, config: Config, listening: Callable[[], dict[str, int]],
                    table: ConnectionTable | None = None,
                    tls: tuple[int, int] | None = None) -> Spawner:
    """Start workers with `reactor.spawnProcess`: this Python, this environment (PYTHONPATH
    included) and working directory, the listening sockets (`listening()`: name -> descriptor,
    asked once they are bound) at descriptors 3, 4, ..., then the connection `table`'s, whose
    row `slot` the worker takes, then the TLS certificate's and key's (`tls_files`), then a
    copy of the configuration file: both read now, while the first process may still read
    files only root may (twistd drops privileges after the service is made)."""
    config_copy = memory_copy(config.path, "mailsuite-config") if config.path else None

    def spawn(slot: int, proto: protocol.ProcessProtocol) -> ProcessHandle:
        child_fds, adopt, table_fd = fd_plan(listening(),
                                             table.fileno() if table is not None else None)
        child_tls = None if tls is None else (_pass_on(child_fds, tls[0]),
                                              _pass_on(child_fds, tls[1]))
        config_path = ("" if config_copy is None
                       else f"/proc/self/fd/{_pass_on(child_fds, config_copy)}")
        argv = worker_command(config_path, adopt, os.getpid(),
                              (table_fd, slot) if table_fd is not None else None, child_tls)
        if table is not None:
            _clear_row_when_ended(proto, table, slot)
        return reactor.spawnProcess(proto, argv[0], argv, env=dict(os.environ),
                                    path=os.getcwd(), childFDs=child_fds)

    return spawn


def _clear_row_when_ended(proto: protocol.ProcessProtocol, table: ConnectionTable,
                          slot: int) -> None:
    """A dead worker's connections are gone: its row stops counting them at once rather than
    when its successor starts (seconds later, or a minute when it keeps dying)."""
    ended = proto.processEnded

    def process_ended(reason: Any) -> None:
        table.clear(slot)
        ended(reason)

    proto.processEnded = process_ended  # type: ignore[method-assign]


# -- the first process: supervision --------------------------------------------------------

class _Slot:
    def __init__(self, index: int):
        self.index = index
        self.process: ProcessHandle | None = None
        self.started_at = 0.0
        self.starts: collections.deque[float] = collections.deque()
        self.delay = 0.0  # the last restart delay, doubled while the worker keeps dying young
        self.pending: Any = None  # the DelayedCall of a restart


class Supervisor(service.Service):
    """Keeps `count` worker processes running while the service runs.

    A worker that ends while we run is restarted after a delay that doubles while it keeps
    dying young (RESTART_DELAYS), and at most MAX_STARTS_PER_MINUTE times a minute per slot.
    stopService sends SIGTERM to every worker and fires once all have ended; one still there
    after `stop_timeout` seconds gets SIGKILL."""

    name = "workers"

    def __init__(self, count: int, spawn: Spawner, clock: IReactorTime,
                 stop_timeout: float = STOP_TIMEOUT, max_starts_per_minute: int =
                 MAX_STARTS_PER_MINUTE, publish: Callable[[dict], None] | None = None):
        self.slots = [_Slot(i + 1) for i in range(count)]
        self._spawn = spawn
        self._clock = clock
        self._stop_timeout = stop_timeout
        self._max_starts = max_starts_per_minute
        self._publish = publish
        self._stopped: defer.Deferred | None = None

    def startService(self) -> None:
        super().startService()
        for slot in self.slots:
            self._start(slot)

    def pids(self) -> list[int]:
        return [s.process.pid for s in self.slots if s.process is not None and s.process.pid]

    def _start(self, slot: _Slot) -> None:
        slot.pending = None
        if not self.running:
            return
        now = self._clock.seconds()
        slot.starts.append(now)
        slot.started_at = now
        try:
            slot.process = self._spawn(slot.index, LogLines(self, slot, self._publish))
        except Exception as e:  # fork failed (EAGAIN, ENOMEM): try again later
            log.error("cannot start worker {index}: {error}", index=slot.index, error=e)
            slot.process = None
            self._schedule(slot)
            return
        log.info("started worker {index} (pid {pid})", index=slot.index, pid=slot.process.pid)

    def ended(self, slot: _Slot, pid: int | None, reason: Any) -> None:
        """The process of `slot` has ended (its protocol's processEnded)."""
        slot.process = None
        how = _describe_end(reason)
        if not self.running:
            log.info("worker {index} (pid {pid}) stopped: {how}", index=slot.index, pid=pid,
                     how=how)
            self._check_stopped()
            return
        delay = self._schedule(slot)
        log.error("worker {index} (pid {pid}) {how}; restarting it in {delay:.0f} s",
                  index=slot.index, pid=pid, how=how, delay=delay)

    def _schedule(self, slot: _Slot) -> float:
        now = self._clock.seconds()
        low, high = RESTART_DELAYS
        lived = now - slot.started_at
        slot.delay = low if lived >= STABLE_AFTER or not slot.delay else min(slot.delay * 2,
                                                                               high)
        delay = slot.delay
        while slot.starts and slot.starts[0] <= now - 60.0:
            slot.starts.popleft()
        if len(slot.starts) >= self._max_starts:  # the bound per minute
            delay = max(delay, slot.starts[0] + 60.0 - now)
        slot.pending = self._clock.callLater(delay, self._start, slot)
        return delay

    def stopService(self) -> defer.Deferred:
        super().stopService()
        for slot in self.slots:
            if slot.pending is not None and slot.pending.active():
                slot.pending.cancel()
            slot.pending = None
        self._stopped = defer.Deferred()
        self._signal_all("TERM")
        killer = self._clock.callLater(self._stop_timeout, self._kill_rest)

        def all_ended(result: Any) -> Any:
            if killer.active():
                killer.cancel()
            return result

        d = self._stopped.addBoth(all_ended)
        self._check_stopped()
        return d

    def _kill_rest(self) -> None:
        left = self.pids()
        if left:
            log.warn("workers {pids} still running {timeout:.0f} s after SIGTERM: killing them",
                     pids=left, timeout=self._stop_timeout)
            self._signal_all("KILL")

    def _signal_all(self, name: str) -> None:
        for slot in self.slots:
            if slot.process is not None:
                try:
                    slot.process.signalProcess(name)
                except (error.ProcessExitedAlready, OSError):
                    pass

    def _check_stopped(self) -> None:
        if self._stopped is not None and not self._stopped.called and not self.pids():
            self._stopped.callback(None)


def _describe_end(reason: Any) -> str:
    value = getattr(reason, "value", reason)
    sig = getattr(value, "signal", None)
    code = getattr(value, "exitCode", None)
    if sig:
        try:
            return f"was killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"was killed by signal {sig}"
    return f"exited with status {code}"


# -- the first process: a worker's output into our log -------------------------------------

class LogLines(protocol.ProcessProtocol):
    """A worker's stdout carries its log, formatted and tagged with its pid (tag_with_pid):
    each whole line is published as it is, for the log file observer to write (with
    `format_with_pid` it writes LINE_KEY verbatim). Whatever it writes to stderr (a crash
    before its log started) is tagged here."""

    def __init__(self, supervisor: Supervisor | None, slot: Any,
                 publish: Callable[[dict], None] | None = None):
        self.supervisor = supervisor
        self.slot = slot
        self.publish = publish if publish is not None else globalLogPublisher
        self._partial = {1: b"", 2: b""}
        self.pid: int | None = None

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd not in self._partial:
            return
        text = self._partial[fd] + data
        *lines, rest = text.split(b"\n")
        if len(rest) > MAX_LINE:
            lines.append(rest)
            rest = b""
        self._partial[fd] = rest
        for line in lines:
            self._line(fd, line.decode("utf-8", "replace"))

    def _line(self, fd: int, line: str) -> None:
        if fd == 2:
            line = f"{_now()} [pid={self.pid} stderr] {line}"
        self.publish({LINE_KEY: line + "\n", "log_format": "{" + LINE_KEY + "}",
                      "log_level": LogLevel.info, "log_namespace": __name__,
                      "log_time": time.time()})

    def processEnded(self, reason: Any) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self._line(fd, rest.decode("utf-8", "replace"))
        self._partial = {1: b"", 2: b""}
        if self.supervisor is not None:
            self.supervisor.ended(self.slot, self.pid, reason)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# -- every process with workers: which process wrote a line --------------------------------

def format_with_pid(format_event: Callable[[dict], str | None], pid: int
                    ) -> Callable[[dict], str | None]:
    """A log file's formatter whose lines name the process: "<time> [pid=N system] text".
    A worker's line relayed by LogLines is already tagged, and written as it came."""
    tag = f" [pid={pid} "

    def formatted(event: dict) -> str | None:
        line = event.get(LINE_KEY)
        if line is not None:
            return line
        text = format_event(event)
        return text.replace(" [", tag, 1) if text else text

    return formatted


# -- a worker: the inherited sockets --------------------------------------------------------

class AdoptedListener(service.Service):
    """A listener on a socket inherited as descriptor `fd` (a worker's counterpart of
    service.py's _Listener)."""

    def __init__(self, name: str, fd: int, factory: Any, reactor: Any):
        self.setName(f"listen-{name}")
        self.fd = fd
        self.factory = factory
        self._reactor = reactor
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        with socket.socket(fileno=os.dup(self.fd)) as s:  # the family the first process bound
            family = s.family
        self.port = self._reactor.adoptStreamPort(self.fd, family, self.factory)
        os.close(self.fd)  # the port holds a duplicate of it
        log.info("serving {name} on the listening socket of the first process",
                 name=self.name[7:])

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


PR_SET_PDEATHSIG = 1


def stop_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> bool:
    """Have the kernel send `sig` to this process when its parent ends (Linux prctl); False
    when the parent `parent_pid` is gone already (then nothing would ever send it)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the stdin pipe (see mailsuite/worker.py) still tells us
    return os.getppid() == parent_pid

"""/metrics of a server with [server] workers > 1: every process's figures, merged
(docs/design/metrics.md, "Worker processes").

Each worker serves its registry on a Unix socket of its own (`WorkerFigures`): on connect it
writes the registry's families (JSON, `encode`) and closes. For each scrape the first process
collects its own registry, asks every live worker with a short timeout (`WorkerGatherer`), and
merges the answers (`merge`): counters, histograms and the per-process gauges are summed, the
figures every process reads from the shared spool are the same thing seen N times and take the
max. A worker that does not answer is left out and counted in `mailsuite_processes`.

The sockets: `<data_dir>/run/metrics-<host>-<first pid>/<worker pid>.sock`, directories 0700;
when that is longer than a socket address holds, a directory of ours in the temporary
directory (`socket_dir`).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import tempfile
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsuite.mailbox.dotlock import pid_alive

log = Logger()

ANSWER_TIMEOUT = 1.0  # seconds for a worker to connect and give its figures
MAX_ANSWER = 16 * 1024 * 1024  # octets; a busy process's figures are about 80 KiB
SUN_PATH_MAX = 107  # octets of a socket's path (sockaddr_un.sun_path, less the final NUL)
PID_DIGITS = 7  # Linux pids are below 2**22 (pid_max)

# Figures every process reads from the one shared spool: N processes see the same queue, so
# the whole server's figure is the largest of them, not their sum.
SAME_IN_EVERY_PROCESS = frozenset({"mailsuite_queue_entries",
                                   "mailsuite_queue_oldest_entry_age_seconds"})
# Families whose `<name>_created` sample is the creation time of a counted series.
CREATED_IN = frozenset({"counter", "histogram", "summary"})


def attach(metrics: Any, front: service.MultiService, config: Any, reactor: Any,
           worker: bool) -> None:
    """Add this process's part to `front` (service.make_service, [server] workers > 1 and a
    metrics listener): a worker serves its figures, the first process gathers them."""
    if worker:
        WorkerFigures(metrics.registry, config.data_dir, reactor).setServiceParent(front)
        return
    gatherer = WorkerGatherer(metrics.registry, lambda: front.getServiceNamed("workers").pids(),
                              config.workers, config.data_dir, reactor)
    gatherer.setServiceParent(front)
    metrics.gatherer = gatherer


# -- what a process's figures are, and how they add up ------------------------------------------

def encode(registry: Any) -> bytes:
    """The registry's families as JSON: [[name, help, type, unit, [[sample, labels, value]]]].
    (Parsing the text exposition costs 15 ms per busy page, 31 ms OpenMetrics; this, 1 ms.)"""
    return json.dumps([[f.name, f.documentation, f.type, f.unit,
                        [[s.name, s.labels, s.value] for s in f.samples]]
                       for f in registry.collect()]).encode()


def decode(data: bytes) -> list[Metric]:
    """`encode`'s families back; ValueError or TypeError when `data` is not such a text."""
    families = []
    given = json.loads(data)
    if not isinstance(given, list):
        raise ValueError("not a list of families")
    for name, documentation, kind, unit, samples in given:
        family = Metric(str(name), str(documentation), str(kind), str(unit))
        for sample_name, labels, value in samples:
            family.add_sample(str(sample_name), {str(k): str(v) for k, v in dict(labels).items()},
                              float(value))
        families.append(family)
    return families


def merge(processes: Iterable[Iterable[Metric]]) -> list[Metric]:
    """One family per name, with one sample per sample name and label set, in the order first
    seen: summed, except the figures SAME_IN_EVERY_PROCESS and the creation times of counted
    series (`_created`), which take the max (the latest restart of any process: the sum
    restarted then)."""
    merged: dict[str, tuple[Metric, dict[tuple, list]]] = {}
    for families in processes:
        for family in families:
            if family.name not in merged:
                merged[family.name] = (Metric(family.name, family.documentation, family.type,
                                              family.unit), {})
            samples = merged[family.name][1]
            largest = _takes_max(family)
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                seen = samples.get(key)
                if seen is None:
                    samples[key] = [s.name, s.labels, s.value]
                else:
                    seen[2] = max(seen[2], s.value) if largest(s.name) else seen[2] + s.value
    result = []
    for family, samples in merged.values():
        for name, labels, value in samples.values():
            family.add_sample(name, labels, value)
        result.append(family)
    return result


def _takes_max(family: Metric) -> Callable[[str], bool]:
    if family.name in SAME_IN_EVERY_PROCESS:
        return lambda name: True
    created = family.name + "_created" if family.type in CREATED_IN else None
    return lambda name: name == created


def processes_family(answered: int, missing: int) -> Metric:
    family = GaugeMetricFamily("mailsuite_processes",
                               "Processes whose figures this page adds up, by state: answered, "
                               "or missing (a worker that did not answer, or is restarting)",
                               labels=["state"])
    family.add_metric(["answered"], answered)
    family.add_metric(["missing"], missing)
    return family


# -- where the sockets are ------------------------------------------------------------------------

def socket_dir(data_dir: str, first_pid: int) -> str:
    """The directory of the sockets of the first process `first_pid`'s workers: in data_dir
    (named after this host too: data_dir may be shared by several, docs/scale-out.md), or in
    the temporary directory when a socket's path there would be too long for its address."""
    directory = os.path.join(data_dir, "run", f"metrics-{socket.gethostname()}-{first_pid}")
    if len(os.fsencode(socket_path(directory, 10 ** PID_DIGITS - 1))) <= SUN_PATH_MAX:
        return directory
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"mailsuite-{os.geteuid()}",
                        f"metrics-{digest}-{first_pid}")


def socket_path(directory: str, pid: int) -> str:
    return os.path.join(directory, f"{pid}.sock")


def _private_dir(path: str) -> None:
    """`path` and its parent made if missing: directories of ours, mode 0700 (the parent may be
    in the temporary directory, which anyone can write)."""
    for directory in (os.path.dirname(path), path):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(errno.EPERM, "not a directory of this user", directory)
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(directory, 0o700)


# -- a worker: its figures on its socket --------------------------------------------------------

class WorkerFigures(service.Service):
    """Serves `encode(registry)` to whoever connects to this worker's socket (only the first
    process can: the directory is 0700). The first process is our parent."""

    def __init__(self, registry: CollectorRegistry, data_dir: str, reactor: Any):
        self.registry = registry
        self.data_dir = data_dir
        self._reactor = reactor
        self.path = ""
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        self.path = socket_path(socket_dir(self.data_dir, os.getppid()), os.getpid())
        factory = protocol.Factory.forProtocol(_Answer)
        factory.registry = self.registry  # type: ignore[attr-defined]
        try:
            _private_dir(os.path.dirname(self.path))
            if os.path.lexists(self.path):  # left by an earlier process with our pid
                os.unlink(self.path)
            self.port = self._reactor.listenUNIX(self.path, factory, mode=0o600)
        except (OSError, CannotListenError) as e:
            log.error("cannot serve this worker's metrics on {path}: {error}; /metrics will "
                      "count it as missing", path=self.path, error=e)

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()  # removes the socket's file
        return None


class _Answer(protocol.Protocol):
    def connectionMade(self) -> None:
        self.transport.write(encode(self.factory.registry))
        self.transport.loseConnection()


# -- the first process: asking every worker -----------------------------------------------------

class WorkerGatherer(service.Service):
    """Gathers the figures of this process and of its live workers (`pids()`) for one scrape.
    `expected`: the number of processes [server] workers asks for. `endpoint(path)` connects to
    a worker's socket (tests pass a fake)."""

    def __init__(self, registry: CollectorRegistry, pids: Callable[[], list[int]],
                 expected: int, data_dir: str, reactor: Any, timeout: float = ANSWER_TIMEOUT,
                 endpoint: Callable[[str], IStreamClientEndpoint] | None = None):
        self.registry = registry
        self._pids = pids
        self.expected = expected
        self.data_dir = data_dir
        self._reactor = reactor
        self.timeout = timeout
        self._endpoint = endpoint or (lambda path: UNIXClientEndpoint(reactor, path, timeout))
        self.directory = ""

    def startService(self) -> None:
        super().startService()
        # Our pid now: twistd forks to become a daemon after make_service.
        self.directory = socket_dir(self.data_dir, os.getpid())
        _remove_dead(self.directory)
        # Once the workers have ended (the service's stop waits for them): each removes its
        # own socket as it stops, and would fail to if the directory went first.
        self._reactor.addSystemEventTrigger("after", "shutdown", shutil.rmtree, self.directory,
                                            ignore_errors=True)

    def gather(self) -> defer.Deferred:
        """Fires with the merged families (never errbacks for a worker's failure). Our own are
        read now, on the reactor thread that owns the state they read."""
        own = list(self.registry.collect())
        directory = self.directory or socket_dir(self.data_dir, os.getpid())
        asked = [self._ask(pid, socket_path(directory, pid)) for pid in self._pids()]
        d = defer.gatherResults(asked)
        d.addCallback(self._merged, own)
        return d

    def _ask(self, pid: int, path: str) -> defer.Deferred:
        reading = _WholeAnswer()
        d = connectProtocol(self._endpoint(path), reading)
        d.addCallback(lambda _: reading.done)
        d.addTimeout(self.timeout, self._reactor)
        d.addCallback(decode)
        d.addErrback(self._missing, pid)
        return d

    def _missing(self, failure: Failure, pid: int) -> None:
        log.warn("worker pid {pid} gave no metrics: {error}", pid=pid,
                 error=failure.getErrorMessage() or failure.type.__name__)
        return None

    def _merged(self, answers: list[list[Metric] | None], own: list[Metric]) -> list[Metric]:
        answered = [families for families in answers if families is not None]
        count = 1 + len(answered)
        return [*merge([own, *answered]),
                processes_family(count, max(self.expected - count, 0))]


class _WholeAnswer(protocol.Protocol):
    """Reads until the worker closes; `done` fires with what it wrote. Cancelling `done`
    aborts the connection."""

    def __init__(self) -> None:
        self.done: defer.Deferred = defer.Deferred(lambda _: self._abort())
        self._chunks: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > MAX_ANSWER:
            self._finish(Failure(ValueError(f"more than {MAX_ANSWER} octets")))
            self._abort()
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._finish(b"".join(self._chunks) if reason.check(ConnectionDone) else reason)

    def _finish(self, result: Any) -> None:
        if not self.done.called:
            self._chunks = []
            if isinstance(result, Failure):
                self.done.errback(result)
            else:
                self.done.callback(result)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()


def _remove_dead(directory: str) -> None:
    """Remove the socket directories of this host's first processes that are gone (a kill -9
    leaves one behind): the siblings of `directory` named like it with another pid."""
    parent, name = os.path.split(directory)
    prefix = name.rpartition("-")[0] + "-"
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for other in names:
        pid = other[len(prefix):]
        if (other != name and other.startswith(prefix) and pid.isdigit()
                and not pid_alive(int(pid))):
            shutil.rmtree(os.path.join(parent, other), ignore_errors=True)


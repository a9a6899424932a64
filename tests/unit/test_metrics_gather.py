"""/metrics with worker processes, in memory (docs/design/metrics.md, "Worker processes"): the
merge of several processes' figures, the gatherer with workers that answer and one that does
not (task.Clock, fake endpoints), the page that waits for them, the worker's socket, and what
make_service adds with workers and without."""
from __future__ import annotations

import os
import socket

import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from mailsuite import metrics_gather
from mailsuite.metrics import Metrics, _Families, server_factory
from mailsuite.metrics_gather import (SUN_PATH_MAX, WorkerFigures, WorkerGatherer, decode,
                                      encode, merge, socket_dir, socket_path)


class FakeQueue:
    def __init__(self, count: int, oldest: float | None):
        self.count, self.oldest = count, oldest

    def backlog(self) -> tuple[int, float | None]:
        return self.count, self.oldest


def process(clock: task.Clock, accepted: int, queued: int, commands: dict[str, list[float]],
            logins: int = 0) -> Metrics:
    """The Metrics of one process that accepted `accepted` messages and sees `queued` entries
    in the shared spool, the oldest made at time 0."""
    metrics = Metrics()
    for _ in range(accepted):
        metrics.message_accepted(1000, "ESMTPS")
    for _ in range(logins):
        metrics.auth("imap", "success")
    for command, seconds in commands.items():
        for s in seconds:
            metrics.imap_command(command.encode(), s)
    metrics.watch_queue(FakeQueue(queued, 0.0 if queued else None), clock)
    return metrics


def sample(families, name: str, **labels: str) -> float | None:
    for family in families:
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


# -- the merge ------------------------------------------------------------------------------------

def test_counts_are_summed_and_the_shared_queue_is_seen_once():
    clock = task.Clock()
    clock.advance(30)
    first = process(clock, accepted=3, queued=5, commands={"SELECT": [0.002, 0.2]})
    worker = process(clock, accepted=4, queued=5, commands={"SELECT": [0.002], "FETCH": [3.0]},
                     logins=2)
    merged = merge([list(first.registry.collect()), decode(encode(worker.registry))])

    assert sample(merged, "mailsuite_messages_accepted_total", origin="smtp", tls="yes") == 7
    assert sample(merged, "mailsuite_messages_accepted_bytes_total", origin="smtp") == 7000
    assert sample(merged, "mailsuite_auth_total", protocol="imap", outcome="success") == 2
    # The spool both processes read: the same 5 entries, 30 s old, not 10 entries and 60 s.
    assert sample(merged, "mailsuite_queue_entries") == 5
    assert sample(merged, "mailsuite_queue_oldest_entry_age_seconds") == 30
    # Histograms: every bucket, the count and the sum add up.
    name = "mailsuite_imap_command_duration_seconds"
    assert sample(merged, name + "_count", command="SELECT") == 3
    assert sample(merged, name + "_sum", command="SELECT") == pytest.approx(0.204)
    assert sample(merged, name + "_bucket", command="SELECT", le="0.005") == 2
    assert sample(merged, name + "_bucket", command="SELECT", le="0.5") == 3
    # A label set only one process has is kept, whole.
    assert sample(merged, name + "_count", command="FETCH") == 1
    assert sample(merged, name + "_bucket", command="FETCH", le="+Inf") == 1
    assert sample(merged, name + "_bucket", command="FETCH", le="2.5") == 0


def test_creation_times_take_the_latest():
    clock = task.Clock()
    first, worker = process(clock, 1, 0, {}), process(clock, 1, 0, {})
    theirs = decode(encode(worker.registry))
    for family in theirs:
        family.samples = [s._replace(value=s.value + 100) if s.name.endswith("_created") else s
                          for s in family.samples]
    own = list(first.registry.collect())
    merged = merge([own, theirs])
    created = sample(own, "mailsuite_messages_accepted_created", origin="smtp", tls="yes")
    assert sample(merged, "mailsuite_messages_accepted_created", origin="smtp",
                  tls="yes") == sample(theirs, "mailsuite_messages_accepted_created",
                                       origin="smtp", tls="yes") > created


@pytest.mark.parametrize("encoder", [generate_latest, openmetrics_latest])
def test_one_process_merged_reads_as_that_process(encoder):
    """Names, HELP, TYPE, labels and their order: what the page of one process says, in both
    formats, whether the figures came from the registry or over a worker's socket."""
    clock = task.Clock()
    metrics = process(clock, 2, 1, {"SELECT": [0.1], "LOGIN": [0.01]}, logins=1)
    alone = encoder(metrics.registry)
    assert encoder(_Families(merge([list(metrics.registry.collect())]))) == alone
    assert encoder(_Families(merge([decode(encode(metrics.registry))]))) == alone


def test_a_family_only_a_worker_has_is_kept():
    clock = task.Clock()
    first, worker = process(clock, 0, 0, {}), process(clock, 0, 0, {})
    theirs = decode(encode(worker.registry))
    extra = [f for f in theirs if f.name == "mailsuite_queue_entries"][0]
    extra.name = "mailsuite_only_here"
    extra.samples = [extra.samples[0]._replace(name="mailsuite_only_here", value=3.0)]
    merged = merge([list(first.registry.collect()), theirs])
    assert sample(merged, "mailsuite_only_here") == 3


def test_decode_refuses_what_is_not_figures():
    for bad in (b"# HELP x\n", b"{}", b"[[1]]", b'[["a", "b", "counter", "", [[1, 2]]]]',
                b'[["a", "b", "counter", "", [["a_total", 1, 2]]]]'):
        with pytest.raises((ValueError, TypeError)):
            decode(bad)


# -- the gatherer ---------------------------------------------------------------------------------

class Answering:
    """An endpoint whose worker writes `data` and closes."""

    def __init__(self, data: bytes):
        self.data = data

    def connect(self, factory) -> defer.Deferred:
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        proto.dataReceived(self.data)
        proto.connectionLost(Failure(ConnectionDone()))
        return defer.succeed(proto)


class Silent:
    """An endpoint whose worker accepts the connection and never writes (stopped, busy)."""

    def __init__(self):
        self.transport = StringTransport()
        self.aborted = False

    def connect(self, factory) -> defer.Deferred:
        proto = factory.buildProtocol(None)
        self.transport.abortConnection = self._abort
        proto.makeConnection(self.transport)
        self.proto = proto
        return defer.succeed(proto)

    def _abort(self):
        self.aborted = True
        self.proto.connectionLost(Failure(ConnectionDone()))


class Unreachable:
    """An endpoint whose connection attempt never completes."""

    def __init__(self):
        self.cancelled = False

    def connect(self, factory) -> defer.Deferred:
        return defer.Deferred(lambda d: setattr(self, "cancelled", True))


def gatherer(tmp_path, clock, own: Metrics, endpoints: dict[int, object],
             expected: int) -> WorkerGatherer:
    paths = {socket_path(socket_dir(str(tmp_path), os.getpid()), pid): e
             for pid, e in endpoints.items()}
    return WorkerGatherer(own.registry, lambda: list(endpoints), expected, str(tmp_path), clock,
                          endpoint=paths.__getitem__)


def test_a_worker_that_does_not_answer_is_left_out_after_the_timeout(tmp_path):
    clock = task.Clock()
    own = process(clock, 1, 2, {})
    answering = process(clock, 5, 2, {})
    silent, unreachable = Silent(), Unreachable()
    g = gatherer(tmp_path, clock, own, {101: Answering(encode(answering.registry)),
                                        102: silent, 103: unreachable}, expected=4)
    got = []
    g.gather().addCallback(got.append)
    clock.advance(0.99)
    assert got == []
    clock.advance(0.01)
    merged = got[0]
    assert silent.aborted and unreachable.cancelled
    assert sample(merged, "mailsuite_messages_accepted_total", origin="smtp", tls="yes") == 6
    assert sample(merged, "mailsuite_queue_entries") == 2
    assert sample(merged, "mailsuite_processes", state="answered") == 2
    assert sample(merged, "mailsuite_processes", state="missing") == 2
    assert clock.getDelayedCalls() == []


def test_a_worker_that_answers_garbage_or_too_much_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics_gather, "MAX_ANSWER", 10)
    clock = task.Clock()
    own = process(clock, 1, 0, {})
    g = gatherer(tmp_path, clock, own, {201: Answering(b"not json"),
                                        202: Answering(b"[" + b" " * 20 + b"]")}, expected=3)
    got = []
    g.gather().addCallback(got.append)
    assert sample(got[0], "mailsuite_processes", state="answered") == 1
    assert sample(got[0], "mailsuite_processes", state="missing") == 2
    assert sample(got[0], "mailsuite_messages_accepted_total", origin="smtp", tls="yes") == 1


def test_with_every_worker_answering_nothing_waits(tmp_path):
    clock = task.Clock()
    own, other = process(clock, 1, 0, {}), process(clock, 2, 0, {})
    g = gatherer(tmp_path, clock, own, {301: Answering(encode(other.registry))}, expected=2)
    got = []
    g.gather().addCallback(got.append)
    assert sample(got[0], "mailsuite_messages_accepted_total", origin="smtp", tls="yes") == 3
    assert sample(got[0], "mailsuite_processes", state="missing") == 0
    assert clock.getDelayedCalls() == []


# -- the page -------------------------------------------------------------------------------------

def test_the_page_answers_once_the_workers_have(tmp_path):
    clock = task.Clock()
    own, other = process(clock, 1, 0, {}), process(clock, 2, 0, {})
    silent = Silent()
    own.gatherer = gatherer(tmp_path, clock, own, {401: Answering(encode(other.registry)),
                                                   402: silent}, expected=3)
    factory = server_factory(own, clock)
    factory.doStart()
    try:
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
                                    hostAddress=IPv4Address("TCP", "127.0.0.1", 9425))
        proto = factory.buildProtocol(transport.getPeer())
        proto.makeConnection(transport)
        proto.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert transport.value() == b""  # the reactor is free while the worker is silent
        clock.advance(1)
        answer = transport.value()
    finally:
        factory.doStop()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Content-Type: text/plain; version=0.0.4" in head
    assert b"Content-Length: %d" % len(body) in head
    assert b'mailsuite_messages_accepted_total{origin="smtp",tls="yes"} 3.0' in body
    assert b'mailsuite_processes{state="missing"} 1.0' in body


# -- the worker's socket, and where it is ---------------------------------------------------------

def test_a_worker_serves_its_figures_on_its_socket_and_closes(tmp_path):
    reactor = MemoryReactorClock()
    metrics = process(task.Clock(), 3, 0, {})
    figures = WorkerFigures(metrics.registry, str(tmp_path), reactor)
    figures.startService()
    try:
        ((path, factory, _, mode, _),) = reactor.unixServers
        directory = socket_dir(str(tmp_path), os.getppid())
        assert path == os.path.join(directory, f"{os.getpid()}.sock")
        assert os.path.dirname(directory) == os.path.join(str(tmp_path), "run")
        assert mode == 0o600 and os.stat(directory).st_mode & 0o777 == 0o700
        transport = StringTransport()
        factory.buildProtocol(None).makeConnection(transport)
        assert transport.disconnecting
        assert decode(transport.value())[0].name == list(metrics.registry.collect())[0].name
        assert sample(decode(transport.value()), "mailsuite_messages_accepted_total",
                      origin="smtp", tls="yes") == 3
    finally:
        figures.stopService()


def test_a_long_data_dir_puts_the_sockets_in_the_temporary_directory(tmp_path):
    data_dir = str(tmp_path / ("d" * 100))
    directory = socket_dir(data_dir, 4194303)
    assert not directory.startswith(data_dir)
    assert len(os.fsencode(socket_path(directory, 4194303))) <= SUN_PATH_MAX
    assert socket_dir(data_dir, 4194303) == directory  # the same in every process
    assert socket_dir(data_dir + "x", 4194303) != directory
    assert socket_dir(str(tmp_path), 12) == os.path.join(
        str(tmp_path), "run", f"metrics-{socket.gethostname()}-12")


def test_the_first_process_removes_the_directories_of_first_processes_gone(tmp_path):
    own = socket_dir(str(tmp_path), os.getpid())
    gone = socket_dir(str(tmp_path), _a_free_pid())
    other_host = os.path.join(str(tmp_path), "run", f"metrics-elsewhere-{_a_free_pid()}")
    for directory in (own, gone, other_host):
        os.makedirs(directory)
    reactor = MemoryReactorClock()
    g = WorkerGatherer(Metrics().registry, list, 2, str(tmp_path), reactor)
    g.startService()
    assert os.path.isdir(own) and os.path.isdir(other_host) and not os.path.exists(gone)
    g.stopService()
    assert os.path.isdir(own)  # the workers may still be stopping
    for f, args, kwargs in reactor.triggers["after"]["shutdown"]:
        f(*args, **kwargs)
    assert not os.path.exists(own)


def _a_free_pid() -> int:
    return next(p for p in range(4194303, 0, -1) if not os.path.exists(f"/proc/{p}"))


# -- what make_service adds -----------------------------------------------------------------------

@pytest.mark.parametrize("workers, inherited, expected", [
    (1, None, None), (2, None, WorkerGatherer), (2, {"mx": 3}, WorkerFigures)])
def test_make_service_adds_the_gatherer_or_the_figures(tmp_path, monkeypatch, workers, inherited,
                                                       expected):
    from mailsuite.config import Config
    from mailsuite.service import make_service

    monkeypatch.setattr("twisted.names.client.getResolver", lambda: None)
    config = Config()
    config.server.data_dir = str(tmp_path)
    config.server.hostname = "mx.example.org"
    config.server.workers = workers
    front = make_service(config, reactor=MemoryReactorClock(),
                         inherited=inherited).getServiceNamed("front")
    found = [s for s in front if isinstance(s, (WorkerGatherer, WorkerFigures))]
    assert [type(s) for s in found] == ([expected] if expected else [])
    metrics_page = [s for s in front if s.name == "listen-metrics"]
    if inherited is None:
        page = metrics_page[0].factory.site.resource
        assert page.metrics.gatherer is (found[0] if expected else None)
    else:
        assert metrics_page == []  # the first process serves /metrics

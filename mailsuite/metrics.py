"""Prometheus metrics of one process (docs/design/metrics.md lists every metric and label).

`Metrics` owns a `CollectorRegistry` of its own (never prometheus-client's global one): service.py
makes one per process and hands it to the parts that count; a part built without one (a unit
test) makes its own, so tests never share counts.

Two kinds of figures:
- events counted where they happen, on the reactor thread or in an io job: SMTP replies, logins,
  IMAP command durations, Maildir writes; and, from the mail log (`MailLogCounter`, an observer
  of the `mailsuite.maillog` events), messages accepted, delivery outcomes and delays, outbound
  TLS;
- figures that parts already keep, read only when Prometheus scrapes (`watch_*`): connections
  and sessions per listener, the queue's length and oldest entry, thread-pool backlogs, the login
  cache. Counting them costs nothing on the hot path.

Every label value comes from a fixed set (listener names, reply reasons written in the code,
IMAP command names of the state table): never an address, a host name or a client's input.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import ILogObserver, LogPublisher, Logger, globalLogPublisher
from twisted.web import resource, server
from zope.interface import implementer

AUTH_PROTOCOLS = ("smtp", "imap", "pop3")
AUTH_OUTCOMES = ("success", "failure", "tempfail")
MAILDIR_SOURCES = ("delivery", "append")
DELIVERY_STATUSES = ("sent", "deferred", "bounced")
# From a local write of a few ms to the five days of the default [queue] max_age.
DELAY_BUCKETS = (0.05, 0.25, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400)
IMAP_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10, 60, 300, 1800)
MAILLOG_NAMESPACE = "mailsuite.maillog"
MAX_CHILDREN = 1000  # label combinations whose child metric is kept at hand (Metrics._child)

log = Logger()


class Metrics:
    """The counters of one process, and the figures read at scrape time."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._children: dict[tuple, Any] = {}  # label values -> child (`_child`)
        self._smtp_replies = Counter(
            "mailsuite_smtp_replies", "SMTP replies sent, by listener, code class and reason",
            ["listener", "code_class", "reason"], registry=r)
        self._auth = Counter(
            "mailsuite_auth", "Login attempts, by protocol and outcome",
            ["protocol", "outcome"], registry=r)
        self._imap_commands = Histogram(
            "mailsuite_imap_command_duration_seconds",
            "Time from reading an IMAP command to its tagged reply, by command",
            ["command"], buckets=IMAP_BUCKETS, registry=r)
        self._maildir_writes = Counter(
            "mailsuite_maildir_writes", "Messages written into a Maildir, by source",
            ["source"], registry=r)
        self._accepted = Counter(
            "mailsuite_messages_accepted",
            "Messages accepted into the queue (fsynced), by origin and TLS on the way in",
            ["origin", "tls"], registry=r)
        self._accepted_bytes = Counter(
            "mailsuite_messages_accepted_bytes", "Size of the messages accepted into the queue",
            ["origin"], registry=r)
        self._deliveries = Counter(
            "mailsuite_deliveries", "Delivery attempts per recipient, by kind and outcome",
            ["kind", "status"], registry=r)
        self._delay = Histogram(
            "mailsuite_delivery_delay_seconds",
            "Time from acceptance to the final outcome of a recipient, by kind and outcome",
            ["kind", "status"], buckets=DELAY_BUCKETS, registry=r)
        self._outbound = Counter(
            "mailsuite_outbound_transactions", "Outbound SMTP transactions, by TLS use",
            ["tls"], registry=r)
        # Known label sets start at 0, so that rate() and increase() see their first event.
        for protocol in AUTH_PROTOCOLS:
            for outcome in AUTH_OUTCOMES:
                self._auth.labels(protocol, outcome)
        for source in MAILDIR_SOURCES:
            self._maildir_writes.labels(source)
        for origin in ("smtp", "dsn"):
            self._accepted_bytes.labels(origin)
            for tls in ("yes", "no"):
                self._accepted.labels(origin, tls)
        for kind in ("local", "remote"):
            for status in DELIVERY_STATUSES:
                self._deliveries.labels(kind, status)
        for tls in ("yes", "no"):
            self._outbound.labels(tls)
        self._watched = _ScrapeTime()
        r.register(self._watched)
        from mailsuite.imap.server import COMMANDS  # (imap imports this module's users)

        # IMAP commands of the state table get a label of their own; any other is "other".
        self._imap_names = frozenset(name for names in COMMANDS.values() for name in names)
        self._imap_children: dict[bytes, Any] = {}
        # The first process with [server] workers > 1: what gathers every process's figures
        # for /metrics (metrics_gather.py); None, and /metrics is this registry alone.
        self.gatherer: Gatherer | None = None

    # -- events ----------------------------------------------------------------------------------
    def smtp_reply(self, listener: str, code: int, reason: str) -> None:
        """One SMTP reply; `reason` is the reply's own (smtp/replies.py), "" for none."""
        child = self._children.get((listener, code, reason))
        if child is None:
            code_class = f"{code // 100}xx" if 200 <= code < 600 else "other"
            child = self._smtp_replies.labels(
                listener, code_class, reason or ("ok" if code < 400 else "other"))
            self._remember((listener, code, reason), child)
        child.inc()

    def auth(self, protocol: str, outcome: str) -> None:
        """A login by password: "success", "failure" (wrong credentials) or "tempfail"."""
        self._auth.labels(protocol, outcome).inc()

    def imap_command(self, name: bytes, seconds: float) -> None:
        child = self._imap_children.get(name)
        if child is None:
            command = name.decode("ascii", "replace").upper()
            if command not in self._imap_names:
                command = "other"
            child = self._imap_commands.labels(command)
            if len(self._imap_children) < 256:  # a command's labelled child, found once
                self._imap_children[name] = child
        child.observe(max(seconds, 0.0))

    def maildir_writes(self, source: str, count: int = 1) -> None:
        """Messages written into a Maildir: "delivery" (local delivery) or "append" (IMAP)."""
        self._child(self._maildir_writes, source).inc(count)

    def message_accepted(self, size: int, protocol: str) -> None:
        """A message is in the queue. `protocol` is the RFC 3848 name ("ESMTPSA", ...) or "DSN"
        for a notification we made ourselves; the "S" after "ESMTP" means TLS."""
        origin = "dsn" if protocol == "DSN" else "smtp"
        tls = "yes" if protocol.upper().startswith("ESMTPS") else "no"
        self._child(self._accepted, origin, tls).inc()
        self._child(self._accepted_bytes, origin).inc(max(size, 0))

    def delivery(self, local: bool, status: str, delay: float) -> None:
        """One delivery attempt for one recipient, `delay` seconds after acceptance."""
        kind = "local" if local else "remote"
        if status not in DELIVERY_STATUSES:
            return
        self._child(self._deliveries, kind, status).inc()
        if status != "deferred":
            self._child(self._delay, kind, status).observe(max(delay, 0.0))
            if local and status == "sent":
                self.maildir_writes("delivery")

    def outbound_transaction(self, tls: bool) -> None:
        self._outbound.labels("yes" if tls else "no").inc()

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: prometheus_client's look-up takes a lock
        and checks every value, several times per message."""
        child = self._children.get((metric, *labels))
        if child is None:
            child = metric.labels(*labels)
            self._remember((metric, *labels), child)
        return child

    def _remember(self, key: tuple, child: Any) -> None:
        if len(self._children) >= MAX_CHILDREN:  # label values from outside: stay bounded
            self._children.clear()
        self._children[key] = child

    # -- figures read at scrape time -------------------------------------------------------------
    def watch_listener(self, factory: "CountingListener") -> None:
        self._watched.listeners.append(factory)

    def watch_pools(self, pools: Iterable["CountingPool"]) -> None:
        self._watched.pools.extend(pools)

    def watch_queue(self, queue: "QueueView", clock: Any) -> None:
        self._watched.queue = (queue, clock)

    def watch_login_cache(self, cache: Any) -> None:
        """Anything with `hits` and `misses` counts (directory/logincache.py)."""
        self._watched.login_cache = cache


class Gatherer(Protocol):
    def gather(self) -> defer.Deferred:
        """Fires with the families of every process, merged (metrics_gather.WorkerGatherer)."""
        ...


class CountingListener(Protocol):
    """What listeners.LimitedFactory keeps about its connections."""

    name: str
    admitted: int
    refusals: int
    evictions: int
    logins: int
    sessions: int

    @property
    def open_connections(self) -> int:
        ...


class CountingPool(Protocol):
    """What pools.WorkerPool tells about its work."""

    name: str
    jobs: int

    def backlog(self) -> int:
        ...

    def busy(self) -> int:
        ...


class QueueView(Protocol):
    def backlog(self) -> tuple[int, float | None]:
        """(entries known to be in the spool, creation time of the oldest or None)"""
        ...


class _ScrapeTime:
    """A collector of figures other parts keep, read on the reactor thread at each scrape."""

    def __init__(self) -> None:
        self.listeners: list[CountingListener] = []
        self.pools: list[CountingPool] = []
        self.queue: tuple[QueueView, Any] | None = None
        self.login_cache: Any = None

    def describe(self) -> list[Metric]:
        return []  # names are not known before the parts are watched

    def collect(self) -> Iterator[Metric]:
        yield from self._listeners()
        yield from self._pools()
        if self.queue is not None:
            queue, clock = self.queue
            count, oldest = queue.backlog()
            yield GaugeMetricFamily("mailsuite_queue_entries",
                                    "Entries in the queue as this process last saw the spool",
                                    value=count)
            age = 0.0 if oldest is None else max(clock.seconds() - oldest, 0.0)
            yield GaugeMetricFamily("mailsuite_queue_oldest_entry_age_seconds",
                                    "Age of the oldest entry in the queue (0 when empty)",
                                    value=age)
        cache = self.login_cache
        if cache is not None:
            yield CounterMetricFamily("mailsuite_login_cache_hits",
                                      "Logins answered from the login cache", value=cache.hits)
            yield CounterMetricFamily("mailsuite_login_cache_misses",
                                      "Logins the login cache could not answer (verified by the "
                                      "password hash)", value=cache.misses)

    def _listeners(self) -> Iterator[Metric]:
        families = [
            (CounterMetricFamily, "mailsuite_connections",
             "Connections admitted, by listener", lambda f: f.admitted),
            (CounterMetricFamily, "mailsuite_connections_refused",
             "Connections refused over a connection limit, by listener", lambda f: f.refusals),
            (CounterMetricFamily, "mailsuite_connections_evicted",
             "Idle connections closed to make room, by listener", lambda f: f.evictions),
            (GaugeMetricFamily, "mailsuite_connections_open",
             "Connections open now, by listener", lambda f: f.open_connections),
            (CounterMetricFamily, "mailsuite_sessions",
             "Sessions that logged in, by listener", lambda f: f.logins),
            (GaugeMetricFamily, "mailsuite_sessions_open",
             "Logged-in sessions open now, by listener", lambda f: f.sessions),
        ]
        for kind, name, text, value in families:
            yield _labelled(kind, name, text, "listener",
                            ((f.name, value(f)) for f in self.listeners))

    def _pools(self) -> Iterator[Metric]:
        families: list[tuple[type, str, str, Callable[[CountingPool], int]]] = [
            (CounterMetricFamily, "mailsuite_pool_jobs", "Jobs given to a thread pool",
             lambda p: p.jobs),
            (GaugeMetricFamily, "mailsuite_pool_queued_jobs",
             "Jobs waiting for a free thread of the pool", lambda p: p.backlog()),
            (GaugeMetricFamily, "mailsuite_pool_busy_threads",
             "Threads of the pool running a job", lambda p: p.busy()),
        ]
        for kind, name, text, value in families:
            yield _labelled(kind, name, text, "pool", ((p.name, value(p)) for p in self.pools))


def _labelled(kind: type, name: str, text: str, label: str,
              values: Iterable[tuple[str, float]]) -> Metric:
    family = kind(name, text, labels=[label])
    for label_value, value in values:
        family.add_metric([label_value], value)
    return family


@implementer(ILogObserver)
class MailLogCounter(Service):
    """Counts what the mail log records (mailsuite/maillog.py): each of its events carries
    `maillog_event` and the fields below. Observes `publisher` while the service runs."""

    def __init__(self, metrics: Metrics, publisher: LogPublisher | None = None):
        self.metrics = metrics
        self.publisher = publisher if publisher is not None else globalLogPublisher

    def startService(self) -> None:
        super().startService()
        self.publisher.addObserver(self)

    def stopService(self) -> None:
        super().stopService()
        self.publisher.removeObserver(self)

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("maillog_event")
        if kind is None or event.get("log_namespace") != MAILLOG_NAMESPACE:
            return
        m = self.metrics
        if kind == "received":
            m.message_accepted(event["size"], event["protocol"])
        elif kind == "attempt":
            m.delivery(event["local"], event["status"], event["delay"])
        elif kind == "transaction":
            m.outbound_transaction(event["tls"])


class MetricsPage(resource.Resource):
    """GET /metrics: the registry in the Prometheus text format (or OpenMetrics, when asked);
    every other path is 404, every other method 405.

    Rendered on the reactor thread: the scrape-time figures read state the reactor thread
    owns, and rendering is a few milliseconds of CPU once per scrape interval
    (docs/design/metrics.md, "Cost"). With workers (`metrics.gatherer`), the page waits for
    their figures without blocking the reactor, then renders them merged with ours.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics):
        super().__init__()
        self.metrics = metrics
        self.registry = metrics.registry

    def render(self, request: server.Request) -> Any:
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"Allow", b"GET, HEAD")
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"method not allowed\n"
        if request.path != b"/metrics":
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"not found; metrics are at /metrics\n"
        encoder, content_type = choose_encoder(
            (request.getHeader(b"accept") or b"").decode("latin-1"))
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        gatherer = self.metrics.gatherer
        if gatherer is None:
            return encoder(self.registry)
        gone: list[Any] = []
        request.notifyFinish().addErrback(gone.append)
        d = gatherer.gather()
        d.addCallback(lambda families: encoder(_Families(families)))
        d.addCallback(_answer, request, gone)
        d.addErrback(_failed, request, gone)
        return server.NOT_DONE_YET


class _Families:
    """Merged families, as the encoders want a registry: something with collect()."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def _answer(body: bytes, request: server.Request, gone: list[Any]) -> None:
    if gone:  # the client went away while the workers answered
        return
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()


def _failed(failure: Any, request: server.Request, gone: list[Any]) -> None:
    log.failure("cannot render /metrics", failure)
    if gone:
        return
    request.setResponseCode(500)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    _answer(b"cannot render the metrics; see the log\n", request, gone)


def server_factory(metrics: Metrics, clock: Any) -> Any:
    """The `[listen] metrics` listener: MetricsPage behind the bounds of our HTTP listeners
    (mailsuite/autoconfig/web.py: connections, request size and time)."""
    from mailsuite.autoconfig.web import http_factory

    return http_factory("metrics", MetricsPage(metrics), clock)

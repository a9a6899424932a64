"""Builds the twisted.application service tree of one mailsuite process from a Config.

This is the composition root: it creates the shared objects (thread pools, directory, mailbox
store, queue, TLS material) and hands each part the ones it uses, as typed arguments.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailsuite.config import Config, ConfigError
from mailsuite.listeners import FileBudget, limit, raise_open_files_limit
from mailsuite.metrics import MailLogCounter, Metrics
from mailsuite.pools import Pools
from mailsuite.proxyproto import ProxyProtocolFactory, trusted_networks
from mailsuite.proxyproto import check_settings as check_proxy_settings
from mailsuite.tls import TLSMaterial, load_or_create

if TYPE_CHECKING:
    from mailsuite.directory.api import Directory
    from mailsuite.mailbox.store import MailStore
    from mailsuite.queue.runner import QueueRunner

log = Logger()


@dataclass
class Parts:
    """The shared objects of one process. Only this module holds them together: every part gets
    the ones it uses as explicit, typed arguments (see the `_build_*` functions below)."""

    config: Config
    pools: Pools
    tls: TLSMaterial
    directory: "Directory"
    mailstore: "MailStore"
    queue: "QueueRunner"
    reactor: IReactorTime
    # The one resolver of the process (courier MX look-ups, trust checks, Received: names)
    # and the caching DNS client over it that the trust checks use (docs/design/trust.md).
    resolver: Any = None
    dns: Any = None
    srs: Any = None
    # The descriptors all listeners share (docs/design/limits.md); service.py hands it to every
    # listener's factory through `listeners.limit`, so the `_build_*` functions need not.
    budget: FileBudget | None = None
    # The store pool as IMAP and POP3 see it: a job that meets a busy folder lock waits on the
    # reactor, not in a pool thread (mailbox/waits.py, a LockWaitingPool over pools.mailbox).
    mailbox_io: Any = None
    # The process's counters (docs/design/metrics.md): handed to the parts that count, served
    # by the `metrics` listener.
    metrics: Metrics = field(default_factory=Metrics)
    # Change notifications between sessions and instances (mailsuite/notify.py).
    changes: Any = None
    # Notes DMARC outcomes and outbound TLS sessions for the reports we send; None when
    # [reports] sender is empty (docs/design/reports.md).
    reports: Any = None
    # Message events and statistics (docs/design/events.md); None when [events] keeps nothing.
    events: Any = None


# -- one builder per listener: what each protocol receives ------------------------------------

def _build_smtp(parts: Parts, policy: str, implicit_tls: bool = False) -> Any:
    from mailsuite import smtp
    from mailsuite.smtp.policy import POLICIES

    if policy not in POLICIES:
        raise ValueError(f"unknown SMTP policy {policy!r}")
    # DATA streams into the queue's incoming directory: what a crashed process left there goes
    # now, before we receive anything (other live processes on the spool keep theirs).
    spool = parts.queue.spool
    try:
        spool.ensure()
        _give_to_data_dir_owner(parts.config, [spool.ensure_incoming()])  # started as root
        for name in spool.clean_incoming():
            log.info("removed {name}, a message left half-received by a previous run", name=name)
    except OSError as e:
        raise ConfigError(f"cannot prepare {spool.incoming_dir}: {e.strerror}")
    return smtp.server_factory(config=parts.config,
                               policy=POLICIES[policy](parts.directory, parts.config,
                                                       srs=parts.srs),
                               queue=parts.queue, directory=parts.directory, tls=parts.tls,
                               clock=parts.reactor, resolver=parts.resolver,
                               implicit_tls=implicit_tls, io=parts.pools.io,
                               gate=_build_gate(parts, policy), metrics=parts.metrics,
                               on_refusal=parts.events.refused if parts.events else None)


def _build_gate(parts: Parts, listener: str) -> Any:
    """The trust checks of one SMTP listener (docs/design/trust.md): sender authentication,
    DNSBL and greylisting on MX only; rates and content engines as configured."""
    from mailsuite.trust.clamd import ClamdScanner
    from mailsuite.trust.dnsbl import DNSBL
    from mailsuite.trust.gate import Gate
    from mailsuite.trust.greylist import Greylist
    from mailsuite.trust.ratelimit import RateLimits
    from mailsuite.trust.rspamd import RspamdScanner

    config, reactor = parts.config, parts.reactor
    mx = listener == "mx"
    scanners: list[Any] = []
    if config.rspamd.url:
        rspamd = RspamdScanner(config.rspamd, reactor, config.hostname, parts.pools.io)
        reactor.addSystemEventTrigger("before", "shutdown", rspamd.close)  # type: ignore
        scanners.append(rspamd)
    if config.clamd.socket:
        scanners.append(ClamdScanner(config.clamd, reactor, parts.pools.io))
    return Gate(config, listener, reactor=reactor, work=parts.pools.trust, dns=parts.dns,
                ratelimits=RateLimits(parts.directory, config.ratelimit, reactor),
                greylist=(Greylist(parts.directory, config.greylist, reactor,
                                   config.ratelimit.exempt_networks)
                          if mx and config.greylist.enabled else None),
                dnsbl=DNSBL(parts.dns, config.dnsbl, reactor) if mx and config.dnsbl.sites
                else None,
                scanners=scanners, reports=parts.reports if mx else None)


def _build_imap(parts: Parts, implicit_tls: bool = False) -> Any:
    from mailsuite import imap

    return imap.server_factory(parts.config, parts.directory, parts.mailstore, parts.mailbox_io,
                               parts.tls, parts.reactor, implicit_tls=implicit_tls,
                               metrics=parts.metrics, changes=parts.changes)


def _build_pop3(parts: Parts, implicit_tls: bool = False) -> Any:
    from mailsuite import pop3

    return pop3.server_factory(parts.config, parts.directory, parts.mailstore, parts.mailbox_io,
                               parts.tls, parts.reactor, implicit_tls=implicit_tls,
                               metrics=parts.metrics, changes=parts.changes)


def _build_autoconfig(parts: Parts) -> Any:
    from mailsuite import autoconfig

    return autoconfig.server_factory(parts.config, parts.directory, parts.reactor)


def _build_metrics(parts: Parts) -> Any:
    from mailsuite import metrics

    return metrics.server_factory(parts.metrics, parts.reactor)


def _build_admin(parts: Parts) -> Any:
    from mailsuite import dashboard
    from mailsuite.dashboard.sources import from_directory

    # Statistics, message events and DMARC/TLS reports: the stores of mailsuite.events and
    # mailsuite.reports on the directory's database.
    return dashboard.server_factory(parts.config.hostname, parts.directory, parts.pools,
                                    parts.queue.spool, parts.reactor,
                                    from_directory(parts.directory.store))


# listen-key -> (builder, its keyword arguments, implicit TLS?)
LISTENERS: dict[str, tuple[Callable[..., Any], dict[str, Any], bool]] = {
    "mx": (_build_smtp, {"policy": "mx"}, False),
    "submission": (_build_smtp, {"policy": "submission"}, False),
    "submissions": (_build_smtp, {"policy": "submission", "implicit_tls": True}, True),
    "imap": (_build_imap, {}, False),
    "imaps": (_build_imap, {"implicit_tls": True}, True),
    "pop3": (_build_pop3, {}, False),
    "pop3s": (_build_pop3, {"implicit_tls": True}, True),
    "autoconfig": (_build_autoconfig, {}, False),
    "metrics": (_build_metrics, {}, False),
    "admin": (_build_admin, {}, True),  # HTTPS only
}


# -- the delivery path: queue, local and remote agents, notifications --------------------------

def _build_queue(config: Config, pools: Pools, directory: "Directory", mailstore: "MailStore",
                 reactor: IReactorTime, resolver: Any = None, srs: Any = None,
                 reports: Any = None) -> "QueueRunner":
    """The spool and its runner, with the local and remote agents and the DSN notifier."""
    from mailsuite import courier
    from mailsuite.courier.agent import RemoteAgent
    from mailsuite.courier.dkim import Signer
    from mailsuite.courier.notifier import Notifier
    from mailsuite.delivery.local import LocalAgent
    from mailsuite.queue.runner import QueueRunner
    from mailsuite.queue.spool import Spool

    from mailsuite.courier.mx import MXResolver
    from mailsuite.trust.forwarding import Forwarder

    courier.check_settings(config.courier)
    remote = RemoteAgent(config.courier, config.hostname, reactor=reactor,  # type: ignore[arg-type]
                         clock=reactor, io=pools.io,
                         signer=Signer(config.dkim_dir) if config.dkim.sign else None,
                         resolver=MXResolver(resolver) if resolver is not None else None,
                         forwarder=Forwarder(srs, config.dkim_dir,
                                             config.trust.authserv_id or config.hostname)
                         if srs is not None else None, reports=reports)
    reactor.addSystemEventTrigger("before", "shutdown", remote.close)  # type: ignore[attr-defined]
    return QueueRunner(
        Spool(config.queue_dir), config.queue, io=pools.io, clock=reactor,
        local=LocalAgent(mailstore, pools.io, config.hostname),
        remote=remote,
        notifier=Notifier(directory, pools.io, config.hostname, float(config.queue.max_age)))


def build_parts(config: Config, reactor: IReactorTime | None = None) -> Parts:
    """Create data directories, certificate, database schema and the shared objects."""
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor  # type: ignore[assignment]
    from mailsuite.directory import Directory
    from mailsuite.mailbox.dotlock import LockRules
    from mailsuite.mailbox.store import MailStore
    from mailsuite.mailbox.waits import LockWaitingPool

    try:
        for path in (config.data_dir, config.mail_dir, config.queue_dir):
            os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create data directory {e.filename}: {e.strerror}")
    tls = load_or_create(config)  # reads the key now, while we may still be root
    created = [config.mail_dir, config.queue_dir]
    if os.path.dirname(tls.cert_path) == config.tls_dir:  # the self-signed pair is ours too
        created += [config.tls_dir, tls.cert_path, tls.key_path]
    _give_to_data_dir_owner(config, created)
    if tls.generated:
        log.info("created a self-signed TLS certificate: {cert} (key {key}); set [tls] cert/key "
                 "to use your own", cert=tls.cert_path, key=tls.key_path)
    soft, hard = raise_open_files_limit()
    budget = FileBudget.from_limits(config.limits, soft)
    log.info("open files limit {soft} (hard {hard}): {total} for connections, {per} per "
             "listener at most", soft=soft, hard=hard, total=budget.total, per=budget.listener_cap)
    pools = Pools(db_threads=1 if config.database_url.startswith("sqlite") else 4, reactor=reactor)
    directory = Directory(config, pools)
    directory.prepare()  # schema creation/migration, synchronously, before we serve anyone
    mailstore = MailStore(config.mail_dir, max_cached_folders=config.imap.max_cached_folders,
                          folder_cache_bytes=config.imap.folder_cache_mb * 1024 * 1024,
                          lock_rules=LockRules(stale_seconds=config.mailbox.stale_lock_seconds))
    changes = _build_changes(directory, mailstore, pools, reactor)
    resolver, dns, srs = _build_trust(config, reactor)
    reports = _build_report_recorder(config, directory, pools, reactor)
    queue = _build_queue(config, pools, directory, mailstore, reactor, resolver, srs, reports)
    metrics = Metrics()
    metrics.watch_pools(pools.all())
    metrics.watch_queue(queue, reactor)
    metrics.watch_login_cache(directory.login_cache)
    return Parts(config=config, pools=pools, tls=tls, directory=directory, mailstore=mailstore,
                 queue=queue, reactor=reactor, resolver=resolver, dns=dns, srs=srs,
                 budget=budget, metrics=metrics, changes=changes, reports=reports,
                 mailbox_io=LockWaitingPool(pools.mailbox, reactor, config.mailbox.lock_wait),
                 events=_build_events(config, pools, directory, reactor))


def _build_events(config: Config, pools: Pools, directory: "Directory", reactor: Any) -> Any:
    """The recorder of message events and statistics, listening to the process's log."""
    from twisted.logger import globalLogPublisher

    from mailsuite import events

    events.check_settings(config.events)
    if not events.enabled(config.events):
        return None
    return events.EventRecorder(events.EventStore(directory.store), pools.db, reactor,
                                config.events, globalLogPublisher)


def _build_changes(directory: "Directory", mailstore: "MailStore", pools: Pools,
                   reactor: Any) -> Any:
    """The change notifications of the process: deliveries wake IDLE sessions, `mailsuite
    user ...` anywhere reaches the login cache and the open sessions (mailsuite/notify.py)."""
    from mailsuite.notify import ChangeHub, make_change_bus

    changes = ChangeHub(make_change_bus(directory.store, pools.db, reactor), reactor)
    changes.follow_directory(directory.login_cache,
                             (directory.route_cache, directory.sender_cache))
    mailstore.on_delivery = changes.mailbox_changed_in_thread
    return changes


def _build_trust(config: Config, reactor: Any) -> tuple[Any, Any, Any]:
    """The process's resolver, its caching DNS client, and the SRS rewriter."""
    from mailsuite.courier.mx import make_resolver
    from mailsuite.trust.dns import DnsClient
    from mailsuite.trust.spf import install_dns
    from mailsuite.trust.srs import SRS, load_or_create_secret
    from mailsuite import courier, trust

    courier.check_settings(config.courier)  # the name servers, before the resolver uses them
    trust.check_settings(config)
    resolver = make_resolver(config.courier.nameservers, reactor)
    dns = DnsClient(resolver, reactor)
    install_dns(dns, reactor)  # pyspf's look-ups go through it (process-wide)
    try:
        secret = load_or_create_secret(config.data_dir)
    except OSError as e:
        raise ConfigError(f"cannot create the SRS secret in {config.data_dir}: {e.strerror}")
    _give_to_data_dir_owner(config, [os.path.join(config.data_dir, "srs.key")])
    srs = SRS(secret, config.srs.domain or config.hostname, config.srs.max_age_days)
    return resolver, dns, srs


def _build_report_recorder(config: Config, directory: "Directory", pools: Pools,
                           reactor: Any) -> Any:
    """What the gate and the courier note for the reports we send; None when we send none."""
    from mailsuite.reports import check_settings

    check_settings(config.reports)
    if not config.reports.sender:
        return None
    from mailsuite.reports.record import ReportRecorder
    from mailsuite.reports.store import ReportStore

    return ReportRecorder(ReportStore(directory.store), pools.db, reactor)


def _build_report_services(parts: Parts) -> list[Any]:
    """The daily sender ([reports] sender) and the reader of [reports] address."""
    from mailsuite.reports.inbox import ReportInbox
    from mailsuite.reports.sender import ReportSender, ReportService
    from mailsuite.reports.store import ReportStore

    config, pools = parts.config, parts.pools
    store = ReportStore(parts.directory.store)
    services: list[Any] = []
    if config.reports.sender:
        sender = ReportSender(config, store, pools.db, pools.io, parts.dns, parts.queue,
                              parts.reactor)
        services.append(ReportService(sender, parts.reactor, config.reports.send_at))
    if config.reports.address:
        services.append(ReportInbox(config.reports.address, parts.directory, parts.mailstore,
                                    store, pools.io, pools.db, parts.reactor,
                                    config.reports.scan_interval))
    return services


def _give_to_data_dir_owner(config: Config, paths: list[str]) -> None:
    """Started as root to bind ports 25/465/587 and dropping privileges with `twistd --uid`, the
    server runs as the owner of data_dir: what start-up created as root must belong to it.
    (Only these paths: Maildirs and queue entries are created later, by the server itself.)"""
    if os.geteuid() != 0:
        return
    owner = os.stat(config.data_dir)
    if owner.st_uid == 0:
        return
    for path in paths:
        if os.path.exists(path) and os.stat(path).st_uid == 0:
            os.chown(path, owner.st_uid, owner.st_gid)


def _import_every_part() -> None:
    """Import all of mailsuite now. `twistd --uid` drops privileges after make_service, and a
    module first imported later (a lazy import on the bounce path, say) may then be unreadable:
    a virtualenv under a 0700 home directory is enough for that."""
    import mailsuite

    for module in pkgutil.walk_packages(mailsuite.__path__, "mailsuite."):
        importlib.import_module(module.name)


def make_service(config: Config, reactor: Any = None,
                 inherited: dict[str, int] | None = None,
                 counts: tuple[int, int] | None = None) -> service.MultiService:
    """The process's service tree. `inherited` (in a worker process, mailsuite/worker.py):
    listener name -> the descriptor of its socket, bound by the first process; a worker serves
    only those and leaves the daily report work to the first process. `counts` (a worker):
    the descriptor of the connection table and the worker's row in it."""
    from mailsuite import workers, writethrough

    writethrough.install()
    _import_every_part()
    check_proxy_settings(config.listen, LISTENERS)
    workers.check_settings(config)
    proxies = trusted_networks(config.listen.trusted_proxies)
    parts = build_parts(config, reactor)
    table = _connection_table(config, inherited, counts)
    top = _Process(parts.pools, parts.events)
    parts.queue.setServiceParent(top.front)
    MailLogCounter(parts.metrics).setServiceParent(top.front)
    if isinstance(parts.changes.bus, service.Service):  # PostgreSQL's LISTEN thread
        parts.changes.bus.setServiceParent(top.front)
    for report_service in _build_report_services(parts) if inherited is None else []:
        report_service.setServiceParent(top.front)
    shared: list[_Listener] = []
    for name, (builder, kwargs, implicit_tls) in LISTENERS.items():
        description = getattr(config.listen, name)
        if not description or inherited is not None and name not in inherited:
            continue
        factory = builder(parts, **kwargs)
        if factory is None:
            log.info("listener {name} is not available in this version", name=name)
            continue
        factory = limit(name, factory, config.limits, parts.reactor, parts.budget)
        if table is not None and name in table.names:
            factory.share(table.listener(name))
        parts.metrics.watch_listener(factory)
        if implicit_tls:
            factory = TLSMemoryBIOFactory(parts.tls.server_context(), False, factory)
        if name in config.listen.proxy_protocol:
            # Outermost: the PROXY header precedes TLS, and admission waits for it.
            factory = ProxyProtocolFactory(name, factory, proxies, parts.reactor)
        if inherited is not None:
            workers.AdoptedListener(name, inherited[name], factory,
                                    parts.reactor).setServiceParent(top.front)
            continue
        try:
            endpoint = endpoints.serverFromString(parts.reactor, description)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"[listen] {name} = {description!r} is not a valid endpoint: {e}")
        listener = _Listener(name, description, endpoint, factory)
        listener.setServiceParent(top.front)
        if name in config.server.worker_listeners:
            shared.append(listener)
    if inherited is None and config.workers > 1:
        spawn = workers.process_spawner(
            parts.reactor, config, lambda: {s.name[7:]: s.port.fileno() for s in shared}, table,
            workers.tls_files(config))
        workers.Supervisor(config.workers - 1, spawn,
                           parts.reactor).setServiceParent(top.front)
    if config.workers > 1 and config.listen.metrics:  # /metrics sums every process
        from mailsuite import metrics_gather

        metrics_gather.attach(parts.metrics, top.front, config, parts.reactor,
                              worker=inherited is not None)
    from mailsuite.autoconfig import first_run_message

    message = first_run_message(config) if inherited is None else None
    if message:
        log.info("{message}", message=message)
    return top


def _connection_table(config: Config, inherited: dict[str, int] | None,
                      counts: tuple[int, int] | None) -> Any:
    """The connection counts shared by the worker processes (docs/design/limits.md): made by
    the first process when there are workers, attached by a worker; None with one process."""
    from mailsuite.conncount import ConnectionTable
    from mailsuite.workers import SHARED_LISTENERS

    if counts is not None:
        return ConnectionTable.attach(counts[0], SHARED_LISTENERS, counts[1])
    if inherited is None and config.workers > 1:
        return ConnectionTable.create(config.workers, SHARED_LISTENERS, config.data_dir)
    return None


class _Process(service.MultiService):
    """The process: `front` (listeners, queue runner) stops first, then the event recorder
    (which writes what front reported), the thread pools last.

    MultiService stops its children all at once; a session still being served during shutdown
    would then find the SQL or file pool gone.
    """

    def __init__(self, pools: Pools, recorder: Any = None):
        super().__init__()
        self.front = service.MultiService()
        self.front.setName("front")
        pools.setServiceParent(self)
        if recorder is not None:  # listening before front starts reporting
            recorder.setServiceParent(self)
        self.front.setServiceParent(self)
        self._pools = pools
        self._recorder = recorder

    def stopService(self) -> defer.Deferred:
        service.Service.stopService(self)
        d = defer.maybeDeferred(self.front.stopService)
        if self._recorder is not None:
            d.addBoth(lambda _: self._recorder.stopService())
        d.addBoth(lambda _: self._pools.stopService())
        return d


class _Listener(StreamServerEndpointService):
    """A listening port that reports failure to bind as one line and stops start-up."""

    def __init__(self, name: str, description: str, endpoint: Any, factory: Any):
        super().__init__(endpoint, factory)
        self.setName(f"listen-{name}")
        self._description = description
        self._raiseSynchronously = True
        self.port: Any = None  # the listening port, once bound (workers inherit its socket)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
            self._waitingForPort.addCallback(self._bound)
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            line = f"mailsuite: cannot listen for {self.name[7:]} on {self._description}: {reason}"
            log.critical("{line}", line=line)
            # twistd has pointed sys.stderr at the log by now; the operator's terminal is fd 2.
            os.write(2, (line + "\n").encode())
            os._exit(1)  # twistd would otherwise print a traceback and keep half a server running
        log.info("listening for {name} on {description}", name=self.name[7:],
                 description=self._description)

    def _bound(self, port: Any) -> Any:
        self.port = port
        return port

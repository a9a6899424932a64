"""The remote delivery agent the queue runner calls for recipients outside our domains.

`deliver(entry, recipients, message_path)` groups the recipients by domain and runs one SMTP
transaction per domain (all its recipients in it), trying MX hosts in order until one gives an
answer about the recipients. Results are per recipient: 2xx sent, 4xx deferred, 5xx bounced;
a failure before any recipient was answered (DNS, connection, greeting, TLS) defers all of them,
except the permanent DNS cases (NXDOMAIN, null MX) that bounce at once.

Connections are cached per domain for a few seconds after a transaction (RSET before reuse), and
at most `max_connections_per_domain` sessions per domain (or to the smarthost) run at once.
TLS client options that read files (the relay's CA) are built once, here, at start-up; see
docs/design/courier.md.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

from OpenSSL import SSL, crypto
from twisted.internet import defer, endpoints, ssl
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError as NetTimeoutError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTCP, IReactorTime
from twisted.logger import Logger

from mailsuite import maillog
from mailsuite.config import ConfigError, CourierSection
from mailsuite.courier import status
from mailsuite.courier.dkim import Signer
from mailsuite.courier.client import (Credentials, SMTPClientProtocol, SMTPError, Session,
                                      TLSPolicy)
from mailsuite.courier.mx import MXResolver, make_resolver, parse_hostport
from mailsuite.dotstuff import dot_stuff
from mailsuite.pools import WorkPool
from mailsuite.queue.spool import DeliveryResult, QueueEntry, Recipient
from mailsuite.reports import STARTTLS_NOT_SUPPORTED, SUCCESS, VALIDATION_FAILURE
from mailsuite.tls import client_context_opportunistic
from mailsuite.trust.forwarding import Forwarder

log = Logger()

IDLE_TIMEOUT = 5.0  # seconds a cached connection waits for the next message (Postfix: 2 s)
MAX_TARGETS = 10  # addresses tried per attempt before giving up until the next retry


@dataclass
class Payload:
    """The message as it goes on the wire (signed, dot-stuffed) and facts for MAIL FROM."""

    wire: bytes
    size: int
    eight_bit: bool
    repaired: str = ""  # what wire_safe() changed, for the mail log; "" if nothing


class RemoteAgent:
    """The DeliveryAgent for remote recipients.

    `settings` is the [courier] section, `hostname` our EHLO name, `reactor` makes the outbound
    connections and `clock` runs the timers (the same reactor in the server), `io` reads and
    signs the message off the reactor, `signer` adds DKIM signatures (None: never sign).
    Call `close()` at shutdown to QUIT cached connections.
    """

    def __init__(self, settings: CourierSection, hostname: str, reactor: IReactorTCP,
                 clock: IReactorTime, io: WorkPool, signer: Signer | None = None,
                 resolver: MXResolver | None = None, forwarder: Forwarder | None = None,
                 reports: Any = None):
        self.config = settings
        self.hostname = hostname
        self.reactor = reactor
        self.clock = clock
        self.io = io
        self.signer = signer
        self.forwarder = forwarder  # SRS and ARC for forwarded mail (mailsuite.trust)
        # Notes each MX session's TLS outcome for TLS reports (mailsuite/reports/record.py).
        self.reports = reports
        self.mx = resolver or MXResolver(make_resolver(settings.nameservers, reactor))
        self._slots: dict[str, defer.DeferredSemaphore] = {}
        self._idle: dict[str, list[tuple[Session, Any]]] = defaultdict(list)
        self._plain_only: dict[tuple[str, int], float] = {}  # hosts whose TLS handshake failed
        self._plain_why: dict[tuple[str, int], str] = {}  # and why (an RFC 8460 result type)
        self.relay = parse_hostport(settings.relay, 25) if settings.relay else None
        # Everything that reads a file is done now, at start-up, never per connection.
        self._trust = _load_trust(settings.relay_cafile)
        self._opportunistic = client_context_opportunistic()
        self._verified: dict[str, IOpenSSLClientConnectionCreator] = {}
        self._relay_tls = self._relay_policy() if self.relay else None

    # -- the queue's entry point ---------------------------------------------------------------
    @defer.inlineCallbacks
    def deliver(self, entry: QueueEntry, recipients: Sequence[Recipient],
                message_path: str) -> Any:
        by_domain: dict[str, list[Recipient]] = defaultdict(list)
        for r in recipients:
            by_domain[r.address.rpartition("@")[2].lower()].append(r)
        try:
            payload = yield self._prepare(entry, message_path)
        except OSError as e:
            maillog.internal_error(entry.id, f"cannot read {message_path}: {e}")
            return [_result(r, "deferred", f"{status.MESSAGE_UNREADABLE.status} "
                            f"{status.MESSAGE_UNREADABLE.text}", "") for r in recipients]
        if payload.repaired:
            maillog.normalised(entry.id, payload.repaired)
        outcomes = yield defer.gatherResults(
            [self._deliver_domain(entry, domain, rcpts, payload)
             for domain, rcpts in by_domain.items()], consumeErrors=True)
        return [result for results in outcomes for result in results]

    def close(self) -> defer.Deferred:
        """QUIT every cached connection (at shutdown); fires when they are closed."""
        closing = []
        for key in list(self._idle):
            for session, timer in self._idle.pop(key):
                if timer.active():
                    timer.cancel()
                closing.append(session.quit())
        return defer.gatherResults(closing, consumeErrors=True)

    # -- one domain ----------------------------------------------------------------------------
    @defer.inlineCallbacks
    def _deliver_domain(self, entry: QueueEntry, domain: str, recipients: list[Recipient],
                        payload: Payload) -> Any:
        key = f"relay:{self.config.relay}" if self.relay else domain
        slot = self._slots.setdefault(key, defer.DeferredSemaphore(
            max(1, self.config.max_connections_per_domain)))
        yield slot.acquire()
        try:
            return (yield self._attempt(entry, domain, key, recipients, payload))
        except Exception as e:  # a bug must not lose the recipients: defer them
            maillog.internal_error(entry.id, f"delivery to {domain} failed unexpectedly",
                                   defer.Failure())
            return [_result(r, "deferred", f"4.3.0 internal error: {type(e).__name__}", "")
                    for r in recipients]
        finally:
            slot.release()

    @defer.inlineCallbacks
    def _attempt(self, entry: QueueEntry, domain: str, key: str, recipients: list[Recipient],
                 payload: Payload) -> Any:
        addresses = [r.address for r in recipients]
        last: SMTPError | None = None
        # A cached connection first: it is to a host of this domain that worked seconds ago.
        while self._idle.get(key):
            session, timer = self._idle[key].pop()
            if timer.active():
                timer.cancel()
            try:
                if session.alive and (yield session.reset()):
                    results = yield self._transaction(entry, domain, key, session, addresses,
                                                      payload, reused=True)
                    if isinstance(results, SMTPError):
                        return self._failed(recipients, results, session.host)
                    if results is not None:
                        return self._results(recipients, results, session.host)
                    continue
            except SMTPError:
                pass
            session.protocol.abort()
        targets = yield self._targets(domain)
        if isinstance(targets, status.Failure):
            verdict = "bounced" if targets.permanent else "deferred"
            maillog.route_failed(entry.id, domain, f"{targets.status} {targets.text}")
            return [_result(r, verdict, f"{targets.status} {targets.text}", "")
                    for r in recipients]
        last_host = ""
        for host, address, port in targets[:MAX_TARGETS]:
            last_host = host
            try:
                session = yield self._connect(domain, host, address, port)
            except SMTPError as e:
                maillog.route_failed(entry.id, domain, e.detail,
                                     relay=f"{host}[{address}]:{port}")
                last = e
                if e.next_host:
                    continue
                break
            results = yield self._transaction(entry, domain, key, session, addresses, payload)
            if isinstance(results, SMTPError):
                last = results
                if results.next_host:
                    continue
                break
            return self._results(recipients, results, host)
        return self._failed(recipients, last or SMTPError(status.CONNECT_FAILED), last_host)

    def _failed(self, recipients: list[Recipient], error: SMTPError, host: str) -> list:
        """One verdict for every recipient: the session failed before answering each."""
        verdict = "bounced" if error.permanent else "deferred"
        return [_result(r, verdict, error.detail, host if error.reply else "", error.enhanced)
                for r in recipients]

    @defer.inlineCallbacks
    def _transaction(self, entry: QueueEntry, domain: str, key: str, session: Session,
                     addresses: list[str], payload: Payload, reused: bool = False) -> Any:
        """{address: Reply}, or an SMTPError that applies to every recipient (or None when a
        reused connection died before it took anything, so a fresh one should be tried)."""
        try:
            results = yield session.transaction(self._mail_from(entry), addresses, payload.wire,
                                                payload.size, payload.eight_bit)
        except SMTPError as e:
            session.protocol.abort()
            if reused and e.reply is None and e.next_host:
                return None  # died idle (peer timeout): nothing was sent, try a fresh one
            return e
        maillog.transaction(entry.id, domain, session.relay, session.tls, session.tls_info,
                            reused, sum(1 for r in results.values() if r.code // 100 == 2),
                            len(addresses))
        self._park(key, session)
        return results

    def _results(self, recipients: list[Recipient], replies: dict, host: str) -> list:
        out = []
        for r in recipients:
            reply = replies.get(r.address)
            if reply is None:
                out.append(_result(r, "deferred", "4.4.2 no reply for this recipient", host))
            elif reply.code // 100 == 2:
                out.append(_result(r, "sent", str(reply), host, reply.enhanced))
            elif reply.permanent:
                out.append(_result(r, "bounced", str(reply), host, reply.enhanced))
            else:
                out.append(_result(r, "deferred", str(reply), host, reply.enhanced))
        return out

    # -- where and how to connect --------------------------------------------------------------
    @defer.inlineCallbacks
    def _targets(self, domain: str) -> Any:
        """[(host name, address or name, port)] in order, or a status.Failure."""
        if self.relay:
            host, port = self.relay
            return [(host, host, port)]
        resolution = yield self.mx.resolve(domain)
        if resolution.failure is not None:
            return resolution.failure
        port = self.config.mx_port
        return [(h.name, a, port) for h in resolution.hosts for a in h.addresses]

    def _tls_policy(self, domain: str, host: str, address: str, port: int) -> TLSPolicy:
        if self._relay_tls is not None:
            return self._relay_tls
        if domain in {d.lower() for d in self.config.require_tls_domains}:
            return TLSPolicy("required", self._verified_context(host))
        if self._plain_only.get((address, port), 0) > self.clock.seconds():
            return TLSPolicy("none")
        return TLSPolicy("opportunistic", self._opportunistic)

    def _relay_policy(self) -> TLSPolicy:
        """The smarthost's TLS, decided (and its CA read) once at start-up."""
        cfg = self.config
        assert self.relay is not None
        mode = {"tls": "implicit", "starttls": "required", "none": "none"}[cfg.relay_tls]
        if mode == "required" and not cfg.relay_verify:
            mode = "opportunistic"
        context = (self._verified_context(self.relay[0]) if cfg.relay_verify
                   else self._opportunistic)
        return TLSPolicy(mode, context)

    def _verified_context(self, host: str) -> IOpenSSLClientConnectionCreator:
        """Options that verify `host`'s certificate against the CA loaded at start-up (or the
        system's trust store), one per host name."""
        context = self._verified.get(host)
        if context is None:
            context = self._verified[host] = ssl.optionsForClientTLS(host,
                                                                    trustRoot=self._trust)
        return context

    @defer.inlineCallbacks
    def _connect(self, domain: str, host: str, address: str, port: int,
                 fallback: bool = False) -> Any:
        """A started session. `fallback`: the plain-text retry right after a failed
        opportunistic handshake (that failure was the session counted for TLS reports)."""
        tls = self._tls_policy(domain, host, address, port)
        cfg = self.config
        if self.relay:
            endpoint = endpoints.HostnameEndpoint(self.reactor, address.encode("idna"), port,
                                                  timeout=cfg.connect_timeout)
        elif ":" in address:
            endpoint = endpoints.TCP6ClientEndpoint(self.reactor, address, port,
                                                    timeout=cfg.connect_timeout)
        else:
            endpoint = endpoints.TCP4ClientEndpoint(self.reactor, address, port,
                                                    timeout=cfg.connect_timeout)
        if tls.mode == "implicit":
            endpoint = endpoints.wrapClientTLS(tls.context, endpoint)
        protocol = SMTPClientProtocol(self.clock, cfg.command_timeout)
        try:
            yield endpoints.connectProtocol(endpoint, protocol)
        except (ConnectError, DNSLookupError, NetTimeoutError, defer.TimeoutError) as e:
            raise SMTPError(status.Failure(status.CONNECT_FAILED.status,
                                           f"cannot connect to {host}[{address}]:{port}: "
                                           f"{_reason(e)}"))
        credentials = (Credentials(cfg.relay_username, cfg.relay_password)
                       if self.relay and cfg.relay_username else None)
        session = Session(protocol, host, address, port)
        try:
            yield session.start(self.hostname, tls, credentials)
        except SMTPError as e:
            protocol.abort()
            if e.tls_failed:
                self._note_tls(domain, host, address, protocol.tls_failure_type())
            elif e.failure is status.TLS_REQUIRED:
                self._note_tls(domain, host, address, STARTTLS_NOT_SUPPORTED)
            if e.tls_failed and tls.mode == "opportunistic":
                # RFC 7435: a failed opportunistic handshake falls back to plain text; remember
                # the host for an hour and reconnect without STARTTLS right away.
                log.info("TLS handshake with {host}[{address}] failed: delivering without TLS",
                         host=host, address=address)
                self._plain_only[(address, port)] = self.clock.seconds() + 3600
                self._plain_why[(address, port)] = protocol.tls_failure_type()
                return (yield self._connect(domain, host, address, port, fallback=True))
            if e.tls_failed:
                raise SMTPError(status.TLS_REQUIRED, next_host=True)
            raise
        if not fallback:
            if session.tls:
                self._note_tls(domain, host, address, SUCCESS)
            elif tls.mode == "none":  # within the hour after a failed handshake
                self._note_tls(domain, host, address,
                               self._plain_why.get((address, port), VALIDATION_FAILURE))
            else:
                self._note_tls(domain, host, address, STARTTLS_NOT_SUPPORTED)
        log.info("connected to {relay} tls={tls} {tls_info} auth={auth}", relay=session.relay,
                 tls="yes" if session.tls else "no", tls_info=session.tls_info,
                 auth="yes" if credentials else "no")
        return session

    def _note_tls(self, domain: str, host: str, address: str, result_type: str) -> None:
        """One session's TLS outcome for TLS reports (RFC 8460), MX delivery only: a smarthost
        is not the recipient domain's policy."""
        if self.reports is not None and self.relay is None:
            self.reports.tls(domain, host, address, result_type)

    def _park(self, key: str, session: Session) -> None:
        """Keep a healthy connection for the next message to the same domain."""
        if not session.alive:
            return
        idle = self._idle[key]

        def expire() -> None:
            for i, (s, _) in enumerate(idle):
                if s is session:
                    del idle[i]
                    break
            session.quit()

        idle.append((session, self.clock.callLater(IDLE_TIMEOUT, expire)))

    def _mail_from(self, entry: QueueEntry) -> str:
        if self.forwarder is None:
            return entry.sender
        return self.forwarder.sender(entry.sender, entry.meta)

    # -- message preparation ---------------------------------------------------------------------
    def _prepare(self, entry: QueueEntry, message_path: str) -> defer.Deferred:
        """Read, make wire-safe, DKIM-sign (when a key exists) and dot-stuff the message, off
        the reactor. Made safe before signing, so the signature covers the bytes sent."""
        signer, forwarder = self.signer, self.forwarder
        sender = self._mail_from(entry)

        def work() -> Payload:
            with open(message_path, "rb") as f:
                message = f.read()
            message, repaired = wire_safe(message)
            if forwarder is not None:
                message = forwarder.seal(message, entry.meta)
            if signer is not None:
                message = signer.sign(message, sender)
            return Payload(dot_stuff(message), len(message), not message.isascii(), repaired)

        return self.io.run(work)


_BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def wire_safe(message: bytes) -> tuple[bytes, str]:
    """The message as we may relay it, and what was changed ("" if nothing).

    NUL is not allowed in a message, not even in 8bit data (RFC 2045 §2.8), and CR and LF
    may only occur together as CRLF (RFC 5321 §2.3.8): a bare one is a line end that some
    receivers see and others do not (SMTP smuggling). NULs are removed, bare CR/LF become
    CRLF, and the caller logs it. The SMTP server already refuses or normalises these at
    DATA; this catches spool entries of older versions, DSNs quoting such headers, anything
    else that reaches the queue (docs/design/courier.md, "Wire safety")."""
    changes = []
    nuls = message.count(b"\0")
    if nuls:
        message = message.replace(b"\0", b"")
        changes.append(f"{nuls} NUL byte{'s' if nuls > 1 else ''} removed")
    if _BARE_LINE_END.search(message):
        message, n = _BARE_LINE_END.subn(b"\r\n", message)
        changes.append(f"{n} bare CR/LF made CRLF")
    return message, ", ".join(changes)


def _result(r: Recipient, verdict: str, detail: str, remote: str, enhanced: str = ""
            ) -> DeliveryResult:
    if not enhanced:
        first = detail.split(" ", 2)
        enhanced = next((p for p in first[:2] if p[:1] in "245" and p.count(".") == 2), "")
    return DeliveryResult(address=r.address, status=verdict, detail=detail, remote_mta=remote,
                          enhanced=enhanced)


def _load_trust(cafile: str) -> ssl.Certificate | None:
    """The CA certificate of [courier] relay_cafile, None for the system's trust store."""
    if not cafile:
        return None
    try:
        with open(cafile, "rb") as f:
            return ssl.Certificate.loadPEM(f.read())
    except (OSError, crypto.Error, SSL.Error) as e:
        raise ConfigError(f"[courier] relay_cafile = {cafile!r} is not a readable PEM "
                          f"certificate: {e}")


def _reason(e: Exception) -> str:
    text = str(e).strip().rstrip(".")
    return text.split(": ", 1)[-1] if text else type(e).__name__

"""The trust checks as the SMTP server meets them: at connect, MAIL, RCPT and the end of DATA
(docs/design/trust.md, "The gate").

`Gate` is built once per listener by service.py with everything it uses; the SMTP server makes
one `GateSession` per connection and asks it:
- `connected()`: the client address's connection rate (MX), and starts its DNSBL look-ups;
- `mail(helo, sender, auth_user)`: starts SPF on MX; counts a submission user's messages;
- `rcpt(sender, recipient)`: DNSBL (not for postmaster, RFC 5321 §4.5.1), greylisting and
  recipient rates;
- `inspect(envelope, path, size, routes)` at the end of DATA: DKIM, ARC, DMARC, the content
  engines, then the message rewritten with our Authentication-Results (any earlier one that
  claims our authserv-id removed first, RFC 8601 §5) and the engines' headers.
Each returns a Deferred; a refusal is a Reply, "go on" is None. Nothing here writes to a client.
"""
from __future__ import annotations

import ipaddress
import os
import random
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Generator, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailsuite.config import Config
from mailsuite.pools import WorkPool
from mailsuite.smtp.replies import Reply
from mailsuite.trust import ACCEPT, JUNK, REJECT, TEMPFAIL, AuthResult, Envelope, Verdict

log = Logger()

POSTMASTER = "postmaster"


@dataclass
class Inspection:
    """The end-of-DATA outcome: the verdict, the file to queue (rewritten), and queue meta."""

    verdict: Verdict
    path: str = ""
    size: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


class Gate:
    """The checks of one listener ("mx" or "submission")."""

    def __init__(self, config: Config, listener: str, *, reactor: IReactorTime,
                 work: WorkPool, dns: Any = None, ratelimits: Any = None, greylist: Any = None,
                 dnsbl: Any = None, scanners: Sequence[Any] = (), rng: random.Random | None = None,
                 reports: Any = None):
        self.config = config
        self.listener = listener
        self.reactor = reactor
        self.work = work  # runs the blocking library checks (pyspf, dkimpy) off the reactor
        self.dns = dns
        self.ratelimits = ratelimits
        self.greylist = greylist
        self.dnsbl = dnsbl
        self.scanners = list(scanners)
        self.rng = rng or random.Random()
        # Notes each DMARC outcome for the aggregate reports we send (mailsuite/reports/record.py).
        self.reports = reports
        self.authserv_id = config.trust.authserv_id or config.hostname
        self.dnsbl_exempt = _networks(config.dnsbl.exempt_networks)
        self.large = defer.DeferredSemaphore(1)  # signed messages over LARGE_MESSAGE
        # Sender authentication runs on MX only: submission mail is our own users'.
        self.authenticates = listener == "mx" and config.trust.enabled and dns is not None

    def session(self, client_ip: str) -> "GateSession":
        return GateSession(self, client_ip)


class GateSession:
    def __init__(self, gate: Gate, client_ip: str):
        self.gate = gate
        self.client_ip = client_ip
        self._dnsbl: defer.Deferred | None = None
        self._spf: defer.Deferred | None = None
        self._spf_result: AuthResult | None = None

    # -- connect -------------------------------------------------------------------------------
    def connected(self) -> defer.Deferred:
        gate = self.gate
        if gate.listener == "mx" and gate.dnsbl is not None and \
                not _in_networks(self.client_ip, gate.dnsbl_exempt):
            # Started now, awaited at the first RCPT: the look-ups overlap HELO and MAIL.
            self._dnsbl = _settled(gate.dnsbl.check(self.client_ip))
        if gate.listener == "mx" and gate.ratelimits is not None:
            return _reply_or_none(gate.ratelimits.connection(self.client_ip))
        return defer.succeed(None)

    # -- MAIL ----------------------------------------------------------------------------------
    def mail(self, helo: str, sender: str, auth_user: str | None) -> defer.Deferred:
        gate = self.gate
        self._spf = None
        self._spf_result = None
        if gate.listener == "submission" and auth_user and gate.ratelimits is not None:
            return _reply_or_none(gate.ratelimits.submission_message(auth_user))
        if gate.authenticates:
            from mailsuite.trust.spf import check_spf

            self._spf = _settled(check_spf(gate.dns, gate.work, gate.reactor, self.client_ip,
                                           sender, helo, gate.config.trust.dns_timeout))

            def keep(result: Any) -> Any:
                if isinstance(result, AuthResult):
                    self._spf_result = result
                return result

            self._spf.addCallback(keep)
        return defer.succeed(None)

    # -- RCPT ----------------------------------------------------------------------------------
    def rcpt(self, sender: str, recipient: str, auth_user: str | None) -> defer.Deferred:
        """Deferred[Reply | None] for one recipient; at once when no check applies (every
        RCPT asks: no generator for nothing to wait for)."""
        gate = self.gate
        if gate.listener == "submission":
            if auth_user and gate.ratelimits is not None:
                return _reply_or_none(gate.ratelimits.submission_recipient(auth_user))
            return defer.succeed(None)
        if _is_postmaster(recipient):
            # RFC 5321 §4.5.1: postmaster is reachable whatever we think of you
            return defer.succeed(None)
        if self._dnsbl is None and gate.ratelimits is None and gate.greylist is None:
            return defer.succeed(None)
        return self._mx_rcpt(sender, recipient)

    @defer.inlineCallbacks
    def _mx_rcpt(self, sender: str, recipient: str
                 ) -> Generator[defer.Deferred, Any, Reply | None]:
        gate = self.gate
        if self._dnsbl is not None:
            outcome = yield self._dnsbl
            reply = getattr(outcome, "reply", None)
            if reply is not None:
                return reply
        if gate.ratelimits is not None:
            reply = yield _reply_or_none(gate.ratelimits.recipient(self.client_ip))
            if reply is not None:
                return reply
        if gate.greylist is not None:
            reply = yield _reply_or_none(gate.greylist.check(self.client_ip, sender, recipient))
            if reply is not None:
                return reply
        return None

    # -- end of DATA ---------------------------------------------------------------------------
    def reads_message(self, envelope: Envelope) -> bool:
        """Does `inspect` read the staged file (sender authentication, a content scanner)?
        When not, it may be called before the file is complete, with path "", and leaves the
        Inspection's path "" (nothing rewritten)."""
        return self.gate.authenticates or any(s.wanted(envelope) for s in self.gate.scanners)

    def inspect(self, envelope: Envelope, path: str, size: int, forwards: bool
                ) -> defer.Deferred:
        """Judge the staged message at `path`; for a message we keep, write the rewritten copy
        (new headers on top) next to it and remove the original. `forwards`: an alias sends a
        copy to another domain (the courier then rewrites the sender with SRS and adds an ARC
        set, which needs our Authentication-Results in the message). Fires with an Inspection."""
        scanners = [scanner for scanner in self.gate.scanners if scanner.wanted(envelope)]
        if not self.gate.authenticates and not scanners:
            # Nothing checks this message (trust disabled, no engine wants it): accepted as it
            # is, with no verdict worth a log line and nothing to write.
            verdict = Verdict()
            return defer.succeed(Inspection(verdict, path, size,
                                            self._meta(verdict, envelope, forwards)))
        return self._inspect(envelope, path, size, forwards, scanners)

    @defer.inlineCallbacks
    def _inspect(self, envelope: Envelope, path: str, size: int, forwards: bool,
                 scanners: list[Any]) -> Generator[defer.Deferred, Any, Inspection]:
        gate = self.gate
        spf: Any = None
        if gate.authenticates:
            spf = self._spf_result
            if spf is None and self._spf is not None:
                spf = yield self._spf
            if not isinstance(spf, AuthResult):
                spf = AuthResult("spf", "temperror", "SPF check failed")
        if gate.authenticates and not scanners:
            # The common MX case: checks and rewrite in one worker job, one thread hop.
            done = yield self._authenticate(envelope, path, spf, rewrite=True)
            for problem in done.problems:
                _log_check_failure(envelope, problem)
            self._log(envelope, done.verdict)
            if done.error is not None:
                raise done.error  # the rewrite's disk I/O: the caller answers 451/452
            if done.verdict.disposition in (TEMPFAIL, REJECT):
                return Inspection(done.verdict)
            new_path, new_size = done.written or (path, size)
            return Inspection(done.verdict, new_path, new_size,
                              self._meta(done.verdict, envelope, forwards))
        checks: list[defer.Deferred] = []
        if gate.authenticates:
            checks.append(_settled(self._authenticate(envelope, path, spf)))
        for scanner in scanners:
            checks.append(_settled(scanner.scan(envelope, path, size)))
        outcomes = (yield defer.gatherResults(checks)) if checks else []
        verdict, problems = _combine(outcomes, envelope.listener)
        for problem in problems:
            _log_check_failure(envelope, problem)
        self._log(envelope, verdict)
        if verdict.disposition in (TEMPFAIL, REJECT):
            return Inspection(verdict)
        meta = self._meta(verdict, envelope, forwards)
        header_fields = _header_fields(verdict, gate.authserv_id, gate.authenticates)
        if not header_fields:
            return Inspection(verdict, path, size, meta)  # nothing to add or remove
        new_path, new_size = yield gate.work.run(
            _rewrite, path, header_fields, gate.authserv_id if gate.authenticates else None)
        return Inspection(verdict, new_path, new_size, meta)

    def _meta(self, verdict: Verdict, envelope: Envelope, forwards: bool) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        if verdict.disposition == JUNK:
            meta["folder"] = self.gate.config.trust.junk_folder
            meta["flags"] = ["$Junk"]
        if forwards and envelope.listener == "mx":
            meta["forwarded"] = True
        return meta

    def _authenticate(self, envelope: Envelope, path: str, spf: AuthResult,
                      rewrite: bool = False) -> defer.Deferred:
        """DKIM, ARC and DMARC in a worker thread. dkimpy needs the whole message in memory,
        so only a signed message is read whole, and signed messages over LARGE_MESSAGE are
        verified one at a time: memory stays bounded whatever many big messages arrive at
        once (docs/design/trust.md, "Memory"). With `rewrite` (no content engine wants the
        message) the same job also decides and writes the rewritten copy: fires with _Done."""
        gate = self.gate
        from mailsuite.trust.checks import authenticate_message

        lookup = gate.dns.blocking(gate.reactor)
        seed = gate.rng.random()
        outcomes: list[Any] = []  # the AuthOutcome, handed to gate.reports on the reactor

        def work() -> Verdict:
            with open(path, "rb") as f:
                head, complete = _read_head(f)
                signed = _SIGNED.search(head) is not None
                # Unsigned: DMARC needs the header only, DKIM and ARC have nothing to verify.
                message = head + f.read() if signed or not complete else head
            outcome = authenticate_message(message, envelope, spf, lookup, gate.config.trust,
                                           random.Random(seed))
            outcomes.append(outcome)
            return Verdict(outcome.disposition, outcome.reply, [], list(outcome.results),
                           outcome.log)

        def work_and_rewrite() -> _Done:
            try:
                outcome: Any = work()
            except Exception as e:  # a bug in a check: judged like the slow path does
                outcome = e
            verdict, problems = _combine([outcome], envelope.listener)
            if verdict.disposition in (TEMPFAIL, REJECT):
                return _Done(verdict, problems)
            fields = _header_fields(verdict, gate.authserv_id, True)
            if not fields:
                return _Done(verdict, problems)
            try:
                written = _rewrite(path, fields, gate.authserv_id)
            except Exception as e:
                return _Done(verdict, problems, error=e)
            return _Done(verdict, problems, written)

        job = work_and_rewrite if rewrite else work
        if os.path.getsize(path) <= LARGE_MESSAGE:
            d = gate.work.run(job)
        else:
            d = gate.large.run(gate.work.run, job)
        if gate.reports is not None:
            def note(result: Any) -> Any:
                if outcomes:
                    gate.reports.dmarc(envelope, outcomes[0])
                return result

            d.addCallback(note)
        return d

    def _log(self, envelope: Envelope, verdict: Verdict) -> None:
        results = " ".join(f"{r.method}={r.result}" for r in verdict.results)
        log.info("trust {queue_id} from=<{sender}> client={client_ip}: {results} -> "
                 "{disposition}{why}", queue_id=envelope.queue_id, sender=envelope.mail_from,
                 client_ip=envelope.client_ip, results=results or "-",
                 disposition=verdict.disposition,
                 why=f" ({verdict.log})" if verdict.log else "")


@dataclass
class _Done:
    """What the one-job check and rewrite did (GateSession._authenticate with `rewrite`)."""

    verdict: Verdict
    problems: list[Any] = field(default_factory=list)  # failed checks, logged on the reactor
    written: tuple[str, int] | None = None  # the rewritten copy, if any
    error: BaseException | None = None  # the rewrite failed (disk): the message is not queued


def _combine(outcomes: Sequence[Any], listener: str) -> tuple[Verdict, list[Any]]:
    """The checks' outcomes as one verdict, and the outcomes that were failures, not verdicts
    (a bug in a check: never accept silently, never lose mail)."""
    verdict = Verdict()
    problems = []
    for outcome in outcomes:
        if not isinstance(outcome, Verdict):
            problems.append(outcome)
            outcome = Verdict(TEMPFAIL, Reply(451, "4.7.1", "message checks failed, try "
                                                            "again later", reason="local_error"),
                              log="internal error in a check")
        verdict = verdict.combine(outcome)
    if verdict.disposition == JUNK and listener != "mx":
        verdict = Verdict(ACCEPT, None, verdict.headers, verdict.results, verdict.log)
    return verdict, problems


def _log_check_failure(envelope: Envelope, problem: Any) -> None:
    log.error("trust check failed for {queue_id}: {error}", queue_id=envelope.queue_id,
              error=problem)


def _header_fields(verdict: Verdict, authserv_id: str, authenticates: bool) -> list[str]:
    """The fields to put on top of a kept message: our Authentication-Results, then the
    engines' headers."""
    fields = list(verdict.headers)
    if authenticates:
        from mailsuite.trust.authresults import build_header

        fields.insert(0, build_header(authserv_id, verdict.results))
    return fields


def _networks(texts: Sequence[str]) -> list[Any]:
    return [ipaddress.ip_network(t, strict=False) for t in texts]


def _in_networks(ip: str, networks: Sequence[Any]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in n for n in networks if n.version == address.version)


def _is_postmaster(address: str) -> bool:
    return address.lower() == POSTMASTER or address.lower().startswith(POSTMASTER + "@")


def _settled(d: defer.Deferred) -> defer.Deferred:
    """A Deferred that fires with the result or with the exception object, never errbacks
    (so one failing check neither stops the others nor leaves an unhandled error)."""
    return d.addErrback(lambda failure: failure.value)


def _reply_or_none(d: defer.Deferred) -> defer.Deferred:
    def check(result: Any) -> Reply | None:
        if isinstance(result, Reply):
            return result
        if isinstance(result, BaseException):
            log.error("trust limit check failed: {error!r}", error=result)
        return None

    return _settled(d).addCallback(check)


# -- the rewrite, in a worker thread -------------------------------------------------------------

# Signed messages larger than this are verified one at a time (dkimpy holds them in memory).
LARGE_MESSAGE = 1024 * 1024
# The header section is read up to this; a longer one is treated as header up to here.
MAX_HEAD = 1024 * 1024
COPY_CHUNK = 64 * 1024
_SIGNED = re.compile(rb"(?im)^(dkim-signature|arc-seal|arc-message-signature):")


def _read_head(f: BinaryIO) -> tuple[bytes, bool]:
    """The header section and its blank line (at most MAX_HEAD octets), and whether that was
    the whole header section."""
    head = bytearray()
    while len(head) < MAX_HEAD:
        line = f.readline(MAX_HEAD - len(head))
        if not line:
            return bytes(head), True
        head += line
        if line in (b"\r\n", b"\n"):
            return bytes(head), True
    return bytes(head), False


def _rewrite(path: str, header_fields: list[str], authserv_id: str | None) -> tuple[str, int]:
    """Write `header_fields` + the message (minus Authentication-Results fields claiming
    `authserv_id`) to a new file beside `path`; remove `path`. Returns (new path, size).
    Only the header section is held in memory; the body is copied in chunks."""
    from mailsuite.safeio import write_all

    added = b"".join(_fold(field).encode("utf-8") + b"\r\n" for field in header_fields)
    directory = os.path.dirname(path)
    new_path = os.path.join(directory, f"{os.getpid()}.{secrets.token_hex(8)}")
    with open(path, "rb") as src:
        head, _ = _read_head(src)
        if authserv_id is not None:
            from mailsuite.trust.authresults import strip_ours

            head = strip_ours(head, authserv_id)
        fd = os.open(new_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            size = write_all(fd, added) + write_all(fd, head)
            while chunk := src.read(COPY_CHUNK):
                size += write_all(fd, chunk)
        except BaseException:
            os.close(fd)
            os.unlink(new_path)
            raise
    os.close(fd)
    os.unlink(path)
    return new_path, size


def _fold(field: str) -> str:
    """A header field as CRLF-folded text; CR/LF from any source cannot add a field."""
    lines = field.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\r\n".join(line if i == 0 else " " + line.lstrip() if line[:1] not in (" ", "\t")
                       else line for i, line in enumerate(lines) if line or i == 0)

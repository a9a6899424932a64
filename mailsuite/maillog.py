"""The mail log: one line per event in the life of a message, in one Postfix-like shape.

Every line starts with `queue_id=<id>` and goes on with `key=value` fields, so
`grep queue_id=<id>` gives the whole story of a message: received, each delivery attempt
(status=sent|deferred|bounced with relay=, delay=, attempts=, detail=), the DSN it caused
(status=dsn-queued, or dsn-skipped for the null sender), the outbound transaction, its removal,
or a damaged entry left for the admin. Values with spaces or quotes are quoted, `"` and `\\`
escaped. The format is described in docs/design/queue.md.

Only this module writes these lines (namespace "mailsuite.maillog"); every function must be
called on the reactor thread (twisted.logger observers are not all thread-safe). Each event also
carries its facts as fields: `maillog_event` (its kind) and the objects and values it is about,
which mailsuite/events records (docs/design/events.md) and the metrics count
(mailsuite/metrics.py) without parsing the text.
"""
from __future__ import annotations

import os
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsuite.queue.spool import DeliveryResult, QueueEntry, Recipient, valid_queue_id

NAMESPACE = "mailsuite.maillog"
log = Logger(namespace=NAMESPACE)


def quote(value: object) -> str:
    """A field value: as is when it is one plain word, else in double quotes, escaped."""
    text = str(value)
    if text and not any(c in text for c in ' "\\=\t') and text.isprintable():
        return text
    return f'"{_escape(text)}"'


def line(queue_id: str, **fields: Any) -> str:
    """`queue_id=<id> key=value ...`, fields in the given order; None values are left out."""
    parts = [f"queue_id={queue_id}"]
    for key, value in fields.items():
        if value is None:
            continue
        if key in _VERBATIM:
            parts.append(f"{key}={value}")
        elif key in _ALWAYS_QUOTED:
            parts.append(f'{key}="{_escape(str(value))}"')
        else:
            parts.append(f"{key}={quote(value)}")
    return " ".join(parts)


# Fields whose values we format ourselves (addresses in <>, a delay with its unit, a count).
_VERBATIM = frozenset({"from", "to", "orig_to", "delay", "nrcpt", "size", "attempts", "accepted"})
# Always in quotes, so a reader's pattern does not depend on the text (`detail="..."`).
_ALWAYS_QUOTED = frozenset({"detail"})


def received(entry: QueueEntry, size: int) -> None:
    """The message is spooled (fsynced): the server is about to answer 250."""
    protocol = entry.meta.get("protocol", "")
    _emit("info", line(entry.id, **{"from": _angle(entry.sender)}, size=size,
                       nrcpt=len(entry.recipients), client=entry.meta.get("client_ip", ""),
                       protocol=protocol, status="queued"),
          maillog_event="received", entry=entry, size=size, protocol=protocol)


def attempt(entry: QueueEntry, rcpt: Recipient, status: str, result: DeliveryResult,
            now: float, relay: str) -> None:
    """One delivery attempt for one recipient: the line every mail admin greps for."""
    detail = result.detail
    if rcpt.state == "bounced" and status == "bounced":
        detail = rcpt.last_error  # says why we gave up (e.g. expired)
    delay = max(now - entry.created, 0)
    fields: dict[str, Any] = {
        "from": _angle(entry.sender), "to": _angle(rcpt.address), "status": status,
        "delay": f"{delay:.1f}s", "relay": relay,
        "attempts": rcpt.attempts, "detail": detail,
    }
    if rcpt.original.lower() != rcpt.address.lower():
        fields["orig_to"] = _angle(rcpt.original)
    _emit("warn" if status == "deferred" else "info", line(entry.id, **fields),
          maillog_event="attempt", entry=entry, rcpt=rcpt, status=status, result=result,
          detail=detail, relay=relay, local=rcpt.local, delay=delay)


def sync() -> Any:
    """A Deferred that fires once every line emitted so far is in the log file (handed to the
    OS; mailsuite/logwriter.py): called before a delivery is recorded in the spool."""
    from mailsuite import logwriter

    return logwriter.flush_all()


def instance_gone(name: str) -> None:
    """Another process on the spool died (its liveness lock is free): we take its files over."""
    _emit("warn", line("-", status="instance-gone", instance=name,
                       detail="its lock is free; taking its spool files over"))


def removed(queue_id: str) -> None:
    """Every recipient is sent or bounced: the entry left the spool."""
    _emit("info", line(queue_id, status="removed"), maillog_event="removed", queue_id=queue_id)


def leftover(name: str) -> None:
    """A file a dead process left in the spool was removed (no acknowledged message is lost:
    staged files and messages without envelope never got their 250)."""
    queue_id = os.path.basename(name).lstrip(".").split(".", 1)[0]
    if not valid_queue_id(queue_id):
        queue_id = "-"  # a staged file: no queue id yet
    _emit("info", line(queue_id, status="cleanup", file=name,
                       detail="left behind by a crash"))


def damaged(queue_id: str, detail: str) -> None:
    """An entry we cannot work on (unreadable envelope, missing message): left for the admin."""
    _emit("error", line(queue_id, status="damaged", detail=detail,
                        hint=f"mailsuite queue show {queue_id}"),
          maillog_event="damaged", queue_id=queue_id, detail=detail)


def internal_error(queue_id: str, what: str, failure: Failure | None = None) -> None:
    """A bug or an unexpected error while working on the entry; it stays in the spool."""
    text = line(queue_id, status="error", detail=what)
    if failure is not None:
        log.failure("{text}", failure, text=text)
    else:
        _emit("error", text)


def environment_fault(queue_id: str, what: str, error: str) -> None:
    """An attempt stopped by the environment (EMFILE, EIO, a full disk under the spool): one
    line, no traceback; the entry stays and is attempted again later."""
    _emit("warn", line(queue_id, status="retry-later", detail=f"{what}: {error}"))


def normalised(queue_id: str, detail: str) -> None:
    """The courier made the message wire-safe before relaying it (NUL, bare CR/LF)."""
    _emit("warn", line(queue_id, status="normalised", detail=detail))


def dsn_queued(entry: QueueEntry, action: str, dsn_id: str, count: int) -> None:
    """A delivery status notification (RFC 3464) to the sender is in the queue."""
    _emit("info", line(entry.id, status="dsn-queued", action=action, to=_angle(entry.sender),
                       dsn=dsn_id, nrcpt=count),
          maillog_event="dsn-queued", entry=entry, action=action, dsn=dsn_id, count=count)


def dsn_skipped(entry: QueueEntry, action: str, reason: str) -> None:
    """No notification, e.g. for the null sender <> (never bounce a bounce)."""
    _emit("info", line(entry.id, status="dsn-skipped", action=action, detail=reason),
          maillog_event="dsn-skipped", entry=entry, action=action, detail=reason)


def dsn_failed(entry: QueueEntry, action: str, failure: Failure | None = None,
               error: str = "") -> None:
    """The notification could not be built or queued: a bug (`failure`, with its traceback)
    or an environment fault (`error`, one line; a bounce is then tried again later)."""
    text = line(entry.id, status="dsn-failed", action=action, to=_angle(entry.sender),
                detail=error or None)
    if failure is not None:
        log.failure("{text}", failure, text=text)
    else:
        _emit("warn" if error else "error", text)


def transaction(queue_id: str, domain: str, relay: str, tls: bool, tls_info: str,
                reused: bool, accepted: int, total: int) -> None:
    """One outbound SMTP transaction carried this message to `relay`."""
    _emit("info", line(queue_id, domain=domain, relay=relay, tls="yes" if tls else "no",
                       tls_info=tls_info or None, reused="yes" if reused else "no",
                       accepted=f"{accepted}/{total}"),
          maillog_event="transaction", queue_id=queue_id, domain=domain, relay=relay, tls=tls,
          tls_info=tls_info, reused=reused, accepted=accepted, total=total)


def route_failed(queue_id: str, domain: str, detail: str, relay: str | None = None) -> None:
    """An outbound step that failed before any recipient was answered (DNS, connect, TLS)."""
    _emit("info", line(queue_id, domain=domain, relay=relay, detail=detail),
          maillog_event="route-failed", queue_id=queue_id, domain=domain, relay=relay,
          detail=detail)


def _angle(address: str) -> str:
    return f"<{address}>"


def _escape(text: str) -> str:
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _emit(level: str, text: str, **facts: Any) -> None:
    getattr(log, level)("{text}", text=text, **facts)

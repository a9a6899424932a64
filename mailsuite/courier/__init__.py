"""Outbound SMTP delivery to other domains: MX routing, TLS, DSN, DKIM (issue 4).

`install(suite)` plugs three things into the queue runner:
- `remote_agent`: delivers remote recipients (mailsuite.courier.agent.RemoteAgent),
- `on_bounce` / `on_delay`: send RFC 3464 notifications to the envelope sender.
"""
from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mailsuite.config import ConfigError

log = Logger()


def install(suite: Any) -> None:
    """Plug remote delivery and bounce generation into suite.queue."""
    from mailsuite.courier.agent import RemoteAgent
    from mailsuite.courier.dkim import Signer

    cfg = suite.config.courier
    if cfg.relay_tls not in ("starttls", "tls", "none"):
        raise ConfigError(f'[courier] relay_tls must be "starttls", "tls" or "none", '
                          f'not {cfg.relay_tls!r}')
    if cfg.relay:
        from mailsuite.courier.mx import parse_hostport

        try:
            parse_hostport(cfg.relay, 25)
        except ValueError:
            raise ConfigError(f'[courier] relay = {cfg.relay!r} is not "host:port"')
    signer = Signer(suite.config.dkim_dir) if suite.config.dkim.sign else None
    notifier = Notifier(suite)
    suite.queue.remote_agent = RemoteAgent(suite, signer)
    suite.queue.on_bounce = notifier.bounce
    suite.queue.on_delay = notifier.delay


class Notifier:
    """Sends DSNs from <> to the envelope sender, through the queue like any other message."""

    def __init__(self, suite: Any):
        self.suite = suite

    def bounce(self, entry: Any, recipients: list) -> defer.Deferred:
        return self._send(entry, recipients, "failed")

    def delay(self, entry: Any, recipients: list) -> defer.Deferred:
        return self._send(entry, recipients, "delayed")

    @defer.inlineCallbacks
    def _send(self, entry: Any, recipients: list, action: str) -> Any:
        from mailsuite.courier.dsn import build_dsn

        if not entry.sender or not recipients:
            # RFC 5321 §4.5.5 / RFC 3464 §2: never a notification about a notification.
            log.info("{queue_id}: no {action} notification (null sender)", queue_id=entry.id,
                     action=action)
            return None
        suite = self.suite
        path = suite.queue.spool.message_path(entry.id) if hasattr(suite.queue, "spool") \
            else None
        try:
            headers = yield suite.pools.io.run(_read_headers, path) if path else b""
        except OSError:
            headers = b""
        retry_until = entry.created + suite.config.queue.max_age if action == "delayed" else None
        data = build_dsn(entry, recipients, action, headers, suite.config.hostname,
                         retry_until=retry_until)
        try:
            route = yield suite.directory.route(entry.sender)
            queue_id = yield suite.queue.submit(
                "", [(entry.sender, route)], data,
                {"client_ip": "", "helo": suite.config.hostname, "auth_user": "",
                 "protocol": "DSN"})
        except Exception:
            log.failure("{queue_id}: could not queue the {action} notification to {sender}",
                        queue_id=entry.id, action=action, sender=entry.sender)
            return None
        log.info("{queue_id}: {action} notification to {sender} queued as {dsn_id} "
                 "({count} recipients)", queue_id=entry.id, action=action, sender=entry.sender,
                 dsn_id=queue_id, count=len(recipients))
        return queue_id


def _read_headers(path: str, limit: int = 256 * 1024) -> bytes:
    """The header section of the spooled message, read as bytes (8-bit safe)."""
    with open(path, "rb") as f:
        head = f.read(limit)
    end = head.find(b"\r\n\r\n")
    return head if end < 0 else head[:end + 2]


__all__ = ["install", "Notifier"]

"""Outbound SMTP delivery to other domains: MX routing, TLS, DSN, DKIM.

`agent.RemoteAgent` is the queue's DeliveryAgent for remote recipients, `notifier.Notifier` its
BounceNotifier; service.py builds both. `check_settings` validates the [courier] section at
start-up. Design notes: docs/design/courier.md.
"""
from __future__ import annotations

from mailsuite.config import ConfigError, CourierSection


def check_settings(settings: CourierSection) -> None:
    """Refuse a [courier] section we cannot act on, with a message saying what to change."""
    if settings.relay_tls not in ("starttls", "tls", "none"):
        raise ConfigError(f'[courier] relay_tls must be "starttls", "tls" or "none", '
                          f'not {settings.relay_tls!r}')
    if settings.relay:
        from mailsuite.courier.mx import parse_hostport

        try:
            parse_hostport(settings.relay, 25)
        except ValueError:
            raise ConfigError(f'[courier] relay = {settings.relay!r} is not "host:port"')


__all__ = ["check_settings"]

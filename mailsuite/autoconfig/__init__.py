"""Client autoconfiguration: the HTTP listener that tells mail clients their settings, the DNS
records to publish (`mailsuite dns`), and the first-run message.

service.py calls `server_factory(config, directory, clock)` for the `[listen] autoconfig`
endpoint and `first_run_message(config)` once at start-up.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from mailsuite.config import Config

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from mailsuite.directory.api import DirectoryService

log = Logger()


def server_factory(config: Config, directory: "DirectoryService",
                   clock: "IReactorTime | None" = None) -> Any:
    """The factory of the listener answering Mozilla autoconfig, Autodiscover and Apple
    profiles: a twisted.web Site behind the connection limits (docs/design/autoconfig.md)."""
    from mailsuite.autoconfig.records import mta_sts_policy
    from mailsuite.autoconfig.web import build_factory

    mta_sts_policy(config)  # a wrong [dns] mta_sts_mode stops start-up with one line
    return build_factory(config, directory, clock)


def first_run_message(config: Config) -> str | None:
    """What to do next when no domain exists yet (the first start on an empty data directory).

    Returns None when there is at least one domain, and on any error: a friendly message must
    never be the reason the server does not start.
    """
    try:
        if _has_domains(config):
            return None
        return _message(config)
    except Exception:
        log.failure("could not build the first-run message")
        return None


def _message(config: Any) -> str:
    from mailsuite.autoconfig.settings import client_servers

    cli = "mailsuite" + (f" --config {_shell_quote(config.path)}" if config.path else "")
    lines = [
        "mailsuite has no mail domain yet. Next steps:",
        f"  1. add your domain:   {cli} domain add example.org",
        f"  2. add a mailbox:     {cli} user add you@example.org   (asks for the password)",
        f"  3. publish DNS:       {cli} dns example.org",
        "  4. point Thunderbird at it: it finds these settings by itself (autoconfig), or enter:",
    ]
    names = {"imap": "IMAP", "pop3": "POP3", "smtp": "SMTP (outgoing)"}
    security = {"SSL": "SSL/TLS", "STARTTLS": "STARTTLS"}
    for entry in client_servers(config):
        lines.append(f"       {names[entry.protocol]:<16} server {entry.host}  port {entry.port:<5}"
                     f"  {security[entry.security]:<8}  normal password, "
                     "user name = the full address")
    if not client_servers(config):
        lines.append("       (no IMAP, POP3 or submission listener is enabled in [listen])")
    if "." not in config.hostname:
        # Clients, certificates and MX records need the public name, not the machine's short one.
        lines.append(f"  Set [server] hostname to this server's public name (now "
                     f"{config.hostname!r}): clients and DNS records use it.")
    return "\n".join(lines)


def _has_domains(config: Any) -> bool:
    return bool(hosted_domain_names(config))


def hosted_domain_names(config: Any) -> list[str]:
    """The hosted domains, read synchronously (start-up runs before the reactor, and the admin
    CLI has none). Raises mailsuite.directory.DirectoryError when the database cannot be read."""
    from mailsuite.directory.store import DirectoryStore

    store = DirectoryStore(config.database_url)
    try:
        return [d.name for d in store.list_domains()]
    finally:
        store.close()


def _shell_quote(path: str) -> str:
    import shlex

    return shlex.quote(path)

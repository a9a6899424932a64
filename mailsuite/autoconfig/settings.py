"""What a mail client needs to know about this server, derived from the configuration.

One place turns `[listen]` endpoint strings into (protocol, port, security) entries, so the
Mozilla autoconfig document, Autodiscover, the Apple profile, the first-run message and the
`mailsuite dns` SRV records all describe exactly the listeners that are running.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mailsuite.config import Config

# listen key -> (protocol, security). "SSL" is implicit TLS (RFC 8314), "STARTTLS" the upgrade
# command on a plain port. The MX port is not for clients and is not listed.
CLIENT_LISTENERS: dict[str, tuple[str, str]] = {
    "imaps": ("imap", "SSL"),
    "imap": ("imap", "STARTTLS"),
    "pop3s": ("pop3", "SSL"),
    "pop3": ("pop3", "STARTTLS"),
    "submissions": ("smtp", "SSL"),
    "submission": ("smtp", "STARTTLS"),
}

# Endpoint types whose first positional argument (or `port=`) is a TCP port.
_PORT_ENDPOINTS = {"tcp", "tcp6", "ssl", "ssl6"}


@dataclass(frozen=True)
class ClientServer:
    """One listener a client can use."""

    listener: str  # the [listen] key: "imaps", "submission", ...
    protocol: str  # "imap" | "pop3" | "smtp"
    security: str  # "SSL" (implicit TLS) | "STARTTLS"
    host: str
    port: int


def endpoint_port(description: str) -> int | None:
    """The TCP port of a Twisted server endpoint string, None if it has none we can tell.

    "tcp:2143:interface=127.0.0.1" -> 2143, "tcp:port=143" -> 143,
    "ssl:443:privateKey=k.pem" -> 443, "systemd:domain=INET:index=0" -> None.
    """
    parts = _split_endpoint(description)
    if not parts or parts[0].lower() not in _PORT_ENDPOINTS:
        return None
    positional = [p for p in parts[1:] if "=" not in p]
    keywords = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    value = keywords.get("port") or (positional[0] if positional else None)
    if value is None or not value.isdigit():
        return None
    port = int(value)
    return port if 0 < port < 65536 else None


def client_servers(config: Config) -> list[ClientServer]:
    """The enabled client listeners, preferred first (implicit TLS before STARTTLS, RFC 8314 §4)."""
    found = []
    for listener, (protocol, security) in CLIENT_LISTENERS.items():
        port = endpoint_port(getattr(config.listen, listener))
        if port is not None:
            found.append(ClientServer(listener, protocol, security, config.hostname, port))
    return found


def preferred(servers: list[ClientServer], protocol: str) -> ClientServer | None:
    for entry in servers:
        if entry.protocol == protocol:
            return entry
    return None


# An address we are willing to describe: a dot-atom-ish local part (RFC 5322 §3.2.3, plus the
# quoted-free characters clients actually send) and a DNS domain. Anything else is a 400; this is
# also what keeps markup out of the documents, on top of the XML escaping.
_LOCAL_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")
_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def parse_address(value: str) -> tuple[str, str] | None:
    """(address, lower-case domain) for a plausible mail address, None otherwise."""
    if not value or len(value) > 254:
        return None
    local, at, domain = value.strip().rpartition("@")
    if not at or not _LOCAL_RE.match(local):
        return None
    domain = valid_domain(domain)
    if domain is None:
        return None
    return f"{local}@{domain}", domain


def valid_domain(value: str) -> str | None:
    """The lower-case ASCII (IDNA) form of a domain name, None if it is not one."""
    value = value.strip().rstrip(".")
    try:
        value = value.encode("idna").decode("ascii").lower()
    except (UnicodeError, ValueError):
        return None
    labels = value.split(".")
    if len(value) > 253 or len(labels) < 2 or not all(_LABEL_RE.match(l) for l in labels):
        return None
    return value


def _split_endpoint(description: str) -> list[str]:
    r"""Split on unescaped colons, as twisted.internet.endpoints does ("\:" is a literal colon)."""
    parts, current, escaped = [], [], False
    for ch in description:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts if description else []

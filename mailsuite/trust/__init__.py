"""Inbound trust: what MX (and, by configuration, submission) decides about mail it receives.

docs/design/trust.md describes the whole; the pieces, each usable on its own:
- `dns.DnsClient`: the one caching resolver of the process (TTL-honouring) for every check;
- `spf`, `dkimcheck` (DKIM + ARC verification, ARC sealing), `dmarc`, `authresults`: sender
  authentication, giving `AuthResult`s and the Authentication-Results header;
- `srs`: Sender Rewriting Scheme for forwarded mail;
- `dnsbl`, `greylist`, `ratelimit`: decisions on the client before DATA;
- `rspamd`, `clamd`: content engines (`ContentScanner`);
- `gate`: the object the SMTP server calls at connect, MAIL, RCPT and the end of DATA.
Every check returns data (results, verdicts); only the SMTP server writes replies to clients.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from twisted.internet.defer import Deferred

if TYPE_CHECKING:  # the SMTP package imports this one
    from mailsuite.config import Config
    from mailsuite.smtp.replies import Reply

# What happens to a message: delivered as it is, delivered to the recipients' Junk folder with
# the $Junk keyword, refused for now (4xx), refused for good (5xx).
ACCEPT, JUNK, TEMPFAIL, REJECT = "accept", "junk", "tempfail", "reject"
_SEVERITY = {ACCEPT: 0, JUNK: 1, TEMPFAIL: 2, REJECT: 3}


@dataclass(frozen=True)
class Envelope:
    """Facts about one message, for checks and engines."""

    client_ip: str
    helo: str
    mail_from: str  # "" for the null reverse-path
    recipients: tuple[str, ...]
    auth_user: str | None = None
    tls: bool = False
    listener: str = "mx"  # "mx" | "submission"
    queue_id: str = ""  # our transaction id, for log lines and rspamd's Queue-Id


@dataclass(frozen=True)
class AuthResult:
    """One method's result for the Authentication-Results header (RFC 8601 §2.7).

    method: "spf" | "dkim" | "arc" | "dmarc"; result: that method's keyword ("pass", "fail",
    "softfail", "neutral", "none", "temperror", "permerror", "policy"); reason: free text;
    properties: ptype.property -> value, e.g. {"smtp.mailfrom": "a@b", "header.d": "b"}."""

    method: str
    result: str
    reason: str = ""
    properties: tuple[tuple[str, str], ...] = ()


@dataclass
class Verdict:
    """What one check or engine decided. `combine` keeps the most severe disposition.

    reply: the SMTP reply for TEMPFAIL/REJECT. headers: complete header fields (name: value, no
    CRLF) to prepend to the stored message, e.g. "X-Spam-Score: 7.2". results: for the
    Authentication-Results header. log: one line for the server log saying why."""

    disposition: str = ACCEPT
    reply: Reply | None = None
    headers: list[str] = field(default_factory=list)
    results: list[AuthResult] = field(default_factory=list)
    log: str = ""

    def combine(self, other: "Verdict") -> "Verdict":
        worse = other if _SEVERITY[other.disposition] > _SEVERITY[self.disposition] else self
        return Verdict(worse.disposition, worse.reply, self.headers + other.headers,
                       self.results + other.results,
                       "; ".join(x for x in (self.log, other.log) if x))


@runtime_checkable
class ContentScanner(Protocol):
    """A content engine (rspamd, clamd): looks at the whole message at the end of DATA.

    `scan` fires with a Verdict and never errbacks: an engine that is down or slow gives the
    configured failure verdict (TEMPFAIL with 451 4.7.1, or ACCEPT with a header saying the
    message was not scanned) and logs one line. `wanted(envelope)` says whether this engine
    scans mail of that listener at all ([rspamd]/[clamd] scan_submission)."""

    name: str

    def wanted(self, envelope: Envelope) -> bool:
        ...

    def scan(self, envelope: Envelope, message_path: str, size: int) -> Deferred:
        ...


def check_settings(config: "Config") -> None:
    """Refuse at start-up, in one line, a trust setting we could not act on."""
    from mailsuite.config import ConfigError

    choices = [("trust", "dmarc_reject", ("reject", "quarantine", "none")),
               ("trust", "dmarc_quarantine", ("quarantine", "none")),
               ("rspamd", "on_failure", ("tempfail", "accept")),
               ("rspamd", "reject_action", ("reject", "junk")),
               ("rspamd", "add_header_action", ("junk", "header")),
               ("clamd", "on_failure", ("tempfail", "accept"))]
    for section, key, allowed in choices:
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            raise ConfigError(f"[{section}] {key} must be one of "
                              f"{', '.join(repr(a) for a in allowed)}, not {value!r}")
    for section, key in [("trust", "dns_timeout"), ("dnsbl", "timeout"), ("rspamd", "timeout"),
                         ("clamd", "timeout")]:
        if getattr(getattr(config, section), key) <= 0:
            raise ConfigError(f"[{section}] {key} must be more than 0")
    url = config.rspamd.url
    if url and not (url.startswith("http://") or url.startswith("https://")):
        raise ConfigError(f"[rspamd] url must start with http:// or https://, not {url!r}")
    import ipaddress

    for section in ("ratelimit", "dnsbl"):
        for network in getattr(config, section).exempt_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ConfigError(f"[{section}] exempt_networks: {network!r} is not a network")

"""One typed configuration object, read from a TOML file.

Every part of mailsuite reads its settings from a `Config`; nobody else parses files. Defaults run
out of the box: data in ./mailsuite-data, SQLite, a self-signed certificate, every listener on
127.0.0.1 at an unprivileged port. Unknown keys and wrong types stop start-up with one line that
names the key (a misspelt `max_mesage_size` must not silently fall back to a default).
"""
from __future__ import annotations

import dataclasses
import os
import socket
import stat
import tomllib
from dataclasses import dataclass, field
from typing import Any, get_type_hints


class ConfigError(Exception):
    """A configuration problem, described in one line for the operator."""


@dataclass
class ServerSection:
    hostname: str = ""  # empty: the machine's name (see Config.hostname)
    data_dir: str = "mailsuite-data"
    # Where postmaster@<hosted domain> goes when no alias says otherwise (RFC 5321 §4.5.1).
    admin_address: str = ""
    # Processes serving the mail listeners on the same sockets (docs/design/architecture.md,
    # "Worker processes"); 1: this process alone; 0: one per CPU it may run on, at most
    # AUTO_WORKERS_MAX (Config.workers).
    workers: int = 0
    # The listeners those processes share; the others are served by the first process alone.
    # IMAP and POP3 stay there by default: a session's \Recent, its immediate change
    # notifications and its TLS resumption are per process (docs/design/architecture.md,
    # "Worker processes"). Any of mx, submission, submissions, imap, imaps, pop3, pop3s.
    worker_listeners: list[str] = field(
        default_factory=lambda: ["mx", "submission", "submissions"])


@dataclass
class DatabaseSection:
    url: str = ""  # empty: sqlite:///<data_dir>/mailsuite.db


@dataclass
class DirectorySection:
    # Seconds a successful password check is remembered (docs/design/directory.md, "Login
    # cache"); 0: every login runs argon2.
    login_cache_ttl: float = 300.0
    # Seconds the route of an existing recipient and a user's sender addresses are remembered
    # (docs/design/directory.md, "Lookup cache"); 0: every RCPT and MAIL asks the database.
    lookup_cache_ttl: float = 2.0


@dataclass
class ListenSection:
    # Twisted endpoint strings; "" disables a listener. TLS for the implicit-TLS ports is added
    # by mailsuite with the configured certificate, so these stay plain tcp: strings.
    mx: str = "tcp:2525:interface=127.0.0.1"
    submission: str = "tcp:2587:interface=127.0.0.1"
    submissions: str = "tcp:2465:interface=127.0.0.1"
    imap: str = "tcp:2143:interface=127.0.0.1"
    imaps: str = "tcp:2993:interface=127.0.0.1"
    pop3: str = "tcp:2110:interface=127.0.0.1"
    pop3s: str = "tcp:2995:interface=127.0.0.1"
    autoconfig: str = "tcp:2080:interface=127.0.0.1"
    # Prometheus scrapes GET /metrics here (docs/design/metrics.md); keep it on loopback.
    metrics: str = "tcp:9425:interface=127.0.0.1"
    # The admin web dashboard over HTTPS (TLS added by mailsuite, like imaps; docs/design/
    # admin-web.md). On loopback here; reach it from elsewhere through an SSH tunnel.
    admin: str = "tcp:8443:interface=127.0.0.1"
    # Listeners behind a load balancer that opens each connection with a PROXY protocol header
    # (v1 or v2; docs/design/limits.md, "Behind a proxy"), e.g. ["mx", "imaps"]. Only peers in
    # trusted_proxies (networks, e.g. "10.0.0.5/32") may connect to them; others are closed.
    proxy_protocol: list[str] = field(default_factory=list)
    trusted_proxies: list[str] = field(default_factory=list)


@dataclass
class TLSSection:
    cert: str = ""  # PEM paths; empty = self-signed in <data_dir>/tls/
    key: str = ""


@dataclass
class LimitsSection:
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_line_length: int = 1000  # octets including CRLF (RFC 5321 §4.5.3.1.6)
    smtp_timeout: int = 300  # idle seconds before 421 (RFC 5321 §4.5.3.2 suggests >= 5 minutes)
    max_connections: int = 500
    max_connections_per_ip: int = 20
    max_auth_failures: int = 3  # per connection, then the connection is closed
    auth_failure_delay: float = 1.0  # seconds added per failed login
    # Failed logins of one account from everywhere before its failures are slowed too (capped
    # at auth_user_max_delay, so guessers cannot lock the owner out: docs/design/limits.md).
    auth_user_failures: int = 10
    auth_user_max_delay: float = 3.0
    auth_source_failures: int = 20  # failures of one address across accounts before slowing all
    imap_timeout: int = 1800  # RFC 3501 §5.4: at least 30 minutes
    pop3_timeout: int = 600
    # Connection fairness (docs/design/limits.md). "Pre-auth": not logged in yet; on MX and
    # autoconfig, which never authenticate, every connection.
    preauth_share_percent: int = 50  # of max_connections; the rest is kept for logged-in sessions
    max_preauth_per_ip: int = 10  # pre-auth connections of one address (logins: MX uses per_ip)
    max_preauth_per_prefix: int = 50  # pre-auth connections of one /24 (IPv4) or /64 (IPv6)
    preauth_timeout: int = 60  # seconds to log in, then the connection is closed (not MX)
    evict_idle_after: float = 10.0  # a full pool drops its slowest connection idle this long
    progress_bytes: int = 4096  # octets received that count as progress, like a command
    max_open_files: int = 0  # connections of all listeners; 0 = RLIMIT_NOFILE less a reserve
    listener_files_percent: int = 50  # of that budget, what one listener may hold


@dataclass
class SMTPSection:
    """[smtp]: what the SMTP server accepts, beyond [limits] (docs/design/smtp.md)."""

    # NUL, bare CR or bare LF in DATA: "reject" (550 after the final dot) or "normalise" (bare
    # CR/LF stored as CRLF; NUL is refused either way).
    bad_line_endings: str = "reject"
    # Submission: every From:/Sender: address must be one the authenticated user may send as.
    check_from_header: bool = True
    # Commands a connection may send per second before AUTH (averaged over 10 s; a message
    # accepted gives its commands back), else 421 and close.
    max_commands_per_second: int = 50
    # Submission: seconds from connect to a successful AUTH, else 421 and close.
    auth_timeout: int = 120


@dataclass
class IMAPSection:
    """[imap]: IMAP protocol limits, beyond [limits] (docs/design/imap.md, "Limits")."""
    # Octets of a command line, and of all literals of one command, before login: 32 KiB holds
    # the largest ID command RFC 2971 §3.3 allows (30 pairs of 1024-octet values).
    preauth_max_line: int = 32768  # longer: BAD and close
    preauth_max_literal: int = 32768
    max_commands_per_second: int = 20  # before login; a faster client is slowed down
    login_timeout: int = 60  # seconds from connecting to a successful login, then BYE
    append_spool_threshold: int = 65536  # APPEND literals larger than this go to a file, not RAM
    # Folder indexes no session uses, kept in memory for a cheap re-open (docs/design/maildir.md,
    # "Folder states in memory"): at most this many, and at most this many MiB (estimated).
    max_cached_folders: int = 32
    folder_cache_mb: int = 8
    # Seconds between IDLE's own checks of the selected folder; change notifications wake it
    # at once (docs/design/imap.md, "IDLE"), this catches what nobody announced.
    idle_poll: float = 0.5


@dataclass
class MailboxSection:
    """[mailbox]: folder locks (docs/design/maildir.md, "The dotlock")."""
    # Seconds a session waits for a folder another session or process has locked; then IMAP
    # NO [INUSE], POP3 -ERR [IN-USE]. The wait holds no io thread.
    lock_wait: float = 5.0
    # A dotlock of another host older than this is taken over (Dovecot's default); locks of
    # this host are taken over as soon as their process is gone.
    stale_lock_seconds: float = 120.0


@dataclass
class POP3Section:
    """[pop3]: POP3 protocol limits, beyond [limits] (docs/design/pop3.md, "Limits")."""

    max_commands_per_second: int = 20  # before login; a burst of this many, then closed; 0 = off
    login_timeout: int = 60  # seconds from connect to a successful login, then -ERR and closed


@dataclass
class QueueSection:
    # Seconds between attempts; the last value repeats until max_age.
    retry_schedule: list[int] = field(default_factory=lambda: [300, 600, 1200, 2400, 3600])
    max_age: int = 5 * 24 * 3600
    delay_warning: int = 4 * 3600  # 0 disables delay warnings
    max_received_headers: int = 50
    scan_interval: float = 30.0  # how often the runner looks for due entries


@dataclass
class CourierSection:
    nameservers: list[str] = field(default_factory=list)  # "host:port"; empty = system resolver
    mx_port: int = 25
    relay: str = ""  # smarthost "host:port"; empty = deliver by MX
    relay_username: str = ""
    relay_password: str = ""
    relay_tls: str = "starttls"  # "starttls" | "tls" (implicit) | "none"
    # Verify the smarthost's certificate (and that of require_tls_domains) against relay_cafile,
    # or the system trust store when it is empty. relay_verify = false: encrypt, trust anything.
    relay_verify: bool = True
    relay_cafile: str = ""
    require_tls_domains: list[str] = field(default_factory=list)
    connect_timeout: int = 30
    command_timeout: int = 300
    max_connections_per_domain: int = 5


@dataclass
class DKIMSection:
    selector: str = "mail"
    sign: bool = True


@dataclass
class Config:
    server: ServerSection = field(default_factory=ServerSection)
    database: DatabaseSection = field(default_factory=DatabaseSection)
    directory: DirectorySection = field(default_factory=DirectorySection)
    listen: ListenSection = field(default_factory=ListenSection)
    tls: TLSSection = field(default_factory=TLSSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    smtp: SMTPSection = field(default_factory=SMTPSection)
    imap: IMAPSection = field(default_factory=IMAPSection)
    pop3: POP3Section = field(default_factory=POP3Section)
    mailbox: MailboxSection = field(default_factory=MailboxSection)
    queue: QueueSection = field(default_factory=QueueSection)
    courier: CourierSection = field(default_factory=CourierSection)
    dkim: DKIMSection = field(default_factory=DKIMSection)
    dns: DNSSection = field(default_factory=lambda: DNSSection())  # defined at the end
    trust: TrustSection = field(default_factory=lambda: TrustSection())
    dnsbl: DNSBLSection = field(default_factory=lambda: DNSBLSection())
    greylist: GreylistSection = field(default_factory=lambda: GreylistSection())
    rspamd: RspamdSection = field(default_factory=lambda: RspamdSection())
    clamd: ClamdSection = field(default_factory=lambda: ClamdSection())
    ratelimit: RateLimitSection = field(default_factory=lambda: RateLimitSection())
    srs: SRSSection = field(default_factory=lambda: SRSSection())
    reports: ReportsSection = field(default_factory=lambda: ReportsSection())
    events: EventsSection = field(default_factory=lambda: EventsSection())
    path: str = ""  # the file this came from, "" for built-in defaults

    # Derived values: every part uses these rather than re-deriving paths.
    @property
    def hostname(self) -> str:
        return self.server.hostname or socket.gethostname()

    @property
    def workers(self) -> int:
        """How many processes serve the mail listeners: [server] workers, or for 0 one per
        CPU this process may run on (its affinity: a container's or a systemd CPUAffinity
        share, not the machine's), at most AUTO_WORKERS_MAX."""
        if self.server.workers:
            return self.server.workers
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        return max(1, min(cpus, AUTO_WORKERS_MAX))

    @property
    def data_dir(self) -> str:
        return os.path.abspath(self.server.data_dir)

    @property
    def database_url(self) -> str:
        return self.database.url or "sqlite:///" + os.path.join(self.data_dir, "mailsuite.db")

    @property
    def mail_dir(self) -> str:
        return os.path.join(self.data_dir, "mail")

    @property
    def queue_dir(self) -> str:
        return os.path.join(self.data_dir, "queue")

    @property
    def tls_dir(self) -> str:
        return os.path.join(self.data_dir, "tls")

    @property
    def dkim_dir(self) -> str:
        return os.path.join(self.data_dir, "dkim")


# [server] workers = 0 starts at most this many processes: beyond, each adds its base memory and
# its own pools for a share of the work the shared spool and folder locks serialise anyway.
AUTO_WORKERS_MAX = 8
MAX_CONFIG_SIZE = 1024 * 1024  # octets: a configuration file is a few kilobytes


def load(path: str | None = None) -> Config:
    """Read `path` (TOML) over the defaults; None gives the built-in defaults.

    Every problem is one ConfigError line: an empty name (`--config ''` is a mistake, not "no
    file"), a file that is missing, unreadable, larger than MAX_CONFIG_SIZE, not UTF-8 or not
    TOML, an unknown key, a wrong type, a NUL character in a string."""
    if path is None:
        return Config()
    if not isinstance(path, str) or not path.strip():
        raise ConfigError("the configuration file name is empty (omit --config for the "
                          "built-in defaults)")
    if "\x00" in path:
        raise ConfigError(f"the configuration file name {path!r} contains a NUL character")
    raw = _parse(path, _read(path))
    config = Config(path=os.path.abspath(path))
    hints = get_type_hints(Config)
    for section_name, values in raw.items():
        if section_name == "path" or section_name not in hints:
            raise ConfigError(f"{path}: unknown section [{section_name}]")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: [{section_name}] must be a table")
        section = getattr(config, section_name)
        _apply(path, section_name, section, values)
    # Relative data_dir in a file means relative to the current directory, as on the command line.
    return config


def _read(path: str) -> bytes:
    try:
        # A FIFO would block the open until a writer comes, a device could be endless: only a
        # regular file (or a link to one) is a configuration file.
        if os.path.exists(path) and not os.path.isdir(path) and \
                not stat.S_ISREG(os.stat(path).st_mode):
            raise ConfigError(f"configuration file {path} is not a regular file")
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_SIZE + 1)  # the file may grow while we read
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist")
    except PermissionError:
        raise ConfigError(f"configuration file {path} is not readable")
    except IsADirectoryError:
        raise ConfigError(f"configuration file {path} is a directory")
    except (OSError, ValueError) as e:
        raise ConfigError(f"configuration file {path}: {getattr(e, 'strerror', None) or e}")
    if len(data) > MAX_CONFIG_SIZE:
        raise ConfigError(f"configuration file {path} is larger than {MAX_CONFIG_SIZE} octets")
    return data


def _parse(path: str, data: bytes) -> dict:
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 (at octet {e.start})")
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}")
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: nested too deeply")


def _apply(path: str, section_name: str, section: Any, values: dict) -> None:
    hints = get_type_hints(type(section))
    names = {f.name for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{path}: unknown key '{key}' in [{section_name}]")
        setattr(section, key, _check_type(path, f"{section_name}.{key}", hints[key], value))


def _check_type(path: str, where: str, hint: Any, value: Any) -> Any:
    origin = getattr(hint, "__origin__", None)
    if origin is list:
        (item,) = hint.__args__
        if not isinstance(value, list):
            raise ConfigError(f"{path}: {where} must be a list")
        return [_check_type(path, where, item, v) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{path}: {where} must be of type {hint.__name__}, not "
                          f"{_short(repr(value))}")
    if isinstance(value, str) and "\x00" in value:
        raise ConfigError(f"{path}: {where} contains a NUL character")
    return value


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class DNSSection:
    """What `mailsuite dns` tells the operator to publish (and the MTA-STS policy served)."""

    dmarc_policy: str = "quarantine"  # p= of _dmarc: "none" to only watch, "reject" once sure
    dmarc_rua: str = ""  # aggregate reports, e.g. "mailto:dmarc@example.org"; "" = none
    mta_sts_mode: str = ""  # RFC 8461: "" = no MTA-STS; "testing" | "enforce" | "none"
    mta_sts_max_age: int = 7 * 24 * 3600
    tlsrpt_rua: str = ""  # RFC 8460, e.g. "mailto:tlsrpt@example.org"; "" = no TLS-RPT record


@dataclass
class TrustSection:
    """[trust]: how MX judges what it receives (docs/design/trust.md)."""

    enabled: bool = True  # SPF, DKIM, ARC, DMARC and Authentication-Results on MX
    authserv_id: str = ""  # RFC 8601 authserv-id; empty: the host name
    # What a failing message whose From: domain publishes p=reject gets: "reject" (550 5.7.1
    # after DATA), "quarantine" (the recipient's Junk folder with $Junk) or "none" (delivered).
    dmarc_reject: str = "reject"
    dmarc_quarantine: str = "quarantine"  # the same for p=quarantine: "quarantine" | "none"
    dns_timeout: float = 10.0  # seconds for all DNS queries of one check, then temperror
    junk_folder: str = "Junk"


@dataclass
class DNSBLSection:
    """[dnsbl]: DNS block and allow lists on the client address, checked at RCPT on MX."""

    # Postfix postscreen syntax: "zone[=filter]*weight"; the filter is one address pattern with
    # [a..b] ranges and ";" alternatives, e.g. "zen.spamhaus.org=127.0.0.[2..11]*3"; a negative
    # weight makes an allow list, e.g. "list.dnswl.org=127.0.[0..255].[1..3]*-5".
    sites: list[str] = field(default_factory=list)
    threshold: int = 1  # a total weight this high or higher refuses the client (554 5.7.1)
    timeout: float = 5.0  # seconds per query; a zone that does not answer counts as unlisted
    # Client networks never looked up (local programs sending through MX).
    exempt_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])


@dataclass
class GreylistSection:
    """[greylist]: temporary refusal of unknown (client network, sender, recipient) triplets."""

    enabled: bool = False
    delay: int = 300  # seconds before a retry of the same triplet is accepted
    retry_window: int = 2 * 24 * 3600  # a triplet not retried within this is forgotten
    pass_ttl: int = 35 * 24 * 3600  # a client network that retried once passes this long


@dataclass
class RspamdSection:
    """[rspamd]: content scanning by rspamd's HTTP protocol (/checkv2)."""

    url: str = ""  # "" = off; e.g. "http://127.0.0.1:11333"
    password: str = ""
    timeout: float = 20.0
    on_failure: str = "tempfail"  # rspamd down or slow: "tempfail" (451 4.7.1) or "accept"
    reject_action: str = "reject"  # rspamd's "reject": "reject" (550 5.7.1) or "junk"
    add_header_action: str = "junk"  # "add header"/"rewrite subject": "junk" or "header"
    scan_submission: bool = False  # also scan what our own users send
    max_size: int = 20 * 1024 * 1024  # larger messages are not scanned (a header says so)


@dataclass
class ClamdSection:
    """[clamd]: virus scanning by clamd's INSTREAM command."""

    socket: str = ""  # "" = off; a unix socket path, or "tcp:host:port"
    timeout: float = 30.0
    on_failure: str = "tempfail"  # clamd down or slow: "tempfail" (451 4.7.1) or "accept"
    scan_submission: bool = False
    max_size: int = 25 * 1024 * 1024  # clamd's StreamMaxLength; larger: not scanned (header)


@dataclass
class RateLimitSection:
    """[ratelimit]: per-client and per-user rates, counted in the SQL directory (so shared by
    every instance on it). 0 disables a limit."""

    mx_connections_per_minute: int = 60  # per client address, 421 4.7.0
    mx_recipients_per_minute: int = 300  # per client address, 450 4.7.1
    submission_messages_per_hour: int = 200  # per authenticated user, 450 4.7.1
    submission_recipients_per_hour: int = 1000  # per authenticated user, 450 4.7.1
    # Client networks the MX limits do not count (Postfix's smtpd_client_event_limit_exceptions).
    exempt_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])


@dataclass
class SRSSection:
    """[srs]: Sender Rewriting Scheme for mail an alias forwards to another domain."""

    domain: str = ""  # the domain of rewritten senders; empty: the host name
    max_age_days: int = 21  # a bounce to an older SRS address is refused


@dataclass
class ReportsSection:
    """[reports]: DMARC aggregate and TLS-RPT reports, received and sent (docs/design/reports.md)."""

    # Where other domains' reports arrive (a local user or alias); "" = reports are not read.
    address: str = ""
    # From: and MAIL FROM of the reports we send ("from" is a Python keyword, hence "sender");
    # "" = nothing is recorded and no report is sent.
    sender: str = ""
    org_name: str = ""  # names us in the reports we send; empty: the host name
    scan_interval: float = 60.0  # seconds between looks at the address's INBOX for new reports
    send_at: int = 600  # seconds after midnight UTC when the previous day's reports go out
    keep_days: int = 14  # recorded evaluations and TLS sessions are removed after this many days


@dataclass
class EventsSection:
    """[events]: message events for `mailsuite trace` and the per-minute/hour statistics, in
    the SQL directory (docs/design/events.md)."""

    retention_days: float = 30.0  # events kept this long; 0: no events recorded
    stats_minutes_days: float = 2.0  # per-minute buckets kept this long; 0: none
    stats_hours_days: float = 400.0  # per-hour buckets kept this long; 0: none
    flush_interval: float = 1.0  # seconds an event may wait in memory before its batch is written
    batch_size: int = 500  # events in one INSERT batch; a full batch is written at once
    max_pending: int = 50_000  # events held while the database is down; then the oldest go

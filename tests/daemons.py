"""Private rspamd and clamd instances for tests: loopback only, free ports, everything (config,
databases, logs, sockets, pid files) under one temporary directory, stopped by killing their
process group. See docs/design/trust-engines.md, "Tests".

    with RspamdDaemon(tmp_dir) as rspamd:   # rspamd.url -> "http://127.0.0.1:<port>"
        ...
    with ClamdDaemon(tmp_dir) as clamd:     # clamd.socket (a unix path), clamd.tcp
        ...                                 # ("tcp:127.0.0.1:<port>")

A private Prometheus scraping mailsuite's metrics listener (tests/interop/test_prometheus.py):

    with PrometheusDaemon(tmp_dir, targets=["127.0.0.1:<metrics port>"]) as prometheus:
        prometheus.query("sum(mailsuite_messages_accepted_total)")   # -> [(labels, value)]

Postfix and Dovecot beside mailsuite (tests/interop, bench/compare.py): PrivatePostfix (its own
config and queue directory, `postfix -c DIR start`) and PrivateDovecot (`dovecot -F -c FILE`,
IMAP/IMAPS on loopback, passwd-file users); both need root.

HAProxy in front of mailsuite instances (tests/interop/test_haproxy.py): PrivateHAProxy runs
etc/haproxy.cfg.example as it is (`haproxy -f FILE -db`), its addresses and ports given through
the environment variables that file reads.

A missing binary skips the test (fails under CI) through tests.environment.require_program.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request

from tests.environment import require_program
from tests.harness import free_port
from tests.polling import wait_until

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
# Our own body signature for the EICAR string (clamd's .ndb format,
# Name:TargetType:Offset:HexSignature; type 0 = any file, offset * = anywhere). With ScanMail
# clamd decodes MIME parts, so the string matches inside a base64 attachment too. clamd reports
# signatures from databases it does not know as "<Name>.UNOFFICIAL".
EICAR_SIGNATURE = "Mailsuite.Test.EICAR"
EICAR_FOUND = EICAR_SIGNATURE + ".UNOFFICIAL"


class Daemon:
    """A process in its own session (process group), stopped with SIGTERM, then SIGKILL."""

    name = "daemon"
    start_timeout = 30.0

    def __init__(self, base: str):
        self.base = base
        os.makedirs(base, exist_ok=True)
        self.process: subprocess.Popen | None = None
        self.started_in = 0.0  # seconds from spawn to the first answer
        self.log_path = os.path.join(base, f"{self.name}.out")

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        """The daemon's environment; None: ours."""
        return None

    def answers(self) -> bool:
        raise NotImplementedError

    def start(self) -> "Daemon":
        command = self.command()
        started = time.monotonic()
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            cwd=self.base, env=self.environment())

        def up() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n"
                                     + self.log_tail())
            return self.answers()

        try:
            wait_until(up, timeout=self.start_timeout, interval=0.05,
                       message=f"{self.name} to answer")
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - started
        return self

    def signal(self, sig: int) -> None:
        """Send `sig` to the whole process group (e.g. SIGSTOP to make the daemon hang)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def stop(self) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        try:
            os.killpg(process.pid, signal.SIGCONT)
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        # Workers may outlive the main process for a moment: kill what is left of the group.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if process.poll() is None:
            process.wait(timeout=10)

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for path in self.logs():
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"--- {path}\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(out)

    def logs(self) -> list[str]:
        return [self.log_path]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class PrometheusDaemon(Daemon):
    """Prometheus with its own configuration and TSDB under `base`, its web API on a free
    loopback port, scraping `targets` every `interval` seconds as job "mailsuite"."""

    name = "prometheus"
    start_timeout = 60.0

    def __init__(self, base: str, targets: list[str], interval: int = 1):
        super().__init__(base)
        self.binary = require_program("prometheus", "prometheus")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = os.path.join(base, "prometheus.yml")
        _write(self.config_path,
               f"global:\n  scrape_interval: {interval}s\n  evaluation_interval: {interval}s\n"
               "scrape_configs:\n  - job_name: mailsuite\n    static_configs:\n"
               f"      - targets: [{', '.join(repr(t) for t in targets)}]\n")

    def command(self) -> list[str]:
        return [self.binary, f"--config.file={self.config_path}",
                f"--storage.tsdb.path={os.path.join(self.base, 'data')}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """An instant query through the HTTP API: (labels, value) of each series."""
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as r:
            answer = json.load(r)
        assert answer["status"] == "success", answer
        return [(series["metric"], float(series["value"][1]))
                for series in answer["data"]["result"]]


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


class RspamdDaemon(Daemon):
    """rspamd 3.x with the distribution's /etc/rspamd/rspamd.conf and our LOCAL_CONFDIR.

    Only the normal (scanner) worker runs, on a free loopback port; controller and proxy are
    off. Modules that ask the network (DNS lists, SPF/DKIM/DMARC, fuzzy, map downloads) or keep
    state in Redis (greylisting, rate limits, history, reputation, neural) are off, so verdicts
    are the same on every run and offline. The URL matcher gets a short TLD list: compiling the
    full public suffix list is most of rspamd's start-up time (about 11 s here)."""

    name = "rspamd"
    DISABLED_MODULES = (
        "antivirus", "arc", "asn", "bayes_expiry", "clickhouse", "dcc", "dkim_signing", "dmarc",
        "elastic", "emails", "external_services", "force_actions", "fuzzy_check", "greylist",
        "hfilter", "history_redis", "metadata_exporter", "metric_exporter", "mid",
        "milter_headers", "mime_types", "multimap", "mx_check", "neural", "once_received",
        "phishing", "ratelimit", "rbl", "replies", "reputation", "spf", "surbl",
        "url_redirector", "whitelist")

    def __init__(self, base: str, actions: dict[str, float] | None = None):
        super().__init__(base)
        self.binary = require_program("rspamd", "rspamd")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.actions = actions or {}
        self.local = os.path.join(base, "local")
        for sub in ("db", "run", "log"):
            os.makedirs(os.path.join(base, sub), exist_ok=True)
        self._configure()

    def _configure(self) -> None:
        local, override = os.path.join(self.local, "local.d"), os.path.join(self.local,
                                                                           "override.d")
        _write(os.path.join(override, "worker-normal.inc"),
               f'bind_socket = "127.0.0.1:{self.port}";\ncount = 1;\n')
        for worker in ("controller", "proxy"):
            _write(os.path.join(override, f"worker-{worker}.inc"),
                   f'bind_socket = "127.0.0.1:{free_port()}";\ncount = -1;\n')
        tld = os.path.join(self.base, "tld.dat")
        _write(tld, "com\nnet\norg\ntest\nexample\ninvalid\n")
        _write(os.path.join(local, "options.inc"),
               f'filters = "regexp,chartable";\nurl_tld = "{tld}";\n'
               f'tempdir = "{self.base}";\n')
        _write(os.path.join(local, "redis.conf"), 'servers = "127.0.0.1:6379";\n')
        _write(os.path.join(local, "logging.inc"), 'level = "info";\n')
        for module in self.DISABLED_MODULES:
            _write(os.path.join(local, f"{module}.conf"), "enabled = false;\n")
        if self.actions:
            _write(os.path.join(local, "actions.conf"),
                   "".join(f"{k} = {v};\n" for k, v in self.actions.items()))

    def command(self) -> list[str]:
        b = self.base
        return [self.binary, "-f", "-i", "-c", "/etc/rspamd/rspamd.conf",
                f"--var=LOCAL_CONFDIR={self.local}", f"--var=DBDIR={b}/db",
                f"--var=RUNDIR={b}/run", f"--var=LOGDIR={b}/log"]

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/ping", timeout=1) as r:
                return r.status == 200 and r.read().strip() == b"pong"
        except OSError:
            return False

    def logs(self) -> list[str]:
        return [self.log_path, os.path.join(self.base, "log", "rspamd.log")]


class ClamdDaemon(Daemon):
    """clamd with a private clamd.conf and a one-signature database we write (no freshclam:
    no network), listening on a unix socket and a free loopback TCP port."""

    name = "clamd"

    def __init__(self, base: str, stream_max: str = "25M"):
        super().__init__(base)
        self.binary = require_program("clamd", "clamav-daemon")
        self.port = free_port()
        self.socket = os.path.join(base, "clamd.sock")
        self.tcp = f"tcp:127.0.0.1:{self.port}"
        self.conf = os.path.join(base, "clamd.conf")
        db = os.path.join(base, "db")
        _write(os.path.join(db, "mailsuite-test.ndb"),
               f"{EICAR_SIGNATURE}:0:*:{EICAR.hex()}\n")
        _write(self.conf, "\n".join([
            "Foreground yes",
            f"LocalSocket {self.socket}",
            "FixStaleSocket yes",
            f"TCPSocket {self.port}",
            "TCPAddr 127.0.0.1",
            f"DatabaseDirectory {db}",
            f"LogFile {os.path.join(base, 'clamd.log')}",
            f"PidFile {os.path.join(base, 'clamd.pid')}",
            f"TemporaryDirectory {base}",
            f"StreamMaxLength {stream_max}",
            "ScanMail yes",
            "SelfCheck 0",
            "",
        ]))

    def command(self) -> list[str]:
        return [self.binary, "-c", self.conf]

    def answers(self) -> bool:
        if not os.path.exists(self.socket):
            return False
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(self.socket)
                s.sendall(b"zPING\0")
                return s.recv(64).rstrip(b"\0") == b"PONG"
        except OSError:
            return False

    def logs(self) -> list[str]:
        return [self.log_path, os.path.join(self.base, "clamd.log")]


# -- Postfix and Dovecot: private instances beside mailsuite (interop tests, bench/compare.py) --
POSTFIX_MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix_binary() -> str | None:
    found = shutil.which("postfix")
    return found or ("/usr/sbin/postfix" if os.path.exists("/usr/sbin/postfix") else None)


def postfix_unusable() -> str | None:
    """Why a private Postfix cannot run here, or None."""
    if postfix_binary() is None:
        return "Postfix is not installed (Debian package postfix)"
    if os.geteuid() != 0:
        return "starting a private Postfix instance needs root"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "the postfix user does not exist (package not configured)"
    return None


class PrivatePostfix:
    """One Postfix instance with its own config_directory, queue_directory and log under `base`,
    smtpd on 127.0.0.1:`port` only, no chroot; started with `postfix -c DIR start` (needs
    root). `main` is merged over the generic main.cf below (the caller says where mail goes);
    `services` are extra master.cf lines (e.g. a submission smtpd on another port)."""

    def __init__(self, base: str, main: dict[str, str], services: list[str] = ()):
        self.base = base
        self.port = free_port()
        self.config_dir = os.path.join(base, "etc")
        self.queue_dir = os.path.join(base, "spool")
        self.log_path = os.path.join(base, "postfix.log")
        pw = pwd.getpwnam("postfix")
        data_dir = os.path.join(base, "data")
        for d in (self.config_dir, self.queue_dir, data_dir):
            os.makedirs(d, exist_ok=True)
        os.chmod(base, 0o755)
        os.chown(data_dir, pw.pw_uid, pw.pw_gid)
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": data_dir,
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "mydestination": "",
            "alias_maps": "",
            "alias_database": "",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "maillog_file": self.log_path,
            "maillog_file_prefixes": base,
            "biff": "no",
            "shlib_directory": "/usr/lib/postfix",
            "smtputf8_enable": "no",
            **main,
        }
        with open(os.path.join(self.config_dir, "main.cf"), "w") as f:
            f.writelines(f"{k} = {v}\n" for k, v in settings.items())
        with open(os.path.join(self.config_dir, "master.cf"), "w") as f:
            f.write(POSTFIX_MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
            f.writelines(line + "\n" for line in services)
        # dynamicmaps.cf lists the map types in shared libraries (inline: and static: are built in).
        if os.path.exists("/etc/postfix/dynamicmaps.cf"):
            shutil.copy("/etc/postfix/dynamicmaps.cf", os.path.join(self.config_dir,
                                                                    "dynamicmaps.cf"))

    def postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([postfix_binary(), "-c", self.config_dir, *args],
                              capture_output=True, text=True, timeout=timeout)

    def start(self, timeout: float = 30) -> "PrivatePostfix":
        result = self.postfix("start")
        if result.returncode != 0:
            raise RuntimeError(f"postfix start failed: {result.stdout}{result.stderr}"
                               f"{self.log_text()}")
        try:
            wait_until(lambda: _listening(self.port), timeout=timeout, interval=0.1)
        except AssertionError:
            raise RuntimeError(f"postfix did not listen on {self.port}: {self.log_text()}")
        return self

    def master_pid(self) -> int | None:
        try:
            with open(os.path.join(self.queue_dir, "pid", "master.pid")) as f:
                pid = int(f.read().strip())
            os.kill(pid, 0)
            return pid
        except (ValueError, ProcessLookupError, FileNotFoundError):
            return None

    def stop(self) -> None:
        self.postfix("stop")
        try:
            wait_until(lambda: self.master_pid() is None, timeout=10, interval=0.1)
        except AssertionError:
            pass  # the caller removes the directory anyway; Postfix logs why it lingered

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


def dovecot_unusable() -> str | None:
    """Why a private Dovecot IMAP server cannot run here, or None."""
    if shutil.which("dovecot") is None:
        return "Dovecot is not installed (Debian package dovecot-core)"
    if not os.path.exists("/usr/lib/dovecot/imap"):
        return "Dovecot's IMAP server is not installed (Debian package dovecot-imapd)"
    if os.geteuid() != 0:
        return "starting a private Dovecot instance needs root"
    return None


@dataclasses.dataclass
class DovecotUser:
    name: str  # the login name, e.g. alice@example.org
    password_hash: str  # with its scheme, e.g. "{ARGON2ID}$argon2id$..."
    home: str  # the Maildir (mail_location = maildir:~)


class PrivateDovecot(Daemon):
    """Dovecot 2.3 (`dovecot -F`) with its own config, base_dir, state_dir and log under `base`:
    IMAP and IMAPS on free loopback ports, users from a passwd-file (all mapping to one system
    uid/gid), Maildir++ at each user's home. `auth_socket`: also serve SASL to Postfix at
    that path (a unix socket in Postfix's queue directory). Everything else is Dovecot's
    default (mail_fsync = optimized, no auth cache)."""

    name = "dovecot"

    def __init__(self, base: str, users: list[DovecotUser], cert: str, key: str,
                 uid: int, gid: int, auth_socket: str | None = None,
                 max_clients: int = 1024):
        super().__init__(base)
        self.binary = require_program("dovecot", "dovecot-core")
        self.port = free_port()
        self.tls_port = free_port()
        self.conf = os.path.join(base, "dovecot.conf")
        passwd = os.path.join(base, "users")
        _write(passwd, "".join(f"{u.name}:{u.password_hash}:{uid}:{gid}::{u.home}::\n"
                               for u in users))
        for sub in ("run", "state"):
            os.makedirs(os.path.join(base, sub), exist_ok=True)
        auth_listener = (f"  unix_listener {auth_socket} {{\n    mode = 0660\n"
                         f"    user = postfix\n    group = postfix\n  }}\n" if auth_socket else "")
        dh = "ssl_dh = </usr/share/dovecot/dh.pem\n" if os.path.exists(
            "/usr/share/dovecot/dh.pem") else ""
        _write(self.conf, f"""\
protocols = imap
listen = 127.0.0.1
base_dir = {base}/run
state_dir = {base}/state
instance_name = dovecot-{self.port}
log_path = {base}/dovecot.log
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
{dh}auth_mechanisms = plain login
first_valid_uid = 1
mail_location = maildir:~
default_client_limit = {max_clients * 2}
passdb {{
  driver = passwd-file
  args = {passwd}
}}
userdb {{
  driver = passwd-file
  args = {passwd}
}}
protocol imap {{
  mail_max_userip_connections = {max_clients}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.tls_port}
    ssl = yes
  }}
  process_limit = {max_clients}
}}
service imap {{
  process_limit = {max_clients}
}}
service auth {{
  client_limit = {max_clients * 4}
{auth_listener}}}
service anvil {{
  client_limit = {max_clients * 4}
}}
""")

    def command(self) -> list[str]:
        return [self.binary, "-F", "-c", self.conf]

    def answers(self) -> bool:
        return _listening(self.port) and _listening(self.tls_port)

    def logs(self) -> list[str]:
        return [self.log_path, os.path.join(self.base, "dovecot.log")]


class PrivateHAProxy(Daemon):
    """HAProxy with `config` (etc/haproxy.cfg.example), in the foreground (`-db`), logging to
    its output (tests/daemons' log file). `variables` are the MAILSUITE_* settings that file
    reads; `front_ports` the ports it must be listening on (127.0.0.1) before it counts as up."""

    name = "haproxy"

    def __init__(self, base: str, config: str, variables: dict[str, str],
                 front_ports: list[int]):
        super().__init__(base)
        self.binary = require_program("haproxy", "haproxy")
        self.config = config
        self.variables = dict(variables, MAILSUITE_HAPROXY_LOG="stdout")
        self.front_ports = list(front_ports)

    def command(self) -> list[str]:
        return [self.binary, "-f", self.config, "-db"]

    def environment(self) -> dict[str, str]:
        return dict(os.environ, **self.variables)

    def answers(self) -> bool:
        return all(_listening(port) for port in self.front_ports)


def dovecot_password_hash(password: str, scheme: str = "ARGON2ID") -> str:
    """`doveadm pw -s SCHEME`: the hash with its {SCHEME} prefix, as Dovecot writes it."""
    result = subprocess.run(["doveadm", "pw", "-s", scheme, "-p", password],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0 or not result.stdout.startswith("{"):
        raise RuntimeError(f"doveadm pw -s {scheme} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (from /proc/<pid>/stat's parent pid)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def pss_kib(pids: list[int]) -> int:
    """Proportional set size summed over `pids` (/proc/<pid>/smaps_rollup), in KiB: shared
    pages count once in total, however many processes map them."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
    return total


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False

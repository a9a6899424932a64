"""Run the real server (`twistd -n mailsuite`) in a subprocess on free loopback ports.

Scenario tests talk to it with real clients (smtplib, imaplib, poplib, swaks, mbsync...).
Users and domains are seeded in this process with `DirectoryStore` on the server's database (the
server reads the directory on every look-up, so no restart is needed); `MailServer.admin` runs the
real admin CLI as a subprocess, for tests of the CLI itself. See docs/design/testing.md.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import ssl
import subprocess
import sys
from typing import Any

from mailsuite import config as config_module
from mailsuite.directory import DirectoryStore
from tests.polling import wait_until

# The checkout under test: subprocesses import mailsuite from here, never an installed copy.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTENERS = ["mx", "submission", "submissions", "imap", "imaps", "pop3", "pop3s", "autoconfig",
             "metrics", "admin"]
HOST = "127.0.0.1"


def free_port() -> int:
    return free_ports(1)[0]


# Listening ports come from below the kernel's ephemeral range (32768-60999 by default): a port
# the kernel handed out (bind to 0) can be the local port of some other outgoing connection by
# the time the server binds it ("Address already in use", seen once in a full run).
PORT_RANGE = (20000, 32000)
_port_choice = random.SystemRandom()  # not the random module's: pytest-randomly reseeds that per test


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports, all bound at once (one at a time, two listeners of one server
    could get the same port), from PORT_RANGE."""
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < n:
            s = socket.socket()
            try:
                s.bind((HOST, _port_choice.randrange(*PORT_RANGE)))
            except OSError:  # in use: try another
                s.close()
                continue
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_toml(path: str, sections: dict[str, dict[str, Any]]) -> None:
    with open(path, "w") as f:
        for name, values in sections.items():
            f.write(f"[{name}]\n")
            for key, value in values.items():
                f.write(f"{key} = {toml_value(value)}\n")
            f.write("\n")


def rss_kib(pid: int) -> int:
    """Resident memory of process `pid` in KiB (/proc/<pid>/status), for the attack tests."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def maildir_messages(root: str) -> list[str]:
    """Paths of the messages of the Maildir folder at `root` (new/ and cur/), oldest first."""
    found = []
    for sub in ("new", "cur"):
        d = os.path.join(root, sub)
        if os.path.isdir(d):
            found += [os.path.join(d, n) for n in os.listdir(d) if not n.startswith(".")]
    return sorted(found, key=os.path.basename)


def staged_files(data_dir: str) -> list[str]:
    """Paths of the files being received, under the queue's incoming/ (one directory per host,
    docs/design/queue.md "Instances"; flat files of older versions too), and the spool-time
    envelopes in use (the empty ones a server keeps for reuse hold nothing)."""
    root = os.path.join(data_dir, "queue", "incoming")
    return [os.path.join(d, n) for d, _, names in os.walk(root) for n in names
            if not (n.endswith(".env") and _empty(os.path.join(d, n)))]


def _empty(path: str) -> bool:
    try:
        return os.path.getsize(path) == 0
    except FileNotFoundError:
        return True


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ with the checkout first on PYTHONPATH (twistd finds our plugin there too)."""
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=REPO_ROOT + (os.pathsep + path if path else ""), **extra)


def twistd_command() -> list[str]:
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(twistd):
        return [twistd]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


_EMPTY_DNS: Any = None


def empty_dns() -> Any:
    """One loopback DNS server per test process that answers NXDOMAIN to everything."""
    global _EMPTY_DNS
    if _EMPTY_DNS is None:
        import atexit

        from tests.dnsserver import DNSServer

        _EMPTY_DNS = DNSServer({}).start()
        atexit.register(_EMPTY_DNS.stop)
    return _EMPTY_DNS


class MailServer:
    """One mailsuite process with its own data directory, config file and ports.

    `extra` is merged into the generated configuration ({"limits": {"max_recipients": 5}}; a
    `server.data_dir` there is shared with other instances). `listeners` limits which listeners
    are enabled (default: all of LISTENERS). `host` is the loopback address every listener binds
    (another instance may use the same `ports` on another address).
    """

    def __init__(self, base_dir: str, extra: dict[str, dict[str, Any]] | None = None,
                 hostname: str = "mx.test.example", listeners: list[str] | None = None,
                 host: str = HOST, ports: dict[str, int] | None = None):
        self.base_dir = base_dir
        self.config_path = os.path.join(base_dir, "mailsuite.toml")
        self.log_path = os.path.join(base_dir, "twistd.log")
        self.hostname = hostname
        self.host = host
        self.enabled = list(listeners or LISTENERS)
        given = ports or {}
        fresh = iter(free_ports(sum(1 for name in self.enabled if not given.get(name))))
        self.ports = {name: given.get(name) or next(fresh) for name in self.enabled}
        sections: dict[str, dict[str, Any]] = {
            # One process unless a test asks for workers (the default, 0, is one per CPU):
            # a test reads one process's state and log unless it is about workers.
            "server": {"hostname": hostname, "data_dir": os.path.join(base_dir, "data"),
                       "admin_address": "admin@" + hostname, "workers": 1},
            "listen": {name: (f"tcp:{self.ports[name]}:interface={host}" if name in self.ports
                              else "") for name in LISTENERS},
        }
        for name, values in (extra or {}).items():
            sections.setdefault(name, {}).update(values)
        self.data_dir = sections["server"]["data_dir"]
        # Every DNS question (the trust checks on MX, the courier's MX look-ups) goes to a
        # loopback server of ours that knows no names, unless the test brings its own zones:
        # never to the machine's resolver, whose answers a test cannot know.
        courier = sections.setdefault("courier", {})
        if "nameservers" not in courier:
            courier["nameservers"] = [empty_dns().nameserver]
        self.sections = sections
        os.makedirs(base_dir, exist_ok=True)
        write_toml(self.config_path, sections)
        self.process: subprocess.Popen | None = None

    # -- life cycle -------------------------------------------------------------------------
    def start(self, timeout: float = 30.0, twistd_args: list[str] | tuple = ()) -> "MailServer":
        """Start and wait until every listener accepts; `twistd_args` go before the plugin
        name (e.g. ["--uid=nobody", "--gid=nogroup"])."""
        env = subprocess_env(PYTHONUNBUFFERED="1")
        self._log_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        self.process = subprocess.Popen(
            twistd_command() + ["-n", "--pidfile=", "--logfile", self.log_path, *twistd_args,
                                "mailsuite", "--config", self.config_path],
            cwd=self.base_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        pending = set(self.ports)

        def listening() -> bool:
            if self.process.poll() is not None:
                out = self.process.stdout.read().decode(errors="replace")
                raise RuntimeError(f"mailsuite exited with {self.process.returncode}:\n{out}\n"
                                   f"{self.log_text()}")
            for name in list(pending):
                try:
                    socket.create_connection((self.host, self.ports[name]), timeout=0.5).close()
                    pending.discard(name)
                except OSError:
                    pass
            return not pending

        try:
            wait_until(listening, timeout=timeout, interval=0.05, message="the listeners")
        except AssertionError:
            self.stop()
            raise RuntimeError(f"mailsuite did not listen on {sorted(pending)}:\n"
                               f"{self.log_text()}")
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def kill(self) -> None:
        """kill -9: no shutdown code runs (for crash tests)."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    # -- administration ---------------------------------------------------------------------
    def admin(self, *args: str, input: str | None = None, check: bool = True
              ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "mailsuite.admin.cli", "--config", self.config_path, *args],
            input=input, capture_output=True, text=True, timeout=60, env=subprocess_env(),
        )
        if check and result.returncode != 0:
            raise AssertionError(f"mailsuite {' '.join(args)} failed ({result.returncode}): "
                                 f"{result.stderr}{result.stdout}")
        return result

    def config(self) -> config_module.Config:
        """The generated configuration, read with the loader the server uses."""
        return config_module.load(self.config_path)

    @property
    def database_url(self) -> str:
        return self.config().database_url

    def directory(self) -> DirectoryStore:
        """A DirectoryStore on the server's database (close it after use)."""
        config = self.config()
        store = DirectoryStore(config.database_url, admin_address=config.server.admin_address)
        store.prepare()  # idempotent; lets tests seed users before the server first starts
        return store

    def add_domain(self, domain: str) -> None:
        store = self.directory()
        try:
            store.add_domain(domain)
        finally:
            store.close()

    def add_user(self, address: str, password: str = "secret-pw-1") -> None:
        """Add the user, and its domain first if that is not hosted yet."""
        domain = address.rpartition("@")[2]
        store = self.directory()
        try:
            if not store.is_hosted(domain):
                store.add_domain(domain)
            store.add_user(address, password)
        finally:
            store.close()

    # -- looking at results -----------------------------------------------------------------
    def maildir(self, address: str, folder: str = "") -> str:
        local, _, domain = address.lower().rpartition("@")
        path = os.path.join(self.data_dir, "mail", domain, local)
        return os.path.join(path, "." + folder) if folder else path

    def messages(self, address: str, folder: str = "") -> list[str]:
        """Paths of the messages in a folder (new/ and cur/), oldest name first."""
        return maildir_messages(self.maildir(address, folder))

    def wait_for_messages(self, address: str, count: int = 1, folder: str = "",
                          timeout: float = 15.0) -> list[str]:
        """Poll until `count` messages are there; at the deadline return what there is (callers
        assert on the list, with the log in the message)."""
        found: list[str] = []

        def enough() -> bool:
            found[:] = self.messages(address, folder)
            return len(found) >= count

        try:
            wait_until(enough, timeout=timeout, interval=0.05)
        except AssertionError:
            pass
        return found

    @property
    def cafile(self) -> str:
        """The self-signed certificate the server created (trust it as a CA in clients)."""
        return os.path.join(self.data_dir, "tls", "cert.pem")

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.cafile)
        ctx.check_hostname = False  # tests connect to 127.0.0.1; the chain is still verified
        return ctx

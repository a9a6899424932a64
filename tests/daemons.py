"""Private rspamd and clamd instances for tests: loopback only, free ports, everything (config,
databases, logs, sockets, pid files) under one temporary directory, stopped by killing their
process group. See docs/design/trust-engines.md, "Tests".

    with RspamdDaemon(tmp_dir) as rspamd:   # rspamd.url -> "http://127.0.0.1:<port>"
        ...
    with ClamdDaemon(tmp_dir) as clamd:     # clamd.socket (a unix path), clamd.tcp
        ...                                 # ("tcp:127.0.0.1:<port>")

A missing binary skips the test (fails under CI) through tests.environment.require_program.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
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

    def answers(self) -> bool:
        raise NotImplementedError

    def start(self) -> "Daemon":
        command = self.command()
        started = time.monotonic()
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            cwd=self.base)

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

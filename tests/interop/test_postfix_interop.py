"""Interop with an independently written MTA: a private Postfix instance on loopback.

mailsuite delivers to Postfix by MX (pf.test -> 127.0.0.1, the test DNS) and Postfix delivers to
mailsuite (transport_maps to mailsuite's MX port); a Postfix 5xx comes back as our DSN.

Postfix runs with its own config_directory/queue_directory under a temporary directory, only on
127.0.0.1 and an unprivileged port, no chroot; it needs root to start (`postfix -c DIR start`).
Install it with:  DEBIAN_FRONTEND=noninteractive apt-get install -y postfix
(preseed `postfix postfix/main_mailer_type select No configuration` so the package does not set
up or start the system instance). Skips with the reason when Postfix is missing or will not run.
"""
from __future__ import annotations

import email
import email.policy
import os
import shutil
import smtplib
import socket
import subprocess
import tempfile

import pytest

from tests.dnsserver import DNSServer
from tests.environment import unavailable
from tests.harness import MailServer, free_port
from tests.polling import wait_until
from tests.scenario.test_outbound import (dsn_fields, make_message, queue_is_empty, submit,
                                          wait_for_dsn)

pytestmark = pytest.mark.external

POSTFIX = shutil.which("postfix") or ("/usr/sbin/postfix" if os.path.exists("/usr/sbin/postfix")
                                      else None)

MASTER_CF = """\
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


class PrivatePostfix:
    """One Postfix instance in `base`: receives pf.test into one Maildir, relays a.test to
    mailsuite at 127.0.0.1:`mailsuite_port`."""

    def __init__(self, base: str, mailsuite_port: int):
        self.base = base
        self.port = free_port()
        self.config_dir = os.path.join(base, "etc")
        self.queue_dir = os.path.join(base, "spool")
        self.vmail = os.path.join(base, "vmail")
        self.log_path = os.path.join(base, "postfix.log")
        pw = _getpwnam("postfix")
        for d in (self.config_dir, self.queue_dir, self.vmail, os.path.join(base, "data")):
            os.makedirs(d, exist_ok=True)
        os.chmod(base, 0o755)
        os.chown(self.vmail, pw.pw_uid, pw.pw_gid)
        os.chown(os.path.join(base, "data"), pw.pw_uid, pw.pw_gid)
        main = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": os.path.join(base, "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "mx.pf.test",
            "mydomain": "pf.test",
            "myorigin": "pf.test",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "alias_maps": "",
            "alias_database": "",
            "virtual_mailbox_domains": "pf.test",
            "virtual_mailbox_base": self.vmail,
            "virtual_mailbox_maps": "static:mailbox/",  # every pf.test user: one Maildir
            "virtual_uid_maps": f"static:{pw.pw_uid}",
            "virtual_gid_maps": f"static:{pw.pw_gid}",
            "virtual_minimum_uid": "1",
            "transport_maps": f"inline:{{ a.test=smtp:[127.0.0.1]:{mailsuite_port} }}",
            "smtpd_recipient_restrictions": ("check_recipient_access "
                                             "inline:{ { refuse@pf.test = 554 5.7.1 refused here } }, "
                                             "permit_mynetworks, reject_unauth_destination"),
            "smtp_tls_security_level": "may",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "maillog_file": self.log_path,
            "maillog_file_prefixes": base,
            "biff": "no",
            "shlib_directory": "/usr/lib/postfix",
            "smtputf8_enable": "no",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
        }
        with open(os.path.join(self.config_dir, "main.cf"), "w") as f:
            f.writelines(f"{k} = {v}\n" for k, v in main.items())
        with open(os.path.join(self.config_dir, "master.cf"), "w") as f:
            f.write(MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
        # dynamicmaps.cf lists the map types in shared libraries (inline: is built in).
        for name in ("dynamicmaps.cf",):
            if os.path.exists(f"/etc/postfix/{name}"):
                shutil.copy(f"/etc/postfix/{name}", os.path.join(self.config_dir, name))

    def postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([POSTFIX, "-c", self.config_dir, *args], capture_output=True,
                              text=True, timeout=timeout)

    def start(self, timeout: float = 30) -> None:
        result = self.postfix("start")
        if result.returncode != 0:
            raise RuntimeError(f"postfix start failed: {result.stdout}{result.stderr}"
                               f"{self.log_text()}")
        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                return False
        try:
            wait_until(listening, timeout=timeout, interval=0.1)
        except AssertionError:
            raise RuntimeError(f"postfix did not listen on {self.port}: {self.log_text()}")

    def stop(self) -> None:
        self.postfix("stop")
        pid_file = os.path.join(self.queue_dir, "pid", "master.pid")
        def stopped() -> bool:
            try:
                pid = int(open(pid_file).read().strip())
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                return True
            return False
        try:
            wait_until(stopped, timeout=10, interval=0.1)
        except AssertionError:
            pass  # the temporary directory goes anyway; Postfix logs why it lingered

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def messages(self) -> list[str]:
        found = []
        for sub in ("new", "cur"):
            d = os.path.join(self.vmail, "mailbox", sub)
            if os.path.isdir(d):
                found += [os.path.join(d, n) for n in sorted(os.listdir(d))]
        return found

    def wait_for_messages(self, count: int = 1, timeout: float = 20) -> list[str]:
        try:
            wait_until(lambda: len(self.messages()) >= count, timeout=timeout, interval=0.1)
        except AssertionError:
            pass  # the caller asserts on what arrived
        return self.messages()


def _getpwnam(name: str):
    import pwd

    return pwd.getpwnam(name)


def _postfix_unusable() -> str | None:
    if POSTFIX is None:
        return ("Postfix is not installed (DEBIAN_FRONTEND=noninteractive apt-get install -y "
                "postfix)")
    if os.geteuid() != 0:
        return "starting a private Postfix instance needs root"
    try:
        _getpwnam("postfix")
    except KeyError:
        return "the postfix user does not exist (package not configured)"
    return None


@pytest.fixture
def postfix_world(tmp_path):
    reason = _postfix_unusable()
    if reason:
        unavailable(reason)
    base = tempfile.mkdtemp(prefix="mailsuite-postfix-")  # /tmp/pytest-of-root is 0700
    zones = {"pf.test": [("pf.test", "MX", "10 mx.pf.test"), ("mx.pf.test", "A", "127.0.0.1")]}
    dns = DNSServer(zones).start()
    server = MailServer(os.path.join(tmp_path, "mailsuite"), hostname="mx.a.test",
                        listeners=["mx", "submission"])
    postfix = PrivatePostfix(base, server.ports["mx"])
    server.sections["courier"] = {"nameservers": [dns.nameserver], "mx_port": postfix.port,
                                  "connect_timeout": 5}
    server.sections["queue"] = {"retry_schedule": [1], "delay_warning": 0}
    from tests.harness import write_toml

    write_toml(server.config_path, server.sections)
    try:
        try:
            postfix.start()
        except RuntimeError as e:
            unavailable(f"Postfix would not start here: {str(e)[:500]}")
        server.start()
        server.add_user("alice@a.test")
        yield server, postfix
    finally:
        server.stop()
        postfix.stop()
        dns.stop()
        shutil.rmtree(base, ignore_errors=True)


def read(path: str) -> email.message.EmailMessage:
    with open(path, "rb") as f:
        return email.message_from_binary_file(f, policy=email.policy.default)


def test_mailsuite_and_postfix_deliver_to_each_other(postfix_world):
    server, postfix = postfix_world

    # mailsuite -> Postfix (by MX, opportunistic STARTTLS: Postfix offers none here).
    body = ".starts with a dot\r\n\r\nUmlaut: \xfc\r\n".encode("latin-1")
    submit(server, "alice@a.test", ["bob@pf.test"],
           make_message("alice@a.test", "bob@pf.test", "to postfix").replace(
               b"Hello.\r\n", body))
    [got] = postfix.wait_for_messages(1)
    message = read(got)
    assert message["Subject"] == "to postfix"
    assert message["Return-Path"] == "<alice@a.test>"
    with open(got, "rb") as f:
        raw = f.read()
    assert b"\n.starts with a dot\n" in raw and b"Umlaut: \xfc" in raw  # Postfix stores LF
    assert message.get_all("Received")[0].startswith("from mx.a.test")  # Postfix's trace
    assert "status=sent (delivered to maildir)" in postfix.log_text()
    assert queue_is_empty(server)

    # Postfix -> mailsuite: inject into Postfix, which relays a.test to mailsuite's MX port.
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=30) as s:
        s.sendmail("carol@pf.test", ["alice@a.test"],
                   make_message("carol@pf.test", "alice@a.test", "from postfix"))
    arrived = server.wait_for_messages("alice@a.test", timeout=30)
    assert arrived, postfix.log_text()[-3000:]
    message = read(arrived[0])
    assert message["Subject"] == "from postfix"
    assert message["Return-Path"] == "<carol@pf.test>"
    assert "mx.pf.test" in message.get_all("Received")[0]

    # A Postfix refusal (554 5.7.1 at RCPT) comes back to alice as our DSN.
    submit(server, "alice@a.test", ["refuse@pf.test"],
           make_message("alice@a.test", "refuse@pf.test", "refused by postfix"))
    dsn = wait_for_dsn(server, "alice@a.test", "refuse@pf.test", timeout=20)
    assert dsn is not None, server.log_text()[-3000:]
    _, [rcpt] = dsn_fields(dsn)
    assert rcpt["Status"] == "5.7.1"
    assert rcpt["Remote-MTA"] == "dns; mx.pf.test"
    assert "refused here" in rcpt["Diagnostic-Code"]

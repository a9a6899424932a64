"""The two sides of bench/compare.py: a private mailsuite, and a private Postfix + Dovecot
(the reference), each with the same users and a configuration described in
docs/performance.md. Both need nothing system-wide: free loopback ports, one directory each."""
from __future__ import annotations

import os
import pwd
import ssl
import sys
from typing import Protocol

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mailboxes import Layout, chown_tree  # noqa: E402
from tests.daemons import (DovecotUser, PrivateDovecot, PrivatePostfix,  # noqa: E402
                           dovecot_password_hash, dovecot_unusable, postfix_unusable,
                           process_tree, pss_kib)
from tests.harness import MailServer, free_port  # noqa: E402

VMAIL_USER = "nobody"  # the reference's mail owner (Dovecot refuses root; virtual(8) too)


class Side(Protocol):
    mx_port: int
    submission_port: int
    imap_port: int
    imap_tls: bool  # implicit TLS on imap_port, else plain IMAP
    client_context: ssl.SSLContext

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def stop_imap(self) -> None: ...
    def start_imap(self) -> None: ...
    def maildir(self, address: str, folder: str = "") -> str: ...
    def own_mail(self) -> None: ...
    def imap_pss_kib(self) -> int: ...


def bench_settings(max_clients: int, workers: int = 0) -> dict[str, dict]:
    """mailsuite's configuration for a benchmark from one address: the limits that protect a
    public server from one client address raised to `max_clients`, no inbound trust checks
    (Postfix runs none by default), no rate limits (Postfix has none); `workers` processes
    ([server] workers, docs/design/architecture.md "Worker processes")."""
    return {
        "server": {"workers": workers},
        "limits": {"max_connections": max_clients, "max_connections_per_ip": max_clients,
                   "max_preauth_per_ip": max_clients, "max_preauth_per_prefix": max_clients},
        "imap": {"max_commands_per_second": 0},
        "trust": {"enabled": False},
        "ratelimit": {"submission_messages_per_hour": 0, "submission_recipients_per_hour": 0,
                      "mx_connections_per_minute": 0, "mx_recipients_per_minute": 0},
    }


def process_count(workers: int) -> int:
    """The processes [server] workers = `workers` starts on this machine (0: one per CPU)."""
    from mailsuite.config import Config

    config = Config()
    config.server.workers = workers
    return config.workers


def wait_for_workers(server: MailServer, workers: int) -> None:
    """Until every worker process beside the first serves: the first listens at once, each
    worker logs its "serving mx on" line once it has adopted the sockets."""
    from tests.polling import wait_until

    workers = process_count(workers)
    if workers > 1:
        wait_until(lambda: server.log_text().count("mailsuite.workers#info] serving mx on")
                   >= workers - 1, timeout=60, message="the worker processes")


class MailsuiteSide:
    """`twistd -n mailsuite` (tests/harness.py) with MX, submission and IMAPS, configured by
    `bench_settings` (every client here is 127.0.0.1)."""

    def __init__(self, base: str, users: list[str], password: str, layout: Layout,
                 max_clients: int, workers: int = 0):
        self.server = MailServer(base, hostname="mx.bench.test",
                                 listeners=["mx", "submission", "imaps"],
                                 extra={"tls": {"cert": layout.cert, "key": layout.key},
                                        **bench_settings(max_clients, workers)})
        self.workers = workers
        self.users, self.password = users, password
        self.mx_port = self.server.ports["mx"]
        self.submission_port = self.server.ports["submission"]
        self.imap_port = self.server.ports["imaps"]
        self.imap_tls = True  # no LOGIN before TLS (RFC 3501 section 6.2.3)
        self.client_context = layout.client_context()

    def start(self) -> None:
        for user in self.users:
            self.server.add_user(user, self.password)
        self._start()

    def _start(self) -> None:
        self.server.start()
        wait_for_workers(self.server, self.workers)

    def stop(self) -> None:
        self.server.stop()

    def stop_imap(self) -> None:
        self.server.stop()

    def start_imap(self) -> None:
        self._start()

    def maildir(self, address: str, folder: str = "") -> str:
        return self.server.maildir(address, folder)

    def own_mail(self) -> None:
        pass  # mailsuite runs as root here and owns what root wrote

    def imap_pss_kib(self) -> int:
        return pss_kib(process_tree(self.server.process.pid))


class ReferenceSide:
    """Postfix (smtpd on a loopback port -> virtual(8) -> Maildir, plus a submission smtpd
    with STARTTLS and Dovecot SASL) and Dovecot (IMAPS, passwd-file with {ARGON2ID} hashes
    from `doveadm pw`), sharing one Maildir tree owned by `nobody`."""

    def __init__(self, base: str, users: list[str], password: str, layout: Layout,
                 max_clients: int, imap_tls: bool = True):
        for reason in (postfix_unusable(), dovecot_unusable()):
            if reason:
                raise RuntimeError(reason)
        os.makedirs(base, exist_ok=True)
        os.chmod(base, 0o755)
        self.vmail = os.path.join(base, "vmail")
        os.makedirs(self.vmail, exist_ok=True)
        owner = pwd.getpwnam(VMAIL_USER)
        self.uid, self.gid = owner.pw_uid, owner.pw_gid
        self.submission_port = free_port()
        self.postfix = PrivatePostfix(os.path.join(base, "postfix"),
                                      self._postfix_main(users, layout),
                                      [self._submission_service(layout)])
        self.mx_port = self.postfix.port
        hashed = dovecot_password_hash(password)
        self.dovecot = PrivateDovecot(
            os.path.join(base, "dovecot"),
            [DovecotUser(u, hashed, self.maildir(u)) for u in users], layout.cert, layout.key,
            self.uid, self.gid,
            auth_socket=os.path.join(self.postfix.queue_dir, "private", "auth"),
            max_clients=max_clients)
        self.imap_tls = imap_tls
        self.imap_port = self.dovecot.tls_port if imap_tls else self.dovecot.port
        self.client_context = layout.client_context()

    def _postfix_main(self, users: list[str], layout: Layout) -> dict[str, str]:
        boxes = ", ".join(f"{u}={self._relative(u)}/" for u in users)
        return {
            "myhostname": "mx.bench.test",
            "virtual_mailbox_domains": "bench.test",
            "virtual_mailbox_base": self.vmail,
            "virtual_mailbox_maps": f"inline:{{ {boxes} }}",
            "virtual_uid_maps": f"static:{self.uid}",
            "virtual_gid_maps": f"static:{self.gid}",
            "virtual_minimum_uid": "1",
            "smtpd_tls_cert_file": layout.cert,
            "smtpd_tls_key_file": layout.key,
        }

    def _submission_service(self, layout: Layout) -> str:
        options = {
            "smtpd_tls_security_level": "encrypt",
            "smtpd_tls_auth_only": "yes",
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": "private/auth",
            "smtpd_client_restrictions": "permit_sasl_authenticated,reject",
            "smtpd_recipient_restrictions": "permit_sasl_authenticated,reject",
        }
        return (f"127.0.0.1:{self.submission_port} inet n - n - - smtpd " +
                " ".join(f"-o {k}={v}" for k, v in options.items()))

    @staticmethod
    def _relative(address: str, folder: str = "") -> str:
        local, _, domain = address.lower().rpartition("@")
        return os.path.join(domain, local, "." + folder) if folder else os.path.join(domain,
                                                                                     local)

    def start(self) -> None:
        self.postfix.start()  # first: it creates private/, where Dovecot puts the SASL socket
        self.dovecot.start()

    def stop(self) -> None:
        self.dovecot.stop()
        self.postfix.stop()

    def stop_imap(self) -> None:
        self.dovecot.stop()

    def start_imap(self) -> None:
        self.dovecot.start()

    def maildir(self, address: str, folder: str = "") -> str:
        return os.path.join(self.vmail, self._relative(address, folder))

    def own_mail(self) -> None:
        chown_tree(self.vmail, self.uid, self.gid)

    def imap_pss_kib(self) -> int:
        return pss_kib(process_tree(self.dovecot.process.pid))

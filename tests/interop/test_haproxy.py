"""HAProxy (Debian `haproxy`) in front of two mailsuite instances (issue 13).

Two instances on their own loopback addresses (127.0.0.2, 127.0.0.3) share one data_dir and one
PostgreSQL directory; HAProxy runs etc/haproxy.cfg.example as it is, listening on 127.0.0.1 and
connecting to the instances from 127.0.0.4, the one trusted proxy address. MX and IMAP get a
PROXY v2 header, submission v1. The clients connect from 127.0.0.1: that is the address the
instances must record (Received:, log lines), never the proxy's. Then one instance is killed
(kill -9) under SMTP and IMAP traffic: clients reconnect through HAProxy to the other, every
acknowledged message is delivered, and the mailbox has no duplicate UID or Message-ID.
"""
from __future__ import annotations

import imaplib
import os
import re
import smtplib
import socket
import threading
import uuid
from dataclasses import dataclass

import pytest

from tests.daemons import PrivateHAProxy
from tests.environment import PgSchema, require_postgresql, require_program, unavailable
from tests.harness import REPO_ROOT, MailServer, free_port
from tests.polling import wait_until

pytestmark = pytest.mark.external

CLIENT = "127.0.0.1"  # where the test's clients connect from, and HAProxy listens
INSTANCES = {"a": "127.0.0.2", "b": "127.0.0.3"}
PROXY_SOURCE = "127.0.0.4"  # where HAProxy connects to the instances from
PROXIED = ["mx", "submission", "submissions", "imap", "imaps", "pop3", "pop3s"]
CONFIG = os.path.join(REPO_ROOT, "etc", "haproxy.cfg.example")
ALICE = "alice@example.org"
PASSWORD = "secret-pw-1"


@pytest.fixture(scope="module", autouse=True)
def requirements():
    require_program("haproxy", "haproxy")
    require_postgresql()
    for address in (*INSTANCES.values(), PROXY_SOURCE):
        try:
            with socket.socket() as s:
                s.bind((address, 0))
        except OSError as e:
            unavailable(f"loopback address {address} is not bindable here: {e}")


@dataclass
class Cluster:
    servers: dict[str, MailServer]
    haproxy: PrivateHAProxy
    ports: dict[str, int]

    def logs(self) -> str:
        return "\n".join(s.log_text() for s in self.servers.values())


@pytest.fixture
def cluster(tmp_path):
    pg = PgSchema()
    ports = {name: free_port() for name in PROXIED}
    extra = {"server": {"data_dir": str(tmp_path / "shared")}, "database": {"url": pg.url},
             "listen": {"proxy_protocol": PROXIED, "trusted_proxies": [f"{PROXY_SOURCE}/32"]},
             # The survivor takes over the dead instance's queue entries at its next scan.
             "queue": {"scan_interval": 1.0}}
    servers: dict[str, MailServer] = {}
    try:
        for name, host in INSTANCES.items():
            servers[name] = MailServer(str(tmp_path / name), extra=extra, listeners=PROXIED,
                                       hostname=f"mx-{name}.test.example", host=host,
                                       ports=ports).start()
        servers["a"].add_user(ALICE)
        variables = {"MAILSUITE_FRONTEND": CLIENT, "MAILSUITE_A": INSTANCES["a"],
                     "MAILSUITE_B": INSTANCES["b"], "MAILSUITE_PROXY_SOURCE": PROXY_SOURCE}
        variables.update({f"MAILSUITE_{name.upper()}_PORT": str(port)
                          for name, port in ports.items()})
        with PrivateHAProxy(str(tmp_path / "haproxy"), CONFIG, variables,
                            list(ports.values())) as haproxy:
            yield Cluster(servers, haproxy, ports)
    finally:
        for server in servers.values():
            server.stop()
        pg.drop()


def message(message_id: str, sender: str = "carol@remote.example") -> str:
    return (f"From: {sender}\r\nTo: {ALICE}\r\nSubject: {message_id}\r\n"
            f"Message-ID: {message_id}\r\n\r\nbody\r\n")


def new_id() -> str:
    return f"<{uuid.uuid4().hex}@client.test>"


def send_mx(cluster: Cluster) -> str:
    mid = new_id()
    with smtplib.SMTP(CLIENT, cluster.ports["mx"], timeout=30,
                      local_hostname="client.test") as smtp:
        smtp.sendmail("carol@remote.example", [ALICE], message(mid))
    return mid


def send_submission(cluster: Cluster) -> str:
    mid = new_id()
    with smtplib.SMTP(CLIENT, cluster.ports["submission"], timeout=30,
                      local_hostname="client.test") as smtp:
        smtp.starttls(context=cluster.servers["a"].ssl_context())
        smtp.login(ALICE, PASSWORD)
        smtp.sendmail(ALICE, [ALICE], message(mid, sender=ALICE))
    return mid


class Session:
    """One IMAP client through HAProxy (STARTTLS on imap, or imaps) that reconnects when its
    connection breaks, as a mail client does."""

    def __init__(self, cluster: Cluster, implicit_tls: bool):
        self.cluster = cluster
        self.implicit_tls = implicit_tls
        self.reconnects = 0
        self.imap = self._connect()

    def _connect(self) -> imaplib.IMAP4:
        ctx = self.cluster.servers["a"].ssl_context()
        if self.implicit_tls:
            imap = imaplib.IMAP4_SSL(CLIENT, self.cluster.ports["imaps"], ssl_context=ctx,
                                     timeout=30)
        else:
            imap = imaplib.IMAP4(CLIENT, self.cluster.ports["imap"], timeout=30)
            imap.starttls(ssl_context=ctx)
        imap.login(ALICE, PASSWORD)
        imap.select("INBOX")
        return imap

    def alive(self) -> bool:
        """NOOP; on a broken connection, one attempt to reconnect (False if it failed)."""
        try:
            return self.imap.noop()[0] == "OK"
        except (imaplib.IMAP4.abort, imaplib.IMAP4.error, OSError):
            pass
        try:
            self.imap = self._connect()
            self.reconnects += 1
            return True
        except (imaplib.IMAP4.abort, imaplib.IMAP4.error, OSError):
            return False

    def mailbox(self) -> list[tuple[int, str]]:
        """(UID, Message-ID) of every message in INBOX."""
        self.imap.noop()
        typ, data = self.imap.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        assert typ == "OK", data
        found = []
        for item in data:
            if isinstance(item, tuple):
                uid = re.search(rb"UID (\d+)", item[0])
                mid = re.search(rb"<[^>]+>", item[1])
                assert uid and mid, item
                found.append((int(uid.group(1)), mid.group(0).decode()))
        return found

    def close(self) -> None:
        try:
            self.imap.logout()
        except (imaplib.IMAP4.abort, imaplib.IMAP4.error, OSError):
            pass


class Sender(threading.Thread):
    """Sends one message per MX connection through HAProxy until stopped; remembers which were
    acknowledged (250 after DATA) and which attempts failed."""

    def __init__(self, cluster: Cluster):
        super().__init__(daemon=True)
        self.cluster = cluster
        self.acked: list[str] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.acked.append(send_mx(self.cluster))
            except (smtplib.SMTPException, OSError) as e:
                self.failures.append(repr(e))
                self.stop.wait(0.1)  # back off like a client would, then try again


def haproxy_log(cluster: Cluster) -> str:
    with open(cluster.haproxy.log_path, errors="replace") as f:
        return f.read()


def received(path: str) -> str:
    """The first Received: field of the message at `path`, unfolded."""
    with open(path, "rb") as f:
        head = f.read().split(b"\r\n\r\n")[0].decode()
    return head.replace("\r\n ", " ").replace("\r\n\t", " ").split("Received: ", 1)[1] \
        .split("\r\n")[0]


def test_smtp_and_imap_through_haproxy_survive_the_loss_of_an_instance(cluster):
    a, b = cluster.servers["a"], cluster.servers["b"]
    # -- both instances up: the real client's address, never HAProxy's --------------------
    acked = [send_mx(cluster) for _ in range(8)] + [send_submission(cluster) for _ in range(2)]
    paths = wait_until(lambda: len(a.messages(ALICE)) >= len(acked) and a.messages(ALICE), 60,
                       message="the first messages delivered")
    lines = [received(path) for path in paths]
    for line in lines:
        assert f"[{CLIENT}])" in line and PROXY_SOURCE not in line, line
    assert any("with ESMTPSA" in line for line in lines)  # submission, PROXY v1
    sessions = [Session(cluster, implicit_tls) for implicit_tls in (False, False, True, True)]
    logs = {name: s.log_text() for name, s in cluster.servers.items()}
    for name, text in logs.items():
        # leastconn spreads the sessions and the connections: both instances served both
        assert f"client={CLIENT}" in text, f"instance {name} queued nothing"
        assert f"{ALICE} logged in from {CLIENT}" in text, f"no IMAP login on instance {name}"
        assert f"client={PROXY_SOURCE}" not in text
        assert f"logged in from {PROXY_SOURCE}" not in text

    # -- instance a killed under SMTP and IMAP traffic ------------------------------------
    sender = Sender(cluster)
    sender.start()
    try:
        wait_until(lambda: len(sender.acked) >= 5, 60, message="messages sent before the kill")
        a.kill()
        killed_at = len(sender.acked)
        wait_until(lambda: all(s.alive() for s in sessions), 60,
                   message="every IMAP session working again")
        wait_until(lambda: len(sender.acked) >= killed_at + 10, 90,
                   message="messages acknowledged after the kill")
    finally:
        sender.stop.set()
        sender.join(60)
    assert sum(s.reconnects for s in sessions) >= 1, "no IMAP session was on the killed instance"
    # The health checks (PROXY header, then EHLO, greeting or TLS handshake) find a dead...
    for listener in PROXIED:
        wait_until(lambda: f"Server {listener}/a is DOWN" in haproxy_log(cluster), 30,
                   message=f"HAProxy's check to see {listener}/a down")
    acked += sender.acked

    # -- nothing lost, nothing twice ------------------------------------------------------
    reader = sessions[0]

    def all_there() -> list[tuple[int, str]] | None:
        reader.alive()
        box = reader.mailbox()
        return box if set(acked) <= {mid for _, mid in box} else None

    try:
        box = wait_until(all_there, 90, message="every acknowledged message in INBOX")
    except AssertionError:
        missing = set(acked) - {mid for _, mid in reader.mailbox()}
        raise AssertionError(f"{len(missing)} acknowledged messages missing: "
                             f"{sorted(missing)[:5]}\n{b.log_text()[-3000:]}")
    uids = [uid for uid, _ in box]
    mids = [mid for _, mid in box]
    assert len(set(uids)) == len(uids), "a UID given twice"
    assert len(set(mids)) == len(mids), "a message delivered twice"
    assert f"client={CLIENT}" in b.log_text()
    # ...and pass on a live instance.
    assert "/b is DOWN" not in haproxy_log(cluster), haproxy_log(cluster)[-3000:]
    for s in sessions:
        s.close()
    print(f"acknowledged {len(acked)} ({len(sender.acked)} under the kill), "
          f"{len(sender.failures)} failed attempts, "
          f"{sum(s.reconnects for s in sessions)} IMAP reconnects, {len(box)} in INBOX")

"""The database goes away while the server runs (docs/design/directory.md, "Faults"): PostgreSQL
behind a TCP relay in this process that the test closes (established connections cut, new ones
refused) and opens again. Meanwhile SMTP answers 451 4.3.0 at RCPT, POP3 `-ERR [SYS/TEMP]` at
login, the log has one "directory unavailable" warning line per distinct failure (rate-limited)
and no traceback; once the database is back, the same clients are served again without a
restart. (IMAP's answer, `NO [UNAVAILABLE]`, is tested with the IMAP server.)
"""
from __future__ import annotations

import poplib
import smtplib
import socket
import threading

import pytest
from sqlalchemy.engine import make_url

from mailsuite.directory import DirectoryStore
from tests.environment import PgSchema, require_postgresql
from tests.harness import HOST, MailServer
from tests.polling import wait_until


class Relay:
    """A TCP relay 127.0.0.1:port -> target that can be cut and restored on the same port."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = 0
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.open()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and reset the established ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it
            except OSError:
                pass
            listener.close()
        with self._lock:
            for s in self._sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def pg_schema():
    require_postgresql()
    pg = PgSchema()
    try:
        yield pg
    finally:
        pg.drop()


def pop_login(server: MailServer, password: str = "secret-pw-1") -> bytes:
    pop = poplib.POP3_SSL(HOST, server.ports["pop3s"], context=server.ssl_context(), timeout=30)
    try:
        pop.user("alice@example.org")
        try:
            return pop.pass_(password)
        except poplib.error_proto as e:
            return e.args[0]
    finally:
        pop.close()


def rcpt(server: MailServer) -> int:
    with smtplib.SMTP(HOST, server.ports["mx"], timeout=30) as smtp:
        smtp.ehlo("peer.example")
        smtp.mail("someone@remote.example")
        return smtp.rcpt("alice@example.org")[0]


def test_database_outage_is_temporary_and_logged_in_one_line(tmp_path, pg_schema):
    store = DirectoryStore(pg_schema.url)
    store.prepare()
    store.add_domain("example.org")
    store.add_user("alice@example.org", "secret-pw-1")
    store.close()
    url = make_url(pg_schema.url)
    relay = Relay((url.host or HOST, url.port or 5432))
    relayed = url.set(host=HOST, port=relay.port).update_query_dict(
        {"connect_timeout": "3"}).render_as_string(hide_password=False)
    server = MailServer(str(tmp_path / "server"), listeners=["mx", "pop3s"],
                        extra={"database": {"url": relayed},
                               "limits": {"auth_failure_delay": 0},
                               # Every RCPT asks the database: a route found a moment ago
                               # would otherwise answer from memory (docs/design/directory.md,
                               # "Lookup cache").
                               "directory": {"lookup_cache_ttl": 0}})
    server.start()
    try:
        assert rcpt(server) == 250
        assert pop_login(server).startswith(b"+OK")

        relay.cut()
        for _ in range(3):
            assert rcpt(server) == 451
            assert pop_login(server).startswith(b"-ERR [SYS/TEMP]")
        log = server.log_text()
        warnings = [line for line in log.splitlines()
                    if "[mailsuite.directory.api#warn] directory unavailable" in line]
        assert len(warnings) <= 2, warnings  # rate-limited: not one per look-up
        assert any("Connection refused" in line for line in warnings), warnings
        assert "Traceback" not in log, log[-3000:]

        relay.open()  # the database is back: served again, no restart
        wait_until(lambda: rcpt(server) == 250, timeout=20, message="recovery of RCPT")
        assert pop_login(server).startswith(b"+OK")
        assert "Traceback" not in server.log_text()
    finally:
        server.stop()
        relay.cut()

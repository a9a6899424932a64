"""Attack class: password guessing (docs/design/limits.md, "Login throttle").

Eight connections from each of 127.0.0.66-68 guess alice's password over IMAPS. The guesser is
slowed down; bob logging in from the same address is not, nor is alice from 127.0.0.77 - a
success by another account no longer resets the guesser, and a guesser no longer delays
everyone's logins by filling the password-hashing queue.
"""
from __future__ import annotations

import imaplib
import socket
import threading
import time

from tests.harness import rss_kib
from tests.polling import wait_until

GUESSER = "127.0.0.66"
HELPERS = ["127.0.0.67", "127.0.0.68"]  # more guessers, so the hash pool has a backlog
PASSWORD = "secret-pw-1"
PARALLEL = 8  # connections per guessing address


class IMAPFrom(imaplib.IMAP4_SSL):
    """IMAPS from a chosen loopback source address."""

    def __init__(self, source: str, *args, **kwargs):
        self.source = source
        super().__init__(*args, **kwargs)

    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


def login_time(srv, source: str, user: str, password: str = PASSWORD) -> tuple[bool, float]:
    started = time.monotonic()
    try:
        m = IMAPFrom(source, "127.0.0.1", srv.ports["imaps"], ssl_context=srv.ssl_context(),
                     timeout=60)
    except OSError:
        return False, time.monotonic() - started
    try:
        ok = m.login(user, password)[0] == "OK"
    except imaplib.IMAP4.error:
        ok = False
    elapsed = time.monotonic() - started
    try:
        m.logout()
    except (imaplib.IMAP4.error, OSError):
        pass
    return ok, elapsed


class Guesser:
    def __init__(self, srv):
        self.srv = srv
        self.stop = threading.Event()
        self.failures: list[float] = []  # seconds each failed attempt took
        self.finished: list[tuple[float, float]] = []  # (started, took) of each failure
        self.current: dict[int, imaplib.IMAP4] = {}
        sources = [GUESSER] + HELPERS
        self.threads = [threading.Thread(target=self._run, args=(n, sources[n % len(sources)]),
                                         daemon=True)
                        for n in range(PARALLEL * len(sources))]

    def start(self) -> "Guesser":
        for t in self.threads:
            t.start()
        return self

    def _run(self, n: int, source: str) -> None:
        guess = 0
        while not self.stop.is_set():
            try:
                m = IMAPFrom(source, "127.0.0.1", self.srv.ports["imaps"],
                             ssl_context=self.srv.ssl_context(), timeout=60)
            except OSError:
                continue
            self.current[n] = m
            try:
                while not self.stop.is_set():
                    guess += 1
                    started = time.monotonic()
                    try:
                        m.login("alice@example.org", f"guess-{n}-{guess}")
                    except imaplib.IMAP4.abort:
                        raise
                    except imaplib.IMAP4.error:
                        took = time.monotonic() - started
                        self.failures.append(took)
                        if source == GUESSER:
                            self.finished.append((started, took))
            except (imaplib.IMAP4.abort, OSError):
                pass  # closed after max_auth_failures: reconnect
            finally:
                try:
                    m.shutdown()
                except OSError:
                    pass

    def finish(self) -> None:
        self.stop.set()
        for m in list(self.current.values()):  # unblock the threads waiting for a reply
            try:
                m.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self.threads:
            t.join(30)


def test_guessing_alice_from_one_address_slows_only_the_guesser(make_server):
    srv = make_server(listeners=["imaps"])
    srv.add_user("alice@example.org", PASSWORD)
    srv.add_user("bob@example.org", PASSWORD)
    ok, baseline = login_time(srv, GUESSER, "bob@example.org")
    assert ok
    before = rss_kib(srv.process.pid)
    guesser = Guesser(srv).start()
    served, attempts, slowest = 0, 0, 0.0
    try:
        # Wait until the guesser is being held back: its failures take several seconds each.
        wait_until(lambda: len(guesser.finished) >= PARALLEL and
                   max(guesser.failures) >= 3.0, timeout=60, message="the guesser to be slowed")
        for source, user in [(GUESSER, "bob@example.org"), ("127.0.0.77", "alice@example.org"),
                             (GUESSER, "bob@example.org"), ("127.0.0.77", "alice@example.org"),
                             (GUESSER, "bob@example.org")]:
            attempts += 1
            ok, elapsed = login_time(srv, source, user)
            served += ok
            slowest = max(slowest, elapsed)
        # Bob's successes at the guesser's address did not reset the guesser: its next
        # failure is still held back.
        last_success = time.monotonic()
        wait_until(lambda: any(start > last_success for start, _ in guesser.finished),
                   timeout=60, message="a guess after bob's logins")
        after_bob = min(took for start, took in guesser.finished if start > last_success)
        assert after_bob >= 3.0, after_bob
        # Alice mistyping from her own address waits at most the first-failure delay plus
        # the per-user cap, however long the guesser has been at it.
        ok, mistyped = login_time(srv, "127.0.0.77", "alice@example.org", "typo")
        assert not ok
    finally:
        guesser.finish()
    after = rss_kib(srv.process.pid)
    print(f"\nATTACK login_guessing: rss_before={before}KiB rss_after={after}KiB "
          f"served={served}/{attempts} (baseline login {baseline:.2f} s, slowest during the "
          f"attack {slowest:.2f} s, alice's typo {mistyped:.2f} s; guesser: "
          f"{len(guesser.failures)} failures, slowest {max(guesser.failures):.1f} s)")
    assert served == attempts
    assert slowest <= baseline + 2.0  # one password check ahead of it at most, not 44 s
    config = srv.config().limits
    assert mistyped <= baseline + config.auth_failure_delay + config.auth_user_max_delay + 1.0
    assert "Traceback" not in srv.log_text()

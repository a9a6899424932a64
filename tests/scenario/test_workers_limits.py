"""[server] workers = 2: the connection limits count the whole server, not each process
(mailsuite/conncount.py; docs/design/limits.md, "Across worker processes").

One address opens connections one after the other, holding those served, until both processes
have taken some: with its share counted per process it would be served up to twice its share;
counted together, exactly that many are served and the rest get the per-client refusal,
whichever process accepted them. On MX the share is `max_connections_per_ip`; on IMAP,
`max_preauth_per_ip` (nobody logs in here).
"""
from __future__ import annotations

import os
import re
import signal
import socket

import pytest

from mailsuite.workers import SHARED_LISTENERS
from tests.harness import HOST, MailServer
from tests.polling import wait_until
from tests.scenario.test_workers import serving_pid, worker_pids

SHARE = 3
ESTABLISHED, CLOSE_WAIT = "01", "08"
# listener -> (its greeting, its per-client refusal, the [limits] that make SHARE the share)
CASES = {
    "mx": (b"220 ", b"421 4.7.0 Too many connections from your address",
           {"max_connections_per_ip": SHARE}),
    "imap": (b"* OK", b"* BYE too many connections",
             {"max_connections_per_ip": 20, "max_preauth_per_ip": SHARE}),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    return request.param, *CASES[request.param]


@pytest.fixture
def server(tmp_path, case):
    # No eviction while the test holds its connections silent.
    limits = {"evict_idle_after": 3600.0, "preauth_timeout": 3600, **case[3]}
    srv = MailServer(str(tmp_path), extra={"server": {"workers": 2,
                                                      "worker_listeners": list(SHARED_LISTENERS)},
                                                 "limits": limits})
    srv.start()
    wait_until(lambda: worker_pids(srv), timeout=60, message="the worker process")
    yield srv
    srv.stop()


def served_sockets(port: int) -> int:
    """Server-side connections of the listener on `port` still open (the harness's probes at
    start-up, or ours closing)."""
    wanted = f":{port:04X}"
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(1 for r in rows if r[1].endswith(wanted) and r[3] in (ESTABLISHED, CLOSE_WAIT)
               and r[9] != "0")


def greeting(port: int) -> tuple[socket.socket, bytes]:
    s = socket.create_connection((HOST, port), timeout=30)
    line = b""
    while not line.endswith(b"\r\n"):
        chunk = s.recv(512)
        if not chunk:
            break
        line += chunk
    return s, line


def refusing_pids(srv: MailServer, listener: str) -> set[int]:
    return {int(p) for p in re.findall(rf"\[pid=(\d+) mailsuite\.listeners#info\] {listener}: "
                                       r"refused a connection from 127\.0\.0\.1: per-client",
                                       srv.log_text())}


def flood(srv: MailServer, pids: list[int], case: tuple, tries: int = 200
          ) -> tuple[list[socket.socket], set[int], int]:
    """Connections held (served), the processes that took one, and the refusals: opened until
    both processes have taken some and more than SHARE were tried."""
    listener, served, refusal, _ = case
    port = srv.ports[listener]
    held: list[socket.socket] = []
    took: set[int] = set()
    refused = 0
    for n in range(1, tries + 1):
        s, line = greeting(port)
        if line.startswith(served):
            held.append(s)
            pid = serving_pid(port, s, pids)
            if pid is not None:
                took.add(pid)
        else:
            assert line.startswith(refusal), line
            refused += 1
            s.close()
        if n > SHARE and took | refusing_pids(srv, listener) >= set(pids):
            break
    return held, took | refusing_pids(srv, listener), refused


def test_one_address_gets_its_share_of_the_whole_server_and_it_comes_back(server, case):
    listener, served, refusal, _ = case
    pids = [server.process.pid, worker_pids(server)[0]]
    port = server.ports[listener]
    wait_until(lambda: served_sockets(port) == 0, message="the start-up probes to close")
    held, took, refused = flood(server, pids, case)
    try:
        assert took == set(pids), f"one process took every connection: {took}"
        assert len(held) == SHARE, server.log_text()
        assert refused >= 1
    finally:
        for s in held:
            s.close()
    # Each process gives its connections' share back when they close, for the other to use.
    wait_until(lambda: served_sockets(port) == 0, message="the held connections to close")
    assert_whole_share_then_refusal(port, served, refusal)


def assert_whole_share_then_refusal(port: int, served: bytes, refusal: bytes) -> None:
    """SHARE connections in a row are served, the next one refused."""
    again = [greeting(port) for _ in range(SHARE)]
    try:
        assert [line.startswith(served) for _, line in again] == [True] * SHARE
        extra, line = greeting(port)
        extra.close()
        assert line.startswith(refusal)
    finally:
        for s, _ in again:
            s.close()


def held_by(srv: MailServer, pid: int, pids: list[int], case: tuple, tries: int = 100
            ) -> socket.socket:
    """A served connection of process `pid` (the others' closed as they come)."""
    listener, served, _, _ = case
    port = srv.ports[listener]
    for _ in range(tries):
        s, line = greeting(port)
        if line.startswith(served) and serving_pid(port, s, pids) == pid:
            return s
        s.close()
        wait_until(lambda: served_sockets(port) == 0, message="the connection to close")
    raise AssertionError(f"{tries} connections to {listener} did not reach process {pid}")


def test_the_share_a_killed_worker_held_comes_back(server, case):
    listener, served, refusal, _ = case
    worker = worker_pids(server)[0]
    port = server.ports[listener]
    wait_until(lambda: served_sockets(port) == 0, message="the start-up probes to close")
    held = held_by(server, worker, [server.process.pid, worker], case)
    os.kill(worker, signal.SIGKILL)  # its row still counts the connection: nothing released it
    held.close()
    wait_until(lambda: [p for p in worker_pids(server) if p != worker], timeout=60,
               message="the new worker")
    wait_until(lambda: served_sockets(port) == 0, message="the connection to close")
    assert_whole_share_then_refusal(port, served, refusal)

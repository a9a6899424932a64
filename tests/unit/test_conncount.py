"""The connection counts worker processes share (mailsuite/conncount.py, docs/design/limits.md
"Across worker processes"): two tables over one mapping act as two processes, in process."""
from __future__ import annotations

import dataclasses
import itertools
import os
import random

import pytest
from twisted.internet import protocol, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from mailsuite.config import LimitsSection
from mailsuite.conncount import WIDTH, ConnectionTable, key_cells
from mailsuite.listeners import ConnectionCounter, LimitedFactory, Refusal, limit

NAMES = ("mx", "imap")
IP, NET = "192.0.2.7", "192.0.2.0/24"
FULL = b"BUSY listener\r\n"
SHARE = b"BUSY you\r\n"


@pytest.fixture
def tables(tmp_path):
    """Rows 0 (the first process) and 1 (a worker) of a three-row table."""
    first = ConnectionTable.create(3, NAMES, str(tmp_path))
    worker = ConnectionTable.attach(os.dup(first.fileno()), NAMES, 1)
    return first, worker


def test_the_counts_of_every_row_add_up_in_the_others(tables):
    first, worker = tables
    a, b = first.listener("imap"), worker.listener("imap")
    a.add(IP, NET, 2, 2)
    b.add(IP, NET, 3, 1)
    b.add("198.51.100.1", "198.51.100.0/24", 1, 1)
    seen_by_worker = b.elsewhere(IP, NET)
    assert (seen_by_worker.ip, seen_by_worker.preauth_ip, seen_by_worker.preauth_prefix,
            seen_by_worker.total, seen_by_worker.preauth) == (2, 2, 2, 2, 2)
    seen_by_first = a.elsewhere(IP, NET)
    assert (seen_by_first.ip, seen_by_first.preauth_ip, seen_by_first.total,
            seen_by_first.preauth) == (3, 1, 4, 2)
    assert first.listener("mx").elsewhere(IP, NET).total == 0  # another listener's cells


def test_release_gives_the_share_back(tables):
    first, worker = tables
    b = worker.listener("mx")
    b.add(IP, NET, 2, 2)
    b.add(IP, NET, -2, -2)
    assert first.listener("mx").elsewhere(IP, NET) == (0, 0, 0, 0, 0)


def test_a_restarted_worker_starts_from_a_zeroed_row(tables):
    first, worker = tables
    worker.listener("mx").add(IP, NET, 4, 4)  # then the worker is killed: no release
    ConnectionTable.attach(os.dup(first.fileno()), NAMES, 1)  # its successor
    assert first.listener("mx").elsewhere(IP, NET).total == 0


def test_the_first_process_clears_the_row_of_a_dead_worker_and_no_other(tables):
    first, worker = tables
    worker.listener("mx").add(IP, NET, 1, 1)
    first.listener("mx").add(IP, NET, 1, 1)
    first.clear(1)
    assert first.listener("mx").elsewhere(IP, NET).total == 0
    assert worker.listener("mx").elsewhere(IP, NET).total == 1


def test_a_slot_outside_the_table_is_refused(tables):
    first, _ = tables
    with pytest.raises(ValueError):
        ConnectionTable.attach(os.dup(first.fileno()), NAMES, 3)


def test_the_hash_is_the_same_in_every_process():
    # Python's str hash is salted per process; the cells must not be: a fixed expectation.
    assert key_cells("192.0.2.7") == (331, 3202)
    assert all(0 <= c < 2 * WIDTH for c in key_cells("2001:db8::1"))
    assert key_cells("2001:db8::1")[1] >= WIDTH


def _sharing(cell: int, avoid: str) -> str:
    """An address whose cell in one hash row is `cell` (another key's)."""
    for n in itertools.count():
        ip = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        if ip != avoid and cell in key_cells(ip):
            return ip
    raise AssertionError("unreachable")


def test_collisions_only_over_count(tables):
    first, worker = tables
    b = worker.listener("mx")
    # Two other addresses fill both cells of IP: it looks held elsewhere though it is not.
    row0, row1 = key_cells(IP)
    for ip in (_sharing(row0, IP), _sharing(row1, IP)):
        b.add(ip, ip, 1, 1)
    assert first.listener("mx").elsewhere(IP, NET).ip == 1
    # Many addresses: no estimate is ever below the truth.
    rng = random.Random(7)
    truth: dict[str, int] = {}
    for _ in range(3000):
        ip = f"203.0.{rng.randrange(256)}.{rng.randrange(256)}"
        truth[ip] = truth.get(ip, 0) + 1
        b.add(ip, ip, 1, 0)
    a = first.listener("mx")
    assert all(a.elsewhere(ip, ip).ip >= n for ip, n in truth.items())


# -- LimitedFactory with a table: the other "process" holds some of the address's share --------

class Session(protocol.Protocol):
    def connectionLost(self, reason: object = None) -> None:
        self.on_close()


def factory(table: ConnectionTable, name: str = "imap", **limits: object) -> LimitedFactory:
    lim = dataclasses.replace(LimitsSection(), **limits)
    f = LimitedFactory(name, ConnectionCounter(lim.max_connections, lim.max_connections_per_ip),
                       Refusal(FULL, SHARE), lambda addr: Session())
    f = limit(name, f, lim, task.Clock())
    f.share(table.listener(name))
    return f


def connect(f: LimitedFactory, ip: str = IP) -> tuple[protocol.Protocol, StringTransport]:
    addr = IPv4Address("TCP", ip, 40000)
    p = f.buildProtocol(addr)
    t = StringTransport(peerAddress=addr)
    p.makeConnection(t)
    return p, t


def refused(t: StringTransport) -> bytes:
    return t.value() if t.disconnecting else b""


def test_an_address_gets_its_share_of_the_whole_server_not_of_each_process(tables):
    first, worker = tables
    here = factory(first, max_connections_per_ip=3, max_preauth_per_ip=3)
    there = factory(worker, max_connections_per_ip=3, max_preauth_per_ip=3)
    held = [connect(there) for _ in range(2)]
    assert not any(refused(t) for _, t in held)
    p, t = connect(here)
    assert not refused(t)
    assert refused(connect(here)[1]) == SHARE
    assert refused(connect(there)[1]) == SHARE  # full in the sum, seen from either side
    assert not refused(connect(here, "198.51.100.1")[1])  # another address has its own
    held[0][0].connectionLost(None)  # one closes in the other process: room here again
    assert not refused(connect(here)[1])


def test_the_listener_total_and_the_preauth_share_count_every_process(tables):
    first, worker = tables
    here = factory(first, max_connections=4, preauth_share_percent=50)  # pre-auth share 2
    there = factory(worker, max_connections=4, preauth_share_percent=50)
    one, _ = connect(there, "198.51.100.1")
    connect(there, "198.51.100.2")
    assert refused(connect(here, "203.0.113.1")[1]) == FULL
    one.connectionLost(None)
    assert not refused(connect(here, "203.0.113.1")[1])


def test_the_preauth_per_network_limit_counts_every_process(tables):
    first, worker = tables
    here = factory(first, "mx", max_preauth_per_prefix=2)
    there = factory(worker, "mx", max_preauth_per_prefix=2)
    connect(there, "192.0.2.1")
    connect(here, "192.0.2.2")
    assert refused(connect(here, "192.0.2.3")[1]) == SHARE


def test_logged_in_sessions_leave_the_preauth_counts_of_every_process(tables):
    first, worker = tables
    here = factory(first, max_connections=4, preauth_share_percent=50)
    there = factory(worker, max_connections=4, preauth_share_percent=50)
    for ip in ("198.51.100.1", "198.51.100.2"):
        connect(there, ip)[0].on_authenticated()
    assert not refused(connect(here, "203.0.113.1")[1])
    assert not refused(connect(here, "203.0.113.2")[1])
    assert refused(connect(here, "203.0.113.3")[1]) == FULL  # 4 in all, 2 of them logged in


def test_eviction_stays_in_the_process_that_holds_the_connection(tables):
    first, worker = tables
    clock = task.Clock()
    lim = dict(max_connections_per_ip=2, evict_idle_after=10.0)
    there = factory(worker, "mx", **lim)
    there.fairness_clock = clock
    here = factory(first, "mx", **lim)
    here.fairness_clock = clock
    connect(there)
    connect(there)
    clock.advance(60)  # both idle long enough to be evicted, but not by us
    assert refused(connect(here)[1]) == SHARE
    assert there.evictions == here.evictions == 0


def test_without_memfd_the_table_is_an_unlinked_file_in_data_dir(tmp_path, monkeypatch):
    def no_memfd(name: str) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "memfd_create", no_memfd)
    first = ConnectionTable.create(2, NAMES, str(tmp_path))
    assert os.listdir(tmp_path) == []  # nothing left behind
    worker = ConnectionTable.attach(os.dup(first.fileno()), NAMES, 1)
    worker.listener("mx").add(IP, NET, 1, 1)
    assert first.listener("mx").elsewhere(IP, NET).total == 1

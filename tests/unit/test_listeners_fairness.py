"""Connection fairness in listeners.LimitedFactory (docs/design/limits.md): pre-auth pools per
client, per network prefix and per listener, eviction of the slowest idle connection, the time
to log in, the process-wide file budget and the rate helper - on a task.Clock with fake
transports."""
from __future__ import annotations

import dataclasses

import pytest
from twisted.logger import globalLogPublisher

from twisted.internet import protocol, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport

from mailsuite.config import LimitsSection
from mailsuite.listeners import _Refused  # noqa: F401 (what a refused client gets)
from mailsuite.listeners import (ConnectionCounter, FileBudget, LimitedFactory, Refusal,
                                 TokenBucket, WrappedFactory, limit, network_prefix)

FULL = b"BUSY listener\r\n"
SHARE = b"BUSY you\r\n"


class Session(protocol.Protocol):
    """Stands for SMTP/IMAP/POP3: reports commands and logins through the factory's hooks."""

    def __init__(self) -> None:
        self.received = b""
        self.goodbyes: list[str] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.on_close()


class PoliteSession(Session):
    def evict(self, reason: str) -> None:
        self.goodbyes.append(reason)
        self.transport.write(b"421 bye\r\n")
        self.transport.loseConnection()


def make(name: str = "imap", clock: task.Clock | None = None, budget: FileBudget | None = None,
         cls: type = Session, **limits: object) -> LimitedFactory:
    lim = dataclasses.replace(LimitsSection(), **limits)
    f = LimitedFactory(name, ConnectionCounter(lim.max_connections, lim.max_connections_per_ip),
                       Refusal(FULL, SHARE), lambda addr: cls())
    return limit(name, f, lim, clock or task.Clock(), budget)


class Client:
    def __init__(self, factory: LimitedFactory, ip: str):
        addr = (IPv6Address if ":" in ip else IPv4Address)("TCP", ip, 40000)
        self.factory = factory
        self.proto = factory.buildProtocol(addr)
        self.transport = StringTransport(peerAddress=addr)
        self.proto.makeConnection(self.transport)

    @property
    def refused(self) -> bytes | None:
        """The refusal greeting, or None when admitted."""
        if not isinstance(self.proto, _Refused):
            return None
        return self.transport.value()

    @property
    def closing(self) -> bool:
        return self.transport.disconnecting

    def command(self) -> None:
        self.proto.dataReceived(b"NOOP\r\n")
        self.proto.on_progress()

    def login(self) -> None:
        self.proto.on_authenticated()

    def gone(self) -> None:
        """The transport reports the close (what a real reactor does after loseConnection)."""
        self.proto.connectionLost(None)


@pytest.fixture
def caplog_events():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def test_prefixes():
    assert network_prefix("192.0.2.77") == "192.0.2.0/24"
    assert network_prefix("::ffff:192.0.2.77") == "192.0.2.0/24"
    assert network_prefix("2001:db8:1:2:3::9") == "2001:db8:1:2::/64"
    assert network_prefix("unix") == "unix"


def test_preauth_per_ip_evicts_the_slowest_idle_connection_of_that_ip():
    clock = task.Clock()
    f = make(clock=clock, max_preauth_per_ip=2, evict_idle_after=5.0)
    a, b = Client(f, "192.0.2.1"), Client(f, "192.0.2.1")
    clock.advance(1)
    # Nobody idle long enough: the newcomer is refused, with the per-client greeting.
    assert Client(f, "192.0.2.1").refused == SHARE
    clock.advance(5)
    b.command()  # b is working, a is silent
    c = Client(f, "192.0.2.1")
    assert c.refused is None
    assert a.closing and not b.closing
    assert f.evictions == 1 and f.preauth == 2
    # Another address is not concerned by this one's share.
    assert Client(f, "192.0.2.2").refused is None


def test_logged_in_sessions_leave_the_preauth_pool_and_are_never_evicted():
    clock = task.Clock()
    f = make(clock=clock, max_preauth_per_ip=1, max_connections_per_ip=3, evict_idle_after=1.0)
    a = Client(f, "192.0.2.1")
    a.login()
    b = Client(f, "192.0.2.1")
    assert b.refused is None and f.preauth == 1
    clock.advance(100)
    c = Client(f, "192.0.2.1")  # b was idle: it makes room, a (logged in) is untouched
    assert c.refused is None and b.closing and not a.closing
    c.login()
    # Total per client (3) reached by logged-in sessions only: refused, nothing to evict.
    d = Client(f, "192.0.2.1")
    assert d.refused is None
    d.login()
    assert Client(f, "192.0.2.1").refused == SHARE


def test_per_prefix_share_and_a_normal_client_of_the_same_prefix_still_gets_in():
    """The slowloris of the issue, in miniature: many addresses of one /24 fill the prefix's
    share with silent connections; a client of the same /24 evicts the slowest and is served."""
    clock = task.Clock()
    f = make(name="mx", clock=clock, max_preauth_per_prefix=10, evict_idle_after=2.0)
    attackers = [Client(f, f"127.0.0.{2 + n % 5}") for n in range(10)]
    assert all(c.refused is None for c in attackers)
    assert Client(f, "127.0.0.30").refused == SHARE  # all fresh: nobody to drop yet
    clock.advance(3)
    normal = Client(f, "127.0.0.1")
    assert normal.refused is None
    assert sum(c.closing for c in attackers) == 1
    normal.command()
    # Other networks have their own share.
    assert Client(f, "198.51.100.1").refused is None
    # The newcomer that stays silent is dropped in its turn, after the working client.
    evicted = [c for c in attackers if c.closing]
    for c in evicted:
        c.gone()
    clock.advance(3)
    normal.command()
    late = Client(f, "127.0.0.9")
    assert late.refused is None and not normal.closing


def test_ipv6_prefix_and_ipv4_mapped_addresses():
    clock = task.Clock()
    f = make(clock=clock, max_preauth_per_prefix=2, evict_idle_after=1000)
    Client(f, "2001:db8::1"), Client(f, "2001:db8::2")
    assert Client(f, "2001:db8::3").refused == SHARE
    assert Client(f, "2001:db8:0:1::1").refused is None  # another /64
    g = make(clock=clock, max_preauth_per_ip=1, evict_idle_after=1000)
    Client(g, "192.0.2.1")
    assert Client(g, "::ffff:192.0.2.1").refused == SHARE  # the same client


def test_capacity_is_reserved_for_logged_in_sessions():
    clock = task.Clock()
    f = make(clock=clock, max_connections=10, preauth_share_percent=50, evict_idle_after=1000)
    pre = [Client(f, f"198.51.100.{n}") for n in range(5)]
    assert all(c.refused is None for c in pre)
    assert Client(f, "203.0.113.1").refused == FULL  # pre-auth pool full
    for c in pre[:3]:
        c.login()
    more = [Client(f, f"203.0.113.{n}") for n in range(3)]
    assert all(c.refused is None for c in more)
    for c in more:
        c.login()
    # 6 logged in + 2 pre-auth + 2 free: the pool takes 2 more, then the listener is full.
    assert Client(f, "192.0.2.1").refused is None
    assert Client(f, "192.0.2.2").refused is None
    assert Client(f, "192.0.2.3").refused == FULL


def test_mx_never_authenticates_its_whole_listener_is_the_pool():
    clock = task.Clock()
    f = make(name="mx", clock=clock, max_connections=4, evict_idle_after=5,
             preauth_timeout=1)
    clients = [Client(f, f"192.0.2.{n}") for n in range(4)]
    assert all(c.refused is None for c in clients)
    clock.advance(100)  # no time limit to log in on MX
    assert not any(c.closing for c in clients)
    for c in clients[1:]:
        c.command()
    assert Client(f, "198.51.100.1").refused is None
    assert clients[0].closing  # the silent one made room


def test_time_to_log_in():
    clock = task.Clock()
    f = make(clock=clock, preauth_timeout=60, cls=PoliteSession)
    slow, quick = Client(f, "192.0.2.1"), Client(f, "192.0.2.2")
    clock.advance(30)
    quick.login()
    slow.command()  # commands do not extend the time to log in
    clock.advance(29.9)
    assert not slow.closing
    clock.advance(0.1)
    assert slow.closing and slow.transport.value().endswith(b"421 bye\r\n")
    assert "not logged in within 60 s" in slow.proto.goodbyes[0]
    assert not quick.closing
    # It is aborted if it does not close by itself.
    clock.advance(2)
    assert slow.transport.disconnected
    slow.gone()
    assert f.files == 1 and f.closing == 0 and f.preauth == 0


def test_default_goodbye_without_evict_and_slots_freed_once():
    clock = task.Clock()
    f = make(name="pop3", clock=clock, max_preauth_per_ip=1, evict_idle_after=1)
    a = Client(f, "192.0.2.1")
    clock.advance(2)
    b = Client(f, "192.0.2.1")
    assert a.transport.value() == b"-ERR [SYS/TEMP] Too many connections, closing this idle one\r\n"
    assert f.connections.active["192.0.2.1"] == 1
    a.gone()  # its slot was given back at eviction: not twice
    assert f.connections.active["192.0.2.1"] == 1 and f.preauth == 1
    b.gone()
    assert f.connections.active == {} and f.preauth == 0 and f.files == 0


def test_octets_received_count_as_progress():
    """A message being transferred (DATA, APPEND) is one long command: its octets protect it,
    a slowloris's trickle does not."""
    clock = task.Clock()
    f = make(name="mx", clock=clock, max_connections=2, evict_idle_after=5, progress_bytes=1000)
    upload, trickle = Client(f, "192.0.2.1"), Client(f, "192.0.2.2")
    for _ in range(10):
        clock.advance(1)
        upload.proto.dataReceived(b"x" * 500)
        trickle.proto.dataReceived(b"x")
    assert Client(f, "198.51.100.1").refused is None
    assert trickle.closing and not upload.closing
    assert upload.proto.received.startswith(b"x" * 5000)  # the protocol still gets every octet


def test_file_budget_per_listener_share_and_process_wide():
    clock = task.Clock()
    budget = FileBudget(total=10, listener_percent=50)
    http = make(name="autoconfig", clock=clock, budget=budget, evict_idle_after=1000)
    imap = make(name="imaps", clock=clock, budget=budget, evict_idle_after=1000,
                preauth_timeout=0)
    mx = make(name="mx", clock=clock, budget=budget, evict_idle_after=1000)
    flood = [Client(http, f"10.0.{n}.1") for n in range(20)]
    assert sum(c.refused is None for c in flood) == 5  # one listener: half the budget at most
    for c in flood:
        if c.refused is not None:
            c.proto.connectionLost(None)  # refused: closed at once (plain TCP)
    assert all(Client(imap, f"10.1.{n}.1").refused is None for n in range(3))
    assert all(Client(mx, f"10.2.{n}.1").refused is None for n in range(2))
    assert budget.open == 10 and budget.full
    # Process budget full: nobody idle long enough, refused...
    late = Client(mx, "192.0.2.1")
    assert late.refused == FULL
    late.proto.connectionLost(None)
    # ...but once the flood has been idle, a newcomer on MX takes the place of the slowest.
    clock.advance(2000)
    for c in flood[:5]:
        c.command()  # the web clients are busy: an idle IMAP or MX connection goes
    assert Client(mx, "192.0.2.1").refused is None
    assert budget.closing == 1 and not any(c.closing for c in flood[:5])


def test_file_budget_from_rlimit():
    lim = LimitsSection()
    b = FileBudget.from_limits(lim, nofile=1024)
    assert b.total == 1024 - 204 and b.listener_cap == (1024 - 204) // 2
    assert FileBudget.from_limits(lim, nofile=256).total == 128  # the reserve is at least 128
    small = dataclasses.replace(lim, max_open_files=60, listener_files_percent=25)
    b = FileBudget.from_limits(small, nofile=100000)
    assert b.total == 60 and b.listener_cap == 15


def test_eviction_log_is_rate_limited(caplog_events):
    clock = task.Clock()
    f = make(name="mx", clock=clock, max_connections=1, evict_idle_after=1)
    Client(f, "192.0.2.1")
    for n in range(30):
        clock.advance(1.5)
        Client(f, f"192.0.2.{n + 2}")
    lines = [e for e in caplog_events if "evicted a connection" in e.get("log_format", "")]
    assert len(lines) == 10 and f.evictions == 30
    clock.advance(60)
    summary = [e for e in caplog_events
               if "more connections" in e.get("log_format", "") and e.get("what") == "evicted"]
    assert len(summary) == 1 and summary[0]["n"] == 20


def test_wrapped_factory_for_a_plain_site():
    class Site(protocol.ServerFactory):
        protocol = Session
        started = 0

        def startFactory(self) -> None:
            self.started += 1

    clock = task.Clock()
    site = Site()
    f = limit("autoconfig", site, dataclasses.replace(LimitsSection(), max_connections=1),
              clock)
    assert isinstance(f, WrappedFactory)
    f.doStart()
    assert site.started == 1
    c = Client(f, "192.0.2.1")
    assert c.refused is None and c.proto.factory is site
    assert Client(f, "192.0.2.2").refused.startswith(b"HTTP/1.1 503")


def test_without_configuration_only_the_counter_applies():
    f = LimitedFactory("x", ConnectionCounter(2, 1), Refusal(FULL, SHARE), lambda addr: Session())
    a = Client(f, "192.0.2.1")
    assert Client(f, "192.0.2.1").refused == SHARE
    assert Client(f, "192.0.2.2").refused is None
    assert Client(f, "192.0.2.3").refused == FULL
    a.gone()
    assert Client(f, "192.0.2.3").refused is None


def test_token_bucket():
    clock = task.Clock()
    bucket = TokenBucket(rate=2, burst=3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_time() == 0.5
    clock.advance(0.5)
    assert bucket.take() and not bucket.take()
    clock.advance(100)
    assert sum(bucket.take() for _ in range(10)) == 3


def test_a_crowd_cannot_churn_its_own_places_but_a_new_client_gets_one():
    clock = task.Clock()
    f = make(name="mx", clock=clock, max_preauth_per_prefix=10, evict_idle_after=1.0)
    crowd = {ip: [Client(f, ip) for _ in range(2)] for ip in (f"127.0.0.{n}" for n in range(2, 7))}
    clock.advance(2)
    normal = Client(f, "127.0.0.1")
    assert normal.refused is None
    (loser,) = [ip for ip, cs in crowd.items() if any(c.closing for c in cs)]
    # The crowd cannot take the place back, neither from another of its addresses nor by
    # swapping its own idle connections for fresh ones.
    assert Client(f, loser).refused == SHARE
    assert Client(f, "127.0.0.2").refused == SHARE
    assert sum(c.closing for cs in crowd.values() for c in cs) == 1
    # A client new to the listener still gets in (an address of the crowd gives up a place).
    assert Client(f, "127.0.0.50").refused is None
    normal.command()
    assert not normal.closing


def test_a_protocol_that_never_calls_on_close_still_gives_its_slot_back():
    class Forgetful(protocol.Protocol):
        pass

    f = LimitedFactory("x", ConnectionCounter(1, 1), Refusal(FULL, SHARE),
                       lambda addr: Forgetful())
    limit("autoconfig", f, LimitsSection(), task.Clock(), FileBudget(10))
    a = Client(f, "192.0.2.1")
    a.proto.connectionLost(None)
    assert f.files == 0 and f.budget.open == 0 and f.connections.total == 0
    assert Client(f, "192.0.2.1").refused is None


def test_a_refused_connection_is_aborted_if_it_does_not_close():
    """Under TLS a refusal waits for a handshake a slowloris never completes: it must not keep
    its descriptor for long."""
    clock = task.Clock()
    budget = FileBudget(total=10)
    f = make(clock=clock, budget=budget, max_connections=1, evict_idle_after=1000)
    Client(f, "192.0.2.1")
    refused = Client(f, "192.0.2.2")
    assert refused.refused == FULL and refused.closing
    assert budget.open == 2 and budget.closing == 1
    clock.advance(2)
    assert refused.transport.disconnected  # aborted
    refused.proto.connectionLost(None)
    assert budget.open == 1 and budget.closing == 0


# -- the accounting under any sequence of events --------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EVENTS = st.lists(st.tuples(st.sampled_from(["connect", "progress", "login", "close", "tick",
                                             "data"]),
                            st.integers(0, 7)), max_size=80)


@settings(max_examples=60, deadline=None)
@given(EVENTS)
def test_accounting_stays_exact(events):
    """Whatever clients do and whenever the transport reports closes, the counts match the
    connections really open, nothing goes negative and the limits hold."""
    clock = task.Clock()
    budget = FileBudget(total=12)
    f = make(clock=clock, budget=budget, max_connections=8, max_connections_per_ip=4,
             max_preauth_per_ip=2, max_preauth_per_prefix=5, preauth_timeout=30,
             evict_idle_after=3)
    g = make(name="mx", clock=clock, budget=budget, max_connections=8, evict_idle_after=3)
    clients: list[Client] = []
    for kind, n in events:
        live = [c for c in clients if c.refused is None and not c.transport.disconnected
                and not getattr(c, "lost", False)]
        if kind == "connect":
            factory = f if n % 2 else g
            ip = f"192.0.{n % 3}.{n % 4}"
            clients.append(Client(factory, ip))
        elif kind == "tick":
            clock.advance(n + 0.5)
        elif live:
            c = live[n % len(live)]
            if kind == "progress":
                c.command()
            elif kind == "data":
                c.proto.dataReceived(b"x" * 5000)
            elif kind == "login":
                c.login()
            elif kind == "close" and n % 2:
                c.lost = True
                c.proto.connectionLost(None)  # the client hangs up
        # The transport reports closes some time after loseConnection / abortConnection.
        for c in clients:
            closing = c.transport.disconnecting or c.transport.disconnected
            if closing and (kind == "close" or c.transport.disconnected):
                if not getattr(c, "lost", False):
                    c.lost = True
                    c.proto.connectionLost(None)
        for factory in (f, g):
            open_ = [c for c in factory._conns]
            assert factory.files == len(open_)
            assert factory.closing == sum(c.evicted for c in open_)
            pre = [c for c in open_ if not c.authenticated and not c.evicted]
            assert factory.preauth == len(pre) <= factory.rules.max_preauth
            assert factory.connections.total == sum(not c.evicted for c in open_)
            assert factory.connections.total <= factory.connections.max_total
            assert all(v > 0 for v in factory._preauth_ip.values())
        refused = [c for c in clients if c.refused is not None and not getattr(c, "lost", False)]
        assert budget.open == f.files + g.files + len(refused)
        assert budget.closing == f.closing + g.closing + len(refused)


def test_a_connection_its_protocol_closes_gives_its_place_back_at_once():
    """QUIT: the 221 is sent before the reactor closes the socket (mailsuite/writethrough.py),
    so the client may be back first; its departing connection must not hold its place."""
    clock = task.Clock()
    f = make(name="mx", clock=clock, max_preauth_per_prefix=3, evict_idle_after=1.0)
    crowd = [Client(f, "127.0.0.2") for _ in range(2)]
    normal = Client(f, "127.0.0.1")
    assert normal.refused is None and f.preauth == 3
    normal.proto.transport.loseConnection()  # what QUIT does; connectionLost comes later
    assert f.connections.active.get("127.0.0.1", 0) == 0 and f.preauth == 2
    assert f.files == 3  # its descriptor is still open
    again = Client(f, "127.0.0.1")
    assert again.refused is None and not any(c.closing for c in crowd)
    normal.gone()  # the reactor closes it: nothing is given back twice
    assert f.connections.active["127.0.0.1"] == 1 and f.preauth == 3 and f.files == 3
    clock.advance(2)  # the departing connection is never a victim either
    assert [c.transport.value() for c in crowd] == [b"", b""]


def test_a_login_after_the_protocol_closed_counts_nothing_twice():
    f = make(name="imap", clock=task.Clock(), max_preauth_per_ip=2)
    a = Client(f, "192.0.2.1")
    a.proto.transport.loseConnection()
    a.login()
    a.gone()
    assert f.connections.active == {} and f.preauth == 0 and f.files == 0 and f.sessions == 0

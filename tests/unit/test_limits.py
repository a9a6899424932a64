"""The connection counter every listener uses for [limits] max_connections(_per_ip)."""
from mailsuite.listeners import ConnectionCounter


def test_per_ip_and_total_limits():
    c = ConnectionCounter(max_total=3, max_per_ip=2)
    assert c.admit("192.0.2.1") and c.admit("192.0.2.1")
    assert not c.admit("192.0.2.1")  # this client's share is used up...
    assert not c.full  # ...but the listener is not full
    assert c.admit("192.0.2.2")
    assert c.full
    assert not c.admit("192.0.2.3")  # a fresh client is refused once the total is reached
    c.release("192.0.2.1")
    assert not c.full and c.admit("192.0.2.3")


def test_release_of_an_unknown_client_changes_nothing():
    c = ConnectionCounter(max_total=1, max_per_ip=1)
    c.release("192.0.2.9")
    assert c.admit("192.0.2.1") and not c.admit("192.0.2.2")
    c.release("192.0.2.1")
    assert c.active == {} and c.admit("192.0.2.2")


def test_every_listener_is_limited_and_shares_one_file_budget(tmp_path, monkeypatch):
    """service.make_service hands each listener's factory (the autoconfig Site included) its
    fairness rules, the clock and the one process-wide FileBudget (docs/design/limits.md)."""
    from twisted.internet.testing import MemoryReactorClock
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from mailsuite.config import Config
    from mailsuite.listeners import LimitedFactory
    from mailsuite.service import make_service

    # The system resolver would schedule a re-read of resolv.conf on the global reactor.
    monkeypatch.setattr("twisted.names.client.getResolver", lambda: None)
    config = Config()
    config.server.data_dir = str(tmp_path)
    config.server.hostname = "mx.example.org"
    reactor = MemoryReactorClock()
    top = make_service(config, reactor=reactor)
    factories = {}
    for svc in top.getServiceNamed("front"):
        if svc.name and svc.name.startswith("listen-"):
            f = svc.factory
            if isinstance(f, TLSMemoryBIOFactory):
                f = f.wrappedFactory
            factories[svc.name[7:]] = f
    assert set(factories) == {"mx", "submission", "submissions", "imap", "imaps", "pop3",
                              "pop3s", "autoconfig", "metrics", "admin"}
    budgets = {id(f.budget) for f in factories.values()}
    assert len(budgets) == 1
    for name, f in factories.items():
        assert isinstance(f, LimitedFactory) and f.fairness_clock is reactor, name
        assert f.authenticates == (name not in ("mx", "autoconfig", "metrics", "admin")), name
        assert f in f.budget.factories
    from twisted.internet import reactor as global_reactor

    assert not global_reactor.getDelayedCalls()  # nothing left behind for later tests

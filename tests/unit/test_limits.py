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

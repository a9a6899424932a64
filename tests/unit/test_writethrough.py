"""mailsuite/writethrough.py: a write to an idle socket is sent at once, anything else keeps
Twisted's buffered path and its order (docs/design/twisted.md, "Writing to sockets")."""
from __future__ import annotations

import socket

import pytest
from twisted.internet import abstract, tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock

from mailsuite import writethrough


@pytest.fixture
def pair():
    writethrough.install()
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reactor = MemoryReactorClock()
    connection = tcp.Connection(ours, Protocol(), reactor)
    connection.connected = 1
    theirs.setblocking(False)
    yield connection, theirs, reactor
    ours.close()
    theirs.close()


def received(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def test_install_replaces_the_buffered_write():
    writethrough.install()
    writethrough.install()
    assert writethrough.installed()
    assert abstract.FileDescriptor.write is not writethrough._buffered_write


def test_a_reply_to_an_idle_socket_is_sent_by_the_write_itself(pair):
    connection, theirs, reactor = pair
    connection.write(b"250 2.0.0 Ok\r\n")
    assert received(theirs) == b"250 2.0.0 Ok\r\n"
    assert connection not in reactor.writers  # no epoll registration, nothing buffered
    assert connection.dataBuffer == b"" and not connection._tempDataBuffer


def test_what_the_socket_does_not_take_is_buffered_and_order_is_kept(pair):
    connection, theirs, reactor = pair
    big = bytes(range(256)) * 4096  # 1 MiB: far more than the socket buffers hold
    connection.write(big)
    assert connection in reactor.writers
    connection.write(b"TAIL")  # something waits: this must queue behind it, not jump ahead
    got = received(theirs)
    assert 0 < len(got) < len(big)
    while connection in reactor.writers:  # what the reactor would do as the peer reads
        connection.doWrite()
        got += received(theirs)
    assert got == big + b"TAIL"


def test_a_connection_being_closed_keeps_the_buffered_path(pair):
    connection, theirs, reactor = pair
    connection.disconnecting = True
    connection.write(b"221 bye\r\n")
    assert received(theirs) == b""
    assert connection in reactor.writers


def test_nothing_is_sent_after_abort_connection(pair):
    connection, theirs, reactor = pair
    connection.abortConnection()
    connection.write(b"too late\r\n")
    assert received(theirs) == b""


def test_a_send_error_is_left_to_the_buffered_path(pair):
    connection, theirs, reactor = pair
    theirs.close()
    connection.write(b"x" * 10)  # EPIPE/ECONNRESET: doWrite will see it and close
    # No exception here; the data waits for doWrite, which reports the lost connection.
    assert connection in reactor.writers

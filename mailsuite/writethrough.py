"""Replies go out at once: a write to a socket with nothing buffered is sent by the call that
makes it (docs/design/twisted.md, "Writing to sockets").

Twisted's `FileDescriptor.write` only buffers: it registers the socket for writability
(`epoll_ctl`), the next poll reports it writable, `doWrite` sends, and the socket is taken off
again (a second `epoll_ctl`). A mail session writes one short reply per command, so each reply
cost two system calls and a pass through the reactor's dispatch besides its `send`. `install()`
makes `FileDescriptor.write` try the `send` first when the connection is a socket with nothing
waiting in its buffers; whatever the socket does not take (a full socket buffer) and every
other case go the usual way, so the order of bytes and Twisted's flow control (producers,
`loseConnection` after the last write) are unchanged. The TLS transports write their records
through the same method, so it covers IMAPS, POP3S and the STARTTLS sessions too.

One thing does change: a goodbye (221, BYE) now reaches the client before the reactor closes
the socket, so a client may connect again while its old connection is still open; the
connection limits give a closing connection's place back at `loseConnection()` for that
(mailsuite/listeners.py, docs/design/limits.md).
"""
from __future__ import annotations

from typing import Any

from twisted.internet import abstract, tcp

_buffered_write = abstract.FileDescriptor.write


def _write(self: abstract.FileDescriptor, data: Any) -> None:
    if (data and not self.dataBuffer and not self._tempDataBuffer and self.connected
            and not self.disconnecting and not self._writeDisconnected
            and isinstance(self, tcp.Connection) and not self._aborting
            and isinstance(data, bytes)):
        try:
            sent = self.socket.send(data)
        except OSError:  # EAGAIN, or a reset the buffered path reports through doWrite
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    _buffered_write(self, data)


def install() -> None:
    """Idempotent; for the whole process (every listener and outbound connection)."""
    abstract.FileDescriptor.write = _write  # type: ignore[method-assign]


def installed() -> bool:
    return abstract.FileDescriptor.write is _write

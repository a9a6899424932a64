"""Fixtures shared by all tests: a real mailsuite process per test (or per module)."""
from __future__ import annotations

import os

import pytest

from tests.harness import MailServer


@pytest.fixture
def make_server(tmp_path):
    """Factory: make_server(extra=..., start=True) -> a running MailServer, stopped after the test."""
    servers: list[MailServer] = []

    def make(extra=None, start=True, name=None, **kwargs) -> MailServer:
        base = os.path.join(str(tmp_path), name or f"server{len(servers)}")
        server = MailServer(base, extra=extra, **kwargs)
        servers.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server):
    """A running server with domain example.org and users alice@ and bob@ (password secret-pw-1)."""
    s = make_server()
    s.add_user("alice@example.org")
    s.add_user("bob@example.org")
    return s

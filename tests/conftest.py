"""Fixtures shared by all layers: a real mailsuite process per test (scenario and interop), and
`require_program` (skip locally, fail under CI; see tests/environment.py)."""
from __future__ import annotations

import os

import pytest

from tests import environment
from tests.harness import MailServer


@pytest.fixture
def require_program():
    """require_program(name, package=None) -> path: skip when missing, fail under CI."""
    return environment.require_program


@pytest.fixture
def postgresql_url() -> str:
    """A reachable PostgreSQL URL: skip when there is none, fail under CI."""
    return environment.require_postgresql()


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

"""The unit layer: everything in memory (StringTransport, task.Clock, InlinePool, fakes, files on
tmp_path); no subprocess, no socket, no sleep. See docs/design/testing.md."""
from __future__ import annotations

import pytest

from mailsuite.directory import passwords

# argon2id with the cheapest parameters (a few ms instead of ~0.5 s per hash): the unit layer
# tests what is hashed, verified and rehashed, not the cost. The scenario layer keeps the real
# parameters.
FAST_HASHING = passwords.CONTEXT.copy(argon2__rounds=1, argon2__memory_cost=4096,
                                      argon2__parallelism=1)


@pytest.fixture(autouse=True)
def fast_password_hashing(monkeypatch):
    monkeypatch.setattr(passwords, "CONTEXT", FAST_HASHING)

"""Unique names for files, queue ids and transaction ids, made without a system call.

`secrets.token_hex` asks the kernel for random bytes at each call (getrandom); a busy MX made
several such names per message on the reactor thread. These names need to be unique, not
secret, so they come from a generator seeded from the kernel once per process (again in a
forked child, which would otherwise repeat its parent's names). Anything an attacker must not
guess (keys, SRS secrets, tokens) keeps using `secrets`.
"""
from __future__ import annotations

import os
import random

_generator = random.Random()
_pid = 0


def _seed() -> None:
    global _pid
    _generator.seed(os.urandom(32))
    _pid = os.getpid()


def token_hex(nbytes: int) -> str:
    """2 * nbytes lowercase hex digits, as secrets.token_hex(nbytes) gives."""
    return f"{_generator.getrandbits(nbytes * 8):0{nbytes * 2}x}"


def pid() -> int:
    """os.getpid() of this process, remembered (kept right across fork)."""
    return _pid


_seed()
os.register_at_fork(after_in_child=_seed)

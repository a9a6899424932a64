"""mailsuite/unique.py: names shaped as secrets.token_hex's, unique, and this process's pid."""
from __future__ import annotations

import os
import re

from mailsuite import unique


def test_tokens_have_the_shape_of_token_hex():
    for nbytes in (1, 4, 6, 8):
        token = unique.token_hex(nbytes)
        assert re.fullmatch(f"[0-9a-f]{{{2 * nbytes}}}", token), token


def test_tokens_do_not_repeat():
    tokens = {unique.token_hex(8) for _ in range(100_000)}
    assert len(tokens) == 100_000


def test_the_pid_is_this_process():
    assert unique.pid() == os.getpid()


def test_a_new_seed_gives_new_tokens():
    # What a forked child does first (os.register_at_fork): it must not repeat its parent.
    state = unique._generator.getstate()
    before = [unique.token_hex(8) for _ in range(3)]
    unique._generator.setstate(state)
    unique._seed()
    assert [unique.token_hex(8) for _ in range(3)] != before

"""SMTP dialog tests: each tests/dialogs/*.txt file is a small conversation with our server,
played in memory (StringTransport, task.Clock, fake directory and queue; see
tests/dialogs/README for the format). Adding an edge case is adding a file."""
from __future__ import annotations

import pytest

from tests.unit.smtpkit import DIALOG_LIMITS, DIALOGS, World, dialog_path, run_dialog


@pytest.mark.parametrize("name", DIALOGS)
def test_dialog(name):
    world = World(limits=DIALOG_LIMITS)
    run_dialog(world.connect, world.queue.count_for, dialog_path(name))

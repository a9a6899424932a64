"""Fixtures of the interop layer: the engines' private daemons (tests/daemons.py), one of each per
test module that asks for it."""
from __future__ import annotations

import pytest

from tests.daemons import ClamdDaemon, RspamdDaemon


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory):
    with RspamdDaemon(str(tmp_path_factory.mktemp("rspamd"))) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def clamd(tmp_path_factory):
    with ClamdDaemon(str(tmp_path_factory.mktemp("clamd"))) as daemon:
        yield daemon

"""Claims on the spool between processes: a claim excludes other processes, and the kernel
drops the claim of a process killed with SIGKILL (so a crash never leaves an entry stuck)."""
from __future__ import annotations

import multiprocessing
import signal

import pytest

from mailsuite.queue.spool import Spool, SpoolError
from tests.unit.test_spool import DATA, make_entry


@pytest.fixture
def spool(tmp_path) -> Spool:
    s = Spool(str(tmp_path / "queue"))
    s.ensure()
    return s


def _hold_claim(directory: str, queue_id: str, ready, done) -> None:
    s = Spool(directory)
    claim = s.claim(queue_id)
    ready.put(claim is not None)
    done.wait(10)


def _hold_and_die(directory: str, queue_id: str, ready) -> None:
    s = Spool(directory)
    claim = s.claim(queue_id)
    ready.put(claim is not None)
    while True:
        signal.pause()  # until the test kills us


def test_claim_is_exclusive_between_processes(spool):
    entry = make_entry()
    spool.store(entry, DATA)
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_hold_claim, args=(spool.directory, entry.id, ready, done))
    child.start()
    try:
        assert ready.get(timeout=10) is True
        assert spool.claim(entry.id) is None
        with pytest.raises(SpoolError, match="being delivered"):
            spool.claim_wait(entry.id, timeout=0.3)
    finally:
        done.set()
        child.join(10)
    claim = spool.claim(entry.id)
    assert claim is not None
    claim.release()


def test_claim_of_a_killed_process_is_released(spool):
    entry = make_entry()
    spool.store(entry, DATA)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Queue()
    child = ctx.Process(target=_hold_and_die, args=(spool.directory, entry.id, ready))
    child.start()
    assert ready.get(timeout=10) is True
    assert spool.claim(entry.id) is None
    child.kill()  # SIGKILL: no cleanup code runs; the kernel drops the flock
    child.join(10)
    claim = spool.claim(entry.id)
    assert claim is not None
    claim.release()

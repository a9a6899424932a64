"""`mailsuite queue ...` while another process (standing in for the queue runner) holds the
entry's claim: the change waits for it and then gives up with one line, changing nothing."""
from __future__ import annotations

import multiprocessing

from mailsuite.queue.spool import Spool
from tests.unit.test_queue_cmd import add, env, run  # noqa: F401 (env is a fixture)


def _hold_claim(directory, queue_id, ready, done):
    claim = Spool(directory).claim(queue_id)
    ready.put(claim is not None)
    done.wait(20)


def test_change_waits_for_the_runner_claim(env, capsys, monkeypatch):
    spool = env[1]
    e = add(spool)
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_hold_claim, args=(spool.directory, e.id, ready, done))
    child.start()
    try:
        assert ready.get(timeout=10)
        original = Spool.claim_wait
        monkeypatch.setattr(Spool, "claim_wait",
                            lambda self, qid, timeout=10.0: original(self, qid, timeout=0.3))
        code, out, err = run(env, capsys, "hold", e.id)
        assert code == 1 and "being delivered right now" in err
        assert not spool.load(e.id).held  # nothing changed behind the runner's back
    finally:
        done.set()
        child.join(10)
    assert run(env, capsys, "hold", e.id)[0] == 0

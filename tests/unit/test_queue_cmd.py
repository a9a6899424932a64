"""`mailsuite queue ...` on a real spool, through the CLI's own entry point (cli.main).

A change racing a runner that holds the entry (another process) is in
tests/scenario/test_queue_cmd.py."""
from __future__ import annotations

import json
import os
import time

import pytest

from mailsuite.admin import cli
from mailsuite.queue.spool import QueueEntry, Recipient, Spool, new_queue_id
from tests.harness import write_toml
from tests.unit.queuekit import spool_files


@pytest.fixture
def env(tmp_path):
    config_path = str(tmp_path / "mailsuite.toml")
    write_toml(config_path, {"server": {"data_dir": str(tmp_path / "data")}})
    spool = Spool(str(tmp_path / "data" / "queue"))
    spool.ensure()
    return config_path, spool


def run(env, capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["--config", env[0], "queue", *args])
    out, err = capsys.readouterr()
    return code, out, err


def add(spool: Spool, **kw) -> QueueEntry:
    entry = QueueEntry(new_queue_id(), kw.pop("sender", "carol@remote.example"),
                       kw.pop("recipients", [Recipient("alice@example.org", "Alice@example.org",
                                                       True)]),
                       kw.pop("created", time.time() - 125), **kw)
    spool.store(entry, b"From: carol@remote.example\r\nSubject: queued one\r\n\r\nbody\r\n")
    return entry


def test_list_empty(env, capsys):
    assert run(env, capsys, "list") == (0, "queue is empty\n", "")


def test_list_shows_recipients_states_errors_and_next_attempt(env, capsys):
    spool = env[1]
    e = add(spool, recipients=[
        Recipient("alice@example.org", "Alice+x@example.org", True, state="sent", attempts=1),
        Recipient("dave@far.example", "dave@far.example", False, attempts=2,
                  next_attempt=time.time() + 600, last_error="451 4.7.1 greylisted",
                  remote_mta="mx.far.example")])
    code, out, err = run(env, capsys, "list")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith(f"{e.id}  age 2m0") and "from <carol@remote.example>" in lines[0]
    assert lines[1].split() == ["alice@example.org", "sent", "(rcpt", "Alice+x@example.org)"]
    assert lines[2].startswith("    dave@far.example  pending  attempts=2  next attempt in 9m5")
    assert lines[2].endswith("last error: 451 4.7.1 greylisted")
    assert lines[-1] == "1 entry, 1 recipient pending"


def test_show(env, capsys):
    e = add(env[1])
    code, out, _ = run(env, capsys, "show", e.id)
    assert code == 0
    envelope, headers = out.split("\n\n", 1)
    assert json.loads(envelope)["recipients"][0]["original"] == "Alice@example.org"
    assert headers == "From: carol@remote.example\nSubject: queued one\n"


def test_hold_release_retry_delete(env, capsys):
    spool = env[1]
    e = add(spool, recipients=[Recipient("a@b.example", "a@b.example", False, attempts=3,
                                         next_attempt=time.time() + 3600)])
    kick = spool.kick_mtime()
    assert run(env, capsys, "hold", e.id)[:2] == (0, f"held {e.id}\n")
    assert spool.load(e.id).held
    assert "[held]" in run(env, capsys, "list")[1]
    assert run(env, capsys, "release", e.id)[:2] == (0, f"released {e.id}\n")
    assert not spool.load(e.id).held
    assert spool.kick_mtime() != kick  # a running server looks again within a second
    assert spool.load(e.id).recipients[0].next_attempt == 0.0  # release also makes it due
    spool_entry = spool.load(e.id)
    spool_entry.recipients[0].next_attempt = time.time() + 3600
    spool.save(spool_entry)
    os.utime(spool.kick_path, ns=(0, 0))  # back in time: any later touch is a change
    kick = spool.kick_mtime()
    assert run(env, capsys, "retry", e.id)[:2] == (0, "1 entry due for delivery now\n")
    assert spool.load(e.id).recipients[0].next_attempt == 0.0
    assert spool.kick_mtime() != kick
    assert run(env, capsys, "delete", e.id)[:2] == (0, f"deleted {e.id}\n")
    assert spool.ids() == [] and spool_files(spool.directory) == [".kick"]


def test_retry_all_skips_sent_recipients(env, capsys):
    spool = env[1]
    a = add(spool, recipients=[Recipient("x@y.example", "x@y.example", False,
                                         next_attempt=time.time() + 99)])
    b = add(spool, recipients=[Recipient("u@v.example", "u@v.example", False, state="sent",
                                         next_attempt=5.0),
                               Recipient("w@v.example", "w@v.example", False,
                                         next_attempt=time.time() + 99)])
    assert run(env, capsys, "retry", "--all")[:2] == (0, "2 entries due for delivery now\n")
    assert spool.load(a.id).recipients[0].next_attempt == 0.0
    assert [r.next_attempt for r in spool.load(b.id).recipients] == [5.0, 0.0]


@pytest.mark.parametrize("args", [["show", "6b0a00000000000000000"],
                                  ["retry", "6b0a00000000000000000"],
                                  ["delete", "6b0a00000000000000000"],
                                  ["hold", "../../etc/passwd"],
                                  ["release", "6b0a00000000000000000"],
                                  ["retry"], ["retry", "6b0a00000000000000000", "--all"]])
def test_refusals_are_one_line_and_exit_1(env, capsys, args):
    code, out, err = run(env, capsys, *args)
    assert code == 1 and out == ""
    assert err.startswith("mailsuite: ") and err.count("\n") == 1


def test_damaged_entries_are_listed_shown_and_deletable(env, capsys):
    spool = env[1]
    bad_envelope, no_message, good = add(spool), add(spool), add(spool)
    with open(spool.envelope_path(bad_envelope.id), "w") as f:
        f.write("{broken")
    os.unlink(spool.message_path(no_message.id))
    code, out, _ = run(env, capsys, "list")
    assert code == 0
    assert f"!! queue entry {bad_envelope.id} has a damaged envelope" in out
    assert good.id in out
    code, out, _ = run(env, capsys, "show", bad_envelope.id)
    assert "{broken" in out
    assert run(env, capsys, "delete", bad_envelope.id)[0] == 0
    assert run(env, capsys, "delete", no_message.id)[0] == 0
    assert spool.ids() == [good.id]

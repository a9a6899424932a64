"""A header-only FETCH formatted a batch at a time in the io pool (`HeaderForm`) writes exactly
the bytes of the general writer, over whole and partial header blocks, HEADER.FIELDS, NULs,
streamed (huge) headers, vanished files, gap-free runs and scattered UID sets, and batches cut
by count and by size (docs/design/imap.md, "FETCH")."""
from __future__ import annotations

import os
import random

import pytest

from mailsuite.imap import fetch
from mailsuite.imap.fetch import FetchCommand, HeaderForm
from mailsuite.imap.parser import FetchAtt, fetch_atts, tokenize
from tests.unit.imapkit import world  # noqa: F401
from tests.unit.test_mailbox_header_cache import random_message

COMMANDS = [
    b"UID FETCH 1:* (BODY.PEEK[HEADER])",
    b"FETCH 1:* (BODY.PEEK[HEADER])",
    b"FETCH 1:* (RFC822.HEADER RFC822.SIZE)",
    b"UID FETCH 1:* (RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM SUBJECT X-FOLDED)] UID)",
    b"FETCH 2:7,9,12:* (BODY.PEEK[HEADER]<0.10> BODY.PEEK[HEADER]<7.3> "
    b"BODY.PEEK[HEADER]<100000.5>)",
    b"UID FETCH 3,5,8:10,15:* (BODY.PEEK[HEADER.FIELDS.NOT (RECEIVED)])",
    b"FETCH 1:* (BODY.PEEK[HEADER.FIELDS (X-FOLDED)]<0.15> UID)",
]


def fill(world, count: int = 40) -> None:
    rng = random.Random(7)
    for i in range(count):
        world.append("alice@example.org", "Heads", random_message(rng, i))


def fetch_both(world, monkeypatch, command: bytes, before=None) -> tuple[bytes, bytes, list]:
    """In one session: (the pool-formatted output, the general writer's output, the forms
    used). The pool's runs first (cache cold) and last (warm): both must be the same."""
    used: list = []
    real = HeaderForm.of

    def spy(cmd):
        form = real(cmd)
        used.append(form)
        return form

    r = world.connect()
    r.cmd(b"s SELECT Heads")
    if before is not None:
        before(r)
    outputs = []
    for i, formed in enumerate((True, False, True)):
        monkeypatch.setattr(HeaderForm, "of", staticmethod(spy if formed else lambda cmd: None))
        r.pending()
        r.buf = b""
        r.send(b"f%d " % i + command + b"\r\n")
        out = r.pending()
        assert out.endswith(b"f%d OK FETCH completed\r\n" % i), out[-200:]
        outputs.append(out.replace(b"f%d OK" % i, b"f OK"))
    r.close()
    assert outputs[2] == outputs[0]
    return outputs[0], outputs[1], used


@pytest.mark.parametrize("command", COMMANDS)
def test_pool_formatted_headers_are_the_general_writers_bytes(world, monkeypatch, command):
    fill(world)
    formed, general, used = fetch_both(world, monkeypatch, command)
    assert used and used[0] is not None
    assert formed.count(b" FETCH (") == general.count(b" FETCH (") > 5
    assert formed == general


def test_small_batches_and_a_vanished_file_give_the_same_bytes(world, monkeypatch):
    fill(world, 30)
    monkeypatch.setattr(fetch, "HEADER_BATCH", 4)
    monkeypatch.setattr(fetch, "BATCH_BYTES", 600)  # some batches are cut by size

    def vanish(r):  # expunged elsewhere after SELECT: skipped, as by the general path
        for info in r.proto.sel.view:
            if info.uid in (6, 13):
                os.unlink(info.path)

    # Not UID FETCH: its refresh would announce the EXPUNGEs before the next run.
    formed, general, _ = fetch_both(world, monkeypatch, b"FETCH 1:* (BODY.PEEK[HEADER] UID)",
                                    vanish)
    assert formed == general
    assert b"UID 6)" not in formed and b"UID 7)" in formed and b"UID 13)" not in formed


@pytest.mark.parametrize("items", [b"(FLAGS BODY.PEEK[HEADER])", b"(BODY[HEADER])",
                                   b"(INTERNALDATE RFC822.HEADER)", b"(BODY.PEEK[TEXT])"])
def test_items_the_reactor_must_read_take_the_general_path(world, items):
    fill(world, 3)
    r = world.connect()
    r.cmd(b"s SELECT Heads")
    atts = [FetchAtt(b"UID")] + fetch_atts(tokenize([(items, None)])[0])
    assert HeaderForm.of(FetchCommand(r.proto, [1, 2, 3], atts, uid=True)) is None


def test_the_view_of_a_run_is_one_slice_and_of_a_scattered_set_its_messages(world):
    fill(world, 10)
    r = world.connect()
    r.cmd(b"s SELECT Heads")
    r.cmd(b"d UID STORE 4 +FLAGS (\\Deleted)")
    r.cmd(b"e EXPUNGE")
    sel = r.proto.sel
    infos, seqs = fetch.view_messages(sel, [5, 6, 7])
    assert [i.uid for i in infos] == [5, 6, 7] and list(seqs) == [4, 5, 6]
    assert isinstance(seqs, range)
    infos, seqs = fetch.view_messages(sel, [1, 2, 3, 5])  # same ends and count as 1:4 of UIDs
    assert [i.uid for i in infos] == [1, 2, 3, 5] and list(seqs) == [1, 2, 3, 4]
    infos, seqs = fetch.view_messages(sel, [2, 4, 9])
    assert [i.uid for i in infos] == [2, 9] and list(seqs) == [2, 8]


def test_batches_wait_for_the_client_and_stop_when_it_is_gone(world, monkeypatch):
    fill(world, 20)
    monkeypatch.setattr(fetch, "HEADER_BATCH", 4)
    r = world.connect()
    r.cmd(b"s SELECT Heads")
    r.pending()
    r.buf = b""
    r.proto.gate.pauseProducing()  # what the transport does when its buffer is full
    r.send(b"f UID FETCH 1:* (BODY.PEEK[HEADER])\r\n")
    assert r.pending().count(b" FETCH (") == 4  # one batch, then it waits
    r.proto.gate.resumeProducing()
    r.clock.advance(0)
    assert r.pending().count(b" FETCH (") == 20 and r.buf.endswith(b"f OK FETCH completed\r\n")
    r.buf = b""
    r.proto.gate.pauseProducing()
    r.send(b"g UID FETCH 1:* (BODY.PEEK[HEADER])\r\n")
    assert r.pending().count(b" FETCH (") == 4
    r.close()  # the client went away while the FETCH waited
    r.proto.gate.resumeProducing()
    r.clock.advance(0)
    out = r.pending()
    assert out.count(b" FETCH (") == 4 and b"g OK" not in out

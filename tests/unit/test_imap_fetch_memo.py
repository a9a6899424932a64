"""ENVELOPE/BODY/BODYSTRUCTURE come from the process's FileMemo once computed, keyed by the
file's name without flags and its size (docs/design/maildir.md, "Derived values of message
files"); the memo stays within its byte budget."""
from __future__ import annotations

import io
import os

from mailsuite.imap.fetch import compute_batch, compute_one
from mailsuite.imap.parser import fetch_atts, tokenize
from mailsuite.mailbox.memo import FileMemo, content_id

from tests.unit.imapkit import world  # noqa: F401

MESSAGE = (b"From: Ann <ann@example.net>\r\nTo: bob@example.org\r\nSubject: hello\r\n"
           b"Content-Type: text/plain; charset=us-ascii\r\n\r\nbody\r\n")
OTHER = MESSAGE.replace(b"hello", b"bye!!")  # the same size, another content


class NamedBytes(io.BytesIO):
    """A message 'file' with a Maildir path as its name (fstat needs a real descriptor)."""

    def __init__(self, data: bytes, name: str, tmp_path):
        super().__init__(data)
        self.name = name
        real = tmp_path / "m"
        real.write_bytes(data)
        self._fd = os.open(real, os.O_RDONLY)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        os.close(self._fd)
        super().close()


def atts(text: bytes):
    return fetch_atts(tokenize([(text, None)])[0])


def test_structures_are_served_from_the_memo_after_a_flag_rename(tmp_path):
    memo = FileMemo()
    wanted = atts(b"(ENVELOPE BODYSTRUCTURE)")
    name = "/m/d/cur/1700000000.M1P2.host,S=%d:2," % len(MESSAGE)
    first = NamedBytes(MESSAGE, name, tmp_path)
    got = compute_one(first, 1, wanted, memo)
    first.close()
    assert b"hello" in got[id(wanted[0])]
    # The same Maildir key with other flags is the same content: the memo answers (the
    # different bytes behind it prove the file was not parsed again).
    renamed = NamedBytes(OTHER, name + "FS", tmp_path)
    again = compute_one(renamed, 1, wanted, memo)
    renamed.close()
    assert again == got
    # Without a memo, the file is what counts.
    plain = NamedBytes(OTHER, name, tmp_path)
    assert b"bye!!" in compute_one(plain, 1, wanted)[id(wanted[0])]
    plain.close()


def test_sections_are_never_memoised(tmp_path):
    memo = FileMemo()
    wanted = atts(b"(BODY.PEEK[1] BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    name = "/m/d/cur/1700000000.M1P2.host:2,"
    f = NamedBytes(MESSAGE, name, tmp_path)
    compute_one(f, 1, wanted, memo)
    f.close()
    assert len(memo) == 0
    g = NamedBytes(OTHER, name, tmp_path)
    assert b"bye!!" in compute_one(g, 1, wanted, memo)[id(wanted[1])]
    g.close()


def test_memo_drops_least_recently_used_beyond_its_budget():
    memo = FileMemo(max_bytes=16 * 1024)
    for i in range(100):
        memo.put(("k", i), b"x" * 500)
        assert memo.bytes_used <= memo.max_bytes
    assert memo.get(("k", 0)) is None
    assert memo.get(("k", 99)) == b"x" * 500
    memo.put(("huge", 0), b"y" * 2000)  # above a sixteenth of the budget: not kept
    assert memo.get(("huge", 0)) is None


def test_content_id_ignores_flags_only():
    assert content_id("/a/cur/k1:2,S", 10) == content_id("/a/cur/k1:2,FS", 10)
    assert content_id("/a/cur/k1:2,S", 10) != content_id("/a/cur/k2:2,S", 10)
    assert content_id("/a/cur/k1:2,S", 10) != content_id("/b/cur/k1:2,S", 10)


def test_batch_results_are_the_same_with_a_warm_memo(world):  # noqa: F811
    for i in range(5):
        world.append("alice@example.org", "INBOX",
                      b"From: a%d@example.net\r\nSubject: s%d\r\n\r\nbody %d\r\n" % (i, i, i))
    r = world.connect()
    r.cmd(b"s SELECT INBOX")
    sel = r.proto.sel
    uids = [info.uid for _, info in sel.infos()]
    wanted = atts(b"(ENVELOPE BODY BODY.PEEK[TEXT])")
    cold = compute_batch(sel.folder, uids, wanted)
    assert len(sel.folder.account.store.memo) == 2 * len(uids)
    warm = compute_batch(sel.folder, uids, wanted)
    assert warm == cold
    assert all(b"body" in cold[u][id(wanted[2])] for u in uids)


def test_a_warm_fetch_of_structures_and_header_fields_opens_no_message_file(
        world, monkeypatch):  # noqa: F811
    """With the structures in the memo and the header blocks in mailsuite-cache, the
    session's view names each file's content: no message file is opened, and the response
    is the same bytes as the cold one."""
    for i in range(5):
        world.append("alice@example.org", "INBOX",
                     b"From: a%d@example.net\r\nTo: b@example.org\r\nSubject: s%d\r\n\r\n"
                     b"body %d\r\n" % (i, i, i))
    r = world.connect()
    r.cmd(b"s SELECT INBOX")
    command = b"f FETCH 1:* (ENVELOPE BODYSTRUCTURE BODY.PEEK[HEADER.FIELDS (Subject)])"
    cold = r.cmd(command)
    assert r.cmd(command) == cold  # the header blocks go to mailsuite-cache on this one
    folder = r.proto.sel.folder
    opened = []
    real_open = type(folder).open_message
    monkeypatch.setattr(type(folder), "open_message",
                        lambda self, uid: opened.append(uid) or real_open(self, uid))
    assert r.cmd(command) == cold
    assert opened == []
    assert len(cold) == 6 and b"s4" in cold[4]

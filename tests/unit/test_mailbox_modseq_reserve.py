"""Mod-sequences are handed out from an fsynced reservation (`R` lines of mailsuite-modseq;
docs/design/maildir.md, "Mod-sequences"): a change costs no fsync of the log, and lines lost in
a crash never let a number be handed out twice."""
from __future__ import annotations

import os

from mailsuite.mailbox import modseq
from mailsuite.mailbox.modseq import MODSEQ_FILE
from mailsuite.mailbox.store import MailStore

MSG = b"From: a@example.org\r\nSubject: x\r\n\r\nbody\r\n"


def inbox(tmp_path):
    account = MailStore(str(tmp_path / "mail")).account("alice@example.org")
    account.ensure_layout()
    return account.folder("INBOX")


def test_changes_within_the_reservation_cost_no_fsync(tmp_path, monkeypatch):
    monkeypatch.setattr(modseq, "RESERVE", 5)
    f = inbox(tmp_path)
    u = f.append(MSG)
    f.sync()
    synced = []
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(MODSEQ_FILE):
            synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    for flag in ("\\Seen", "\\Flagged", "\\Answered", "\\Draft", "$a", "$b", "$c"):
        f.add_flags(u, [flag])
        f.sync()
    # Seven new mod-sequences, 3 to 9: up to 7 within the reservation the log was started
    # with (2 + 5), then one fsynced `R` line for 8 to 13.
    assert len(synced) == 1
    lines = open(os.path.join(f.path, MODSEQ_FILE)).read().splitlines()
    assert [line for line in lines if line.startswith("R ")] == ["R 7", "R 13"]
    assert f.highest_modseq() == 9


def test_a_reader_from_the_start_hands_out_numbers_above_the_reservation(tmp_path):
    f = inbox(tmp_path)
    u = f.append(MSG)
    f.sync()
    f.add_flags(u, ["\\Seen"])
    seen_by_a_client = f.highest_modseq()
    path = os.path.join(f.path, MODSEQ_FILE)
    # A crash lost the lines written since the last fsync (the reservation survived).
    lines = open(path).read().splitlines(keepends=True)
    last_r = max(i for i, line in enumerate(lines) if line.startswith("R "))
    with open(path, "w") as out:
        out.writelines(lines[:last_r + 1])
    fresh = inbox(tmp_path)
    fresh.add_flags(u, ["\\Flagged"])
    assert fresh.modseqs([u])[u][0] > seen_by_a_client
    assert fresh.highest_modseq() > seen_by_a_client

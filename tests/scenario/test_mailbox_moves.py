"""The first sync of a folder another MDA filled with more new/ files than moves.APART_MIN:
the renames to cur/ run in a helper process beside the rest of the sync (docs/design/
maildir.md, "Syncing a folder"), in process and through the real server's SELECT."""
from __future__ import annotations

import os

from mailsuite.mailbox import moves
from mailsuite.mailbox.store import MailStore
from tests.scenario.imapraw import Raw, tagged

BODY = b"From: mda@example.net\r\nSubject: filled\r\n\r\nhello\r\n"


def _fill(root: str, count: int) -> list[str]:
    for d in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    keys = [f"{1700000000 + i}.M{i:06d}P7Q{i}.mda,S={len(BODY)}" for i in range(count)]
    for key in keys:
        with open(os.path.join(root, "new", key), "wb") as f:
            f.write(BODY)
    return keys


def test_the_helper_moves_a_large_folder_and_reports_a_file_gone(tmp_path, monkeypatch):
    account = MailStore(str(tmp_path / "mail")).account("mda@example.org")
    account.ensure_layout()
    keys = _fill(account.path, moves.APART_MIN + 50)
    new = os.path.join(account.path, "new")
    spawned = []
    real_popen = moves.subprocess.Popen

    def popen(args, **kwargs):
        # Another process deletes a file between our listing and the helper's renames.
        os.unlink(os.path.join(new, keys[10]))
        spawned.append(real_popen(args, **kwargs))
        return spawned[-1]

    monkeypatch.setattr(moves.subprocess, "Popen", popen)
    msgs = account.folder("INBOX").sync()
    assert len(spawned) == 1 and spawned[0].returncode == 0
    assert [m.key for m in msgs] == keys[:10] + keys[11:]
    assert [m.uid for m in msgs[:11]] == list(range(1, 11)) + [12]  # 11 was given, then gone
    assert os.listdir(new) == []
    assert sorted(os.listdir(os.path.join(account.path, "cur"))) == \
        sorted(k + ":2," for k in keys[:10] + keys[11:])


def test_first_select_of_a_large_folder_filled_by_another_mda(server):
    keys = _fill(server.maildir("alice@example.org"), moves.APART_MIN + 10)
    r = Raw(server, timeout=60)
    try:
        lines = r.cmd(b"S SELECT INBOX")
        assert tagged(lines).startswith(b"S OK")
        assert b"* %d EXISTS" % len(keys) in lines
        last = r.cmd(b"F UID FETCH %d (UID RFC822.SIZE)" % len(keys))
        assert b"* %d FETCH (UID %d RFC822.SIZE %d)" % (len(keys), len(keys), len(BODY)) in last
    finally:
        r.close()
    root = server.maildir("alice@example.org")
    assert os.listdir(os.path.join(root, "new")) == []
    assert len(os.listdir(os.path.join(root, "cur"))) == len(keys)

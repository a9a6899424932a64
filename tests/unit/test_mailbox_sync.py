"""How a sync lists a folder: new/ -> cur/ without listing cur/ again, UIDs in delivery order
(docs/design/maildir.md, "Syncing a folder")."""
from __future__ import annotations

import os
import random

from mailsuite.mailbox.maildir import (
    UIDLIST, delivery_order, in_delivery_order, read_uidlist,
)
from tests.unit.test_mailbox_store import account, deliver, settle  # noqa: F401 (fixture)


def test_delivery_order_of_fixed_width_names_and_of_others():
    fixed = [f"{1700000000 + i % 7}.M{(i * 7919) % 1000000:06d}P1Q{i}.host,S=5"
             for i in range(500)]
    # A 7-digit microsecond field, a 9-digit second, no M part: plain string order is wrong.
    odd = ["1700000003.M1234567P1Q1.host", "999999999.M000001P1Q2.host", "1700000001.host",
           "1700000002.M99P1Q3.host", "\u0661\u0667" + "\u0660" * 8 + ".M000004P1Q4.host"]
    for keys in [fixed] + [fixed + [k] for k in odd]:
        shuffled = random.Random(5).sample(keys, len(keys))
        assert in_delivery_order(shuffled) == sorted(keys, key=delivery_order)
    assert sorted(odd) != sorted(odd, key=delivery_order)


def test_new_mail_in_a_settled_folder_moves_without_listing_cur(account, monkeypatch):
    deliver(account.path, 50)
    inbox = account.folder("INBOX")
    inbox.sync()
    settle(account.path)
    inbox.sync()  # the settled mtimes are trusted from here on
    key, = deliver(account.path, 1, start=50)
    listed = []
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p=".": listed.append(p) or real_listdir(p))
    msgs = inbox.sync()
    assert [p for p in listed if isinstance(p, str) and p.endswith("cur")] == []
    last = msgs[-1]
    assert (len(msgs), last.uid, last.key, last.name) == (51, 51, key, key + ":2,")
    assert os.path.exists(last.path) and last.uid in inbox.recent
    assert read_uidlist(os.path.join(account.path, UIDLIST)).uids[key] == 51
    # Another Maildir tool flags a message at once: cur/ changed by us is listed next time.
    os.rename(last.path, last.path + "S")
    assert inbox.sync()[-1].flags == frozenset({"\\Seen"})


def test_first_listing_of_a_folder_another_mda_filled(account):
    """Names of fixed width (sorted as strings) and a name without `,S=` (stat()ed once)."""
    new = os.path.join(account.path, "new")
    names = [f"{1700000000 + i}.M{i:06d}P7Q{i}.mda,S=5" for i in range(30)]
    names.append("1700000099.M000000P7Q99.mda")
    for name in random.Random(1).sample(names, len(names)):
        with open(os.path.join(new, name), "wb") as f:
            f.write(b"hello")
    msgs = account.folder("INBOX").sync()
    assert [m.key for m in msgs] == names
    assert [m.uid for m in msgs] == list(range(1, 32))
    assert {m.size for m in msgs} == {5}
    assert os.listdir(new) == []
    assert len({hash(m) for m in msgs}) == 31  # hashable, as the IMAP code needs

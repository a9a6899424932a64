"""Expunged messages that selected sessions still show (docs/design/imap.md, "Expunged
messages stay readable until announced"): the file is kept in tmp/ under a held name while any
session holds a pin on it, and unlinked once the last pin is given back."""
from __future__ import annotations

import os

from mailsuite.mailbox.index import FolderIndex

HELD_PREFIX = "expunged."  # held files in tmp/: expunged.<uid>.<key>


def drain_held(state: FolderIndex) -> None:
    """Give back the pins sessions released; unlink held files nobody shows any more.
    Under the folder's lock, in the io pool."""
    releases = state.releases
    while releases:
        uid = releases.pop()
        held = state.held.get(uid)
        if held is None:
            continue
        held[1] -= 1
        if held[1] <= 0:
            del state.held[uid]
            try:
                os.unlink(held[0])
            except FileNotFoundError:
                pass


def sweep_held(path: str) -> None:
    """Held files a crashed or stopped process left in tmp/: a new FolderIndex means no
    session of this process shows them."""
    tmp = os.path.join(path, "tmp")
    try:
        names = [n for n in os.listdir(tmp) if n.startswith(HELD_PREFIX)]
    except FileNotFoundError:
        return
    for n in names:
        try:
            os.unlink(os.path.join(tmp, n))
        except FileNotFoundError:
            pass

"""Message flags: parsing a client's flag list and formatting ours (RFC 3501 §2.3.2)."""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterable

from mailsuite.imap.parser import Atom
from mailsuite.imap.responses import bad
from mailsuite.mailbox.store import MessageInfo

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")

_FLAG_ORDER = {f: i for i, f in enumerate(SYSTEM_FLAGS + ("\\Recent",))}
_CANONICAL = {s.lower(): s for s in SYSTEM_FLAGS + ("\\Recent",)}


def flag_list(flags: Iterable[str]) -> bytes:
    """`(\\Seen $Label1)`: system flags first, in a fixed order, then keywords."""
    if isinstance(flags, frozenset):
        return _flag_list_cached(flags)
    return _flag_list(flags)


def _flag_list(flags: Iterable[str]) -> bytes:
    return b"(" + b" ".join(f.encode("utf-8") for f in sorted(
        flags, key=lambda f: (_FLAG_ORDER.get(f, 99), f))) + b")"


@functools.lru_cache(maxsize=4096)
def _flag_list_cached(flags: frozenset) -> bytes:
    # A folder has few distinct flag combinations: FETCH 1:* FLAGS formats each once.
    return _flag_list(flags)


def parse_flags(tokens: Iterable[object]) -> list[str]:
    """A client's flag list as flag names; BAD for unknown system flags and invalid keywords."""
    flags = []
    for t in tokens:
        if not isinstance(t, Atom):
            raise bad("flags must be atoms")
        f = bytes(t).decode("ascii", "replace")
        if f.startswith("\\"):
            canonical = _CANONICAL.get(f.lower())
            if canonical is None:
                raise bad(f"unknown system flag {f[:40]}")
            f = canonical
        elif not f or any(c in f for c in '(){%*"\\]') or not f.isascii():
            raise bad("invalid keyword")
        flags.append(f)
    return flags


def with_flags(info: MessageInfo, flags: Iterable[str]) -> MessageInfo:
    return dataclasses.replace(info, flags=frozenset(flags))

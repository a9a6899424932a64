"""STATUS values (RFC 3501 §6.3.10, RFC 8438 STATUS=SIZE, RFC 9051 §6.3.11 DELETED), shared by
STATUS and LIST ... RETURN (STATUS (...)) (RFC 5819 LIST-STATUS)."""
from __future__ import annotations

from mailsuite.imap.names import encode_name, quote
from mailsuite.imap.parser import Token, astring
from mailsuite.imap.responses import bad
from mailsuite.imap.selection import FolderState

STATUS_ITEMS = {b"MESSAGES", b"RECENT", b"UIDNEXT", b"UIDVALIDITY", b"UNSEEN", b"SIZE", b"DELETED",
                b"HIGHESTMODSEQ"}


def parse_items(tok: Token, rev2: bool = False) -> list[bytes]:
    """`rev2`: RECENT is no STATUS item of IMAP4rev2 (RFC 9051 §6.3.11, Appendix E)."""
    if not isinstance(tok, list):
        raise bad("STATUS needs a list of items")
    items = [astring(a).upper() for a in tok]
    if not items or set(items) - STATUS_ITEMS or (rev2 and b"RECENT" in items):
        raise bad("unknown STATUS item")
    return items


def status_line(name: str, st: FolderState, items: list[bytes], utf8: bool = False) -> bytes:
    """`* STATUS name (item value ...)` from a folder's state, items in the order asked."""
    infos = st.infos
    values = {
        b"MESSAGES": lambda: len(infos),
        b"RECENT": lambda: len(st.recent & {i.uid for i in infos}),
        b"UIDNEXT": lambda: st.uidnext,
        b"UIDVALIDITY": lambda: st.uidvalidity,
        b"UNSEEN": lambda: sum(1 for i in infos if "\\Seen" not in i.flags),
        b"SIZE": lambda: sum(i.size for i in infos),  # RFC 8438: the sum of RFC822.SIZE
        b"DELETED": lambda: sum(1 for i in infos if "\\Deleted" in i.flags),
        b"HIGHESTMODSEQ": lambda: st.highestmodseq,  # RFC 7162 §3.1.6
    }
    return (b"* STATUS " + quote(encode_name(name, utf8), utf8) + b" (" +
            b" ".join(b"%s %d" % (k, values[k]()) for k in items) + b")")

"""Messages full of lines that start with '.', for the dot-stuffing tests over POP3 (in memory
and over a socket): '.' lines exactly at offsets 16384 and 65536 (the RETR chunk size), a line
that would read as a fake +OK reply if unstuffed, and a 2 MB message of dotted lines."""
from __future__ import annotations

HEAD = b"From: a@example.net\r\nSubject: dots\r\n\r\n"


def pad_to(data: bytes, offset: int) -> bytes:
    """Append 100-octet lines (poplib limits lines to 2048) so the next line starts at exactly
    `offset`."""
    while offset - len(data) > 200:
        data += b"x" * 98 + b"\r\n"
    return data + b"w" * (offset - len(data) - 2) + b"\r\n"


def dotted_messages() -> tuple[bytes, bytes]:
    dotted = pad_to(HEAD, 16384)
    assert len(dotted) == 16384
    dotted += b".\r\n+OK injected\r\n..\r\n.x\r\n"
    dotted = pad_to(dotted, 65536) + b".\r\n" + b"tail\r\n"
    big = HEAD + b"".join(b".%07d " % i + b"z" * 60 + b"\r\n" for i in range(30000))
    assert len(big) > 2_000_000
    return dotted, big

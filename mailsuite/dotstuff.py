"""The one dot-stuffer: transparency for a multi-line body sent over SMTP DATA (RFC 5321 §4.5.2)
or a POP3 multi-line response (RFC 1939 §3), fed in chunks of any size.

    stuffer = DotStuffer()
    wire = stuffer.feed(chunk1) + stuffer.feed(chunk2) + ... + stuffer.finish()
    wire = dot_stuff(message)          # the same for a message held in memory

Contract (docs/design/pop3.md, "The dot-stuffer"):
- every line end on the wire is CRLF: CRLF stays, and a bare LF or a bare CR becomes CRLF, so
  no receiver can find a line end (or an end-of-data) that the stored bytes did not mean;
- a line beginning with "." gets one more "." in front, including the first line of the message
  and a line that begins exactly at a chunk boundary;
- `finish()` ends an unterminated last line with CRLF and appends the terminating ".\r\n".
The output does not depend on where the chunk boundaries fall.
"""
from __future__ import annotations

import re

CRLF = b"\r\n"
_LINE_END = re.compile(rb"\r\n|\r|\n")


class DotStuffer:
    """Stateful: remembers whether the next byte starts a line and whether a chunk ended in a
    CR that may be the first half of a CRLF."""

    def __init__(self) -> None:
        self._at_line_start = True
        self._pending_cr = False

    def feed(self, chunk: bytes) -> bytes:
        data = (b"\r" + chunk) if self._pending_cr else chunk
        self._pending_cr = data.endswith(b"\r")
        if self._pending_cr:
            data = data[:-1]
        if not data:
            return b""
        data = _LINE_END.sub(CRLF, data)
        if self._at_line_start and data.startswith(b"."):
            data = b"." + data
        data = data.replace(b"\r\n.", b"\r\n..")
        self._at_line_start = data.endswith(CRLF)
        return data

    def finish(self) -> bytes:
        """What is still held back, a CRLF if the last line had none, and the final ".\r\n"."""
        tail = b""
        if self._pending_cr:
            self._pending_cr = False
            tail = CRLF
            self._at_line_start = True
        if not self._at_line_start:
            tail += CRLF
        return tail + b".\r\n"


def dot_stuff(message: bytes, chunk_size: int = 1 << 16) -> bytes:
    """The whole message stuffed and terminated (`chunk_size` only matters to tests)."""
    stuffer = DotStuffer()
    parts = [stuffer.feed(message[i:i + chunk_size]) for i in range(0, len(message), chunk_size)]
    parts.append(stuffer.finish())
    return b"".join(parts)

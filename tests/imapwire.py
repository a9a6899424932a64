"""Reading IMAP responses, shared by the in-memory client (tests/unit/imapkit.py) and the socket
client (tests/scenario/imapraw.py): each supplies `send`, `line` and `read_exact`."""
from __future__ import annotations

import re

_LITERAL_AT_END = re.compile(rb"\{(\d+)\}$")


class ResponseReader:
    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def line(self) -> bytes:
        raise NotImplementedError

    def read_exact(self, n: int) -> bytes:
        raise NotImplementedError

    def response(self, tag: bytes) -> list[bytes]:
        """Lines up to and including the tagged one; literals are inlined."""
        lines = []
        while True:
            line = self.line()
            while True:
                m = _LITERAL_AT_END.search(line)
                if not m:
                    break
                line += b"\r\n" + self.read_exact(int(m.group(1))) + self.line()
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def cmd(self, line: bytes) -> list[bytes]:
        tag = line.split(b" ", 1)[0]
        self.send(line + b"\r\n")
        return self.response(tag)

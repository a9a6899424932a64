"""mailsuite-cache on the real server (docs/design/maildir.md, "Header cache"): a message another
MDA puts into new/ after the cache was written, while a session is selected, is seen with its
own header and size; a restarted server serves the same bytes from the cache file."""
from __future__ import annotations

import os
import re
import time

from tests.harness import MailServer
from tests.polling import wait_until
from tests.scenario.imapraw import PASSWORD, Raw, tagged

USER = "alice@example.org"


def drop_into_new(root: str, i: int, subject: str) -> bytes:
    data = (f"From: mda{i}@example.net\r\nSubject: {subject}\r\n\r\nbody {i}\r\n").encode()
    name = f"{int(time.time())}.M{i}P{os.getpid()}Q{i}.othermda"  # no S=: size from stat
    tmp = os.path.join(root, "tmp", name)
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, os.path.join(root, "new", name))
    return data


def headers_and_sizes(r: Raw, tag: bytes) -> dict[int, tuple[int, bytes]]:
    """uid -> (RFC822.SIZE, BODY[HEADER]) from one UID FETCH 1:*."""
    r.send(tag + b" UID FETCH 1:* (RFC822.SIZE BODY.PEEK[HEADER])\r\n")
    out = {}
    while True:
        line = r.line()
        if line.startswith(tag + b" "):
            assert line.startswith(tag + b" OK"), line
            return out
        m = re.match(rb"\* \d+ FETCH \(UID (\d+) RFC822\.SIZE (\d+) BODY\[HEADER\] \{(\d+)\}$",
                     line)
        if m:
            header = r.read_exact(int(m.group(3)))
            assert r.line() == b")"
            out[int(m.group(1))] = (int(m.group(2)), header)


def test_delivery_by_another_mda_after_the_cache_was_written(make_server):
    srv: MailServer = make_server(listeners=["imaps"])
    srv.add_user(USER, PASSWORD)
    r = Raw(srv)
    root = srv.maildir(USER)
    sent = [drop_into_new(root, i, f"first {i}") for i in range(40)]
    r.cmd(b"s SELECT INBOX")
    first = headers_and_sizes(r, b"a")
    assert sorted(first) == list(range(1, 41))
    assert [first[u][0] for u in range(1, 41)] == [len(d) for d in sent]
    assert os.path.getsize(os.path.join(root, "mailsuite-cache")) > 0

    late = drop_into_new(root, 99, "late")

    def announced() -> bool:
        return any(b"EXISTS" in line for line in r.cmd(b"n NOOP"))

    wait_until(announced, timeout=10, message="EXISTS for the late message")
    second = headers_and_sizes(r, b"b")
    assert sorted(second) == list(range(1, 42))
    assert second[41] == (len(late), late.split(b"\r\n\r\n")[0] + b"\r\n\r\n")
    assert {u: second[u] for u in first} == first
    r.close()

    srv.stop()
    srv.start()
    again = Raw(srv)
    again.cmd(b"s SELECT INBOX")
    assert headers_and_sizes(again, b"c") == second
    assert tagged(again.cmd(b"z LOGOUT")).startswith(b"z OK")

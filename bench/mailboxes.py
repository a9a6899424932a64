"""The mail both IMAP servers of bench/compare.py read: identical Maildirs written directly
into new/ (as another MDA would), the shared TLS certificate, imaptest's mbox. See
docs/performance.md."""
from __future__ import annotations

import os
import ssl
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FIRST_TIME = 1767225600  # 2026-01-01: file names and Date: headers count up from here
SENDERS = ["Alice Example <alice@example.org>", "Bob Builder <bob@example.com>",
           "Carol Jones <carol@mail.test>", "Dave O'Brien <dave@lists.example.net>"]
WORDS = ("meeting report budget quarterly lunch release notes invoice travel plans draft "
         "review schedule update question patch server backup holiday photos").split()


@dataclass
class Layout:
    """Files shared by every server: one self-signed P-256 certificate (the kind mailsuite
    makes for itself) so TLS costs the same on both, and imaptest's mailbox."""

    cert: str
    key: str
    mbox: str

    @classmethod
    def create(cls, base: str, mbox_messages: int = 300) -> "Layout":
        from mailsuite.tls import create_self_signed
        from tests.interop.test_imaptest import generate_mbox

        tls = os.path.join(base, "tls")
        layout = cls(os.path.join(tls, "cert.pem"), os.path.join(tls, "key.pem"),
                     os.path.join(base, "stress.mbox"))
        create_self_signed("mx.bench.test", layout.cert, layout.key)
        os.chmod(tls, 0o755)
        generate_mbox(layout.mbox, mbox_messages)
        return layout

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.cert)
        ctx.check_hostname = False  # 127.0.0.1; the chain is still verified
        return ctx


def message(n: int, seed: int) -> bytes:
    """Message `n` of folder `seed`: about 1 KiB, headers like a list mail's."""
    sender = SENDERS[(n + seed) % len(SENDERS)]
    subject = " ".join(WORDS[(n * 7 + k * 3 + seed) % len(WORDS)] for k in range(5))
    body = "".join(" ".join(WORDS[(n + line * 5 + k) % len(WORDS)] for k in range(11)) + "\r\n"
                   for line in range(8))
    stamp = FIRST_TIME + n
    return (f"Return-Path: <bounce-{n}@example.org>\r\n"
            f"Received: from mx.example.org (mx.example.org [192.0.2.{n % 250 + 1}])\r\n"
            f"\tby mx.bench.test with ESMTPS id b{seed}x{n}; {_date(stamp)}\r\n"
            f"From: {sender}\r\nTo: Bench <reader@bench.test>\r\nSubject: {subject} {n}\r\n"
            f"Date: {_date(stamp)}\r\nMessage-ID: <m{n}.s{seed}@example.org>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"{body}").encode()


def _date(stamp: int) -> str:
    import email.utils

    return email.utils.formatdate(stamp, usegmt=True)


def fill_maildir(root: str, count: int, seed: int, subfolder: bool = False) -> None:
    """`count` messages written straight into `root`/new/ (no fsync: this is set-up), with
    Maildir++ names carrying their size (S=)."""
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    if subfolder:
        open(os.path.join(root, "maildirfolder"), "wb").close()
    new = os.path.join(root, "new")
    for n in range(count):
        data = message(n, seed)
        name = f"{FIRST_TIME + n}.M{n % 1000000:06d}P{seed}Q{n}.bench.example,S={len(data)}"
        with open(os.path.join(new, name), "wb") as f:
            f.write(data)


def reset_maildir(root: str) -> None:
    """Back to the state fill_maildir left: every message in new/ under its base name, no
    index, cache or uidlist of either server (so the next SELECT is a first one)."""
    cur, new = os.path.join(root, "cur"), os.path.join(root, "new")
    for name in os.listdir(cur):
        os.rename(os.path.join(cur, name), os.path.join(new, name.split(":", 1)[0]))
    for entry in os.scandir(root):
        if entry.is_file(follow_symlinks=False) and entry.name != "maildirfolder":
            os.unlink(entry.path)


def chown_tree(root: str, uid: int, gid: int) -> None:
    for path, dirs, files in os.walk(root):
        os.chown(path, uid, gid)
        for name in files:
            os.chown(os.path.join(path, name), uid, gid)

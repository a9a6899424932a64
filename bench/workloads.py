"""One function per workload of bench/compare.py, each independent of the server it measures:
it takes host, ports and credentials and returns figures. See docs/performance.md for what each
workload is.

IMAP is spoken over implicit TLS (IMAPS) when the target has an SSL context, else in plain
text: mailsuite offers no LOGIN before TLS (RFC 3501 section 6.2.3), so it is always measured
over IMAPS; the reference may be measured either way.
"""
from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import smtp_load  # noqa: E402  (bench/smtp_load.py: the asyncio SMTP client)


@dataclass
class ImapTarget:
    host: str
    port: int
    ssl_context: ssl.SSLContext | None  # None: plain IMAP


# -- Maildir helpers --------------------------------------------------------------------------
def count_messages(maildir: str) -> int:
    total = 0
    for sub in ("new", "cur"):
        try:
            total += sum(1 for e in os.scandir(os.path.join(maildir, sub))
                         if not e.name.startswith("."))
        except FileNotFoundError:
            pass
    return total


# Where empty_maildir moves the messages of earlier runs (compare.py sets it to a directory
# on the same file system, removed at the end): deleting thousands of files just before a run
# makes the next run's file creations slower, on ext4 for minutes (it steps over recently
# freed inodes), and by how much depends on what the previous run deleted.
ATTIC: str | None = None


def empty_maildir(maildir: str) -> None:
    """Take every message out of new/ and cur/ (between SMTP runs, untimed): into a fresh
    directory under ATTIC when it is set, else deleted."""
    attic = None
    if ATTIC is not None:
        os.makedirs(ATTIC, exist_ok=True)
        attic = tempfile.mkdtemp(dir=ATTIC)
    for sub in ("new", "cur"):
        d = os.path.join(maildir, sub)
        if os.path.isdir(d):
            for name in os.listdir(d):
                if attic is None:
                    os.unlink(os.path.join(d, name))
                else:
                    os.rename(os.path.join(d, name), os.path.join(attic, f"{sub}-{name}"))


def wait_for_count(maildir: str, count: int, timeout: float, interval: float = 0.05) -> float:
    """Poll until `maildir` holds `count` messages; the monotonic time when it did."""
    deadline = time.monotonic() + timeout
    while True:
        if count_messages(maildir) >= count:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {count_messages(maildir)} of {count} messages arrived in "
                               f"{maildir} within {timeout:.0f} s")
        time.sleep(interval)


# -- 1. SMTP accept -> Maildir --------------------------------------------------------------
def smtp_source(host: str, port: int, sender: str, rcpt: str, count: int, size: int,
                sessions: int, maildir: str) -> float:
    """Postfix's smtp-source (`-s sessions -m count -l size`, one message per connection) to
    an MX port, timed until every message is in `maildir`. Messages per second."""
    empty_maildir(maildir)
    started = time.monotonic()
    result = subprocess.run(["smtp-source", "-s", str(sessions), "-m", str(count), "-l",
                             str(size), "-f", sender, "-t", rcpt, f"{host}:{port}"],
                            capture_output=True, text=True, timeout=count + 600)
    if result.returncode != 0:
        raise RuntimeError(f"smtp-source failed ({result.returncode}): {result.stderr[-2000:]}")
    done = wait_for_count(maildir, count, timeout=120 + count / 5)
    return count / (done - started)


def smtp_submission(host: str, port: int, user: str, password: str, rcpt: str, count: int,
                    size: int, sessions: int, ssl_context: ssl.SSLContext,
                    maildir: str) -> float:
    """`sessions` clients (bench/smtp_load.py's) each with STARTTLS + AUTH PLAIN, sending
    `count` messages of `size` octets from `user` to `rcpt`, timed until all are in
    `maildir`. Messages per second."""
    empty_maildir(maildir)

    def as_user(message: bytes) -> bytes:
        return message.replace(b"From: load@load.example", b"From: " + user.encode(), 1)

    scenario = smtp_load.Scenario(host, port, user, [rcpt], starttls=True,
                                  auth=(user, password), ssl_context=ssl_context,
                                  make_message=as_user)
    started = time.monotonic()
    counters, _ = asyncio.run(smtp_load.run(scenario, sessions, size, 0, count))
    # smtp_load.run may start a few more than `count` (its workers check before connecting):
    # every accepted message counts, and must arrive.
    if counters.accepted < count or counters.refused or counters.errors:
        raise RuntimeError(f"submission: {counters.accepted} of {count} accepted "
                           f"({counters.refused} refused, {counters.errors} errors)")
    done = wait_for_count(maildir, counters.accepted, timeout=120 + count / 5)
    return counters.accepted / (done - started)


# -- IMAP: a blocking client for one session --------------------------------------------------
class ImapSession:
    """One IMAP(S) session read through a buffered file; responses are counted, literals skipped
    unparsed, so the figure is the server's time more than the client's."""

    LITERAL = re.compile(rb"\{(\d+)\}\r\n$")

    def __init__(self, target: ImapTarget, timeout: float = 600):
        raw = socket.create_connection((target.host, target.port), timeout=timeout)
        self.sock = target.ssl_context.wrap_socket(raw) if target.ssl_context else raw
        self.file = self.sock.makefile("rb", buffering=1 << 20)
        self.tag = 0
        greeting = self.file.readline()
        if not greeting.startswith(b"* OK"):
            raise RuntimeError(f"IMAP greeting {greeting!r}")

    def command(self, text: str) -> tuple[int, int]:
        """Send one command; (number of `* n FETCH` responses, `* n EXISTS` last seen)."""
        self.tag += 1
        tag = b"c%d " % self.tag
        self.sock.sendall(tag + text.encode() + b"\r\n")
        fetches, exists = 0, -1
        while True:
            line = self.file.readline()
            if not line:
                raise RuntimeError(f"connection closed during {text[:40]!r}")
            if line.startswith(b"* "):
                words = line.split(b" ", 3)
                if len(words) > 2 and words[2] == b"FETCH":
                    fetches += 1
                elif len(words) > 2 and words[2].rstrip() == b"EXISTS":
                    exists = int(words[1])
            match = self.LITERAL.search(line)
            while match:
                self.file.read(int(match.group(1)))
                line = self.file.readline()
                match = self.LITERAL.search(line)
            if line.startswith(tag):
                if not line.startswith(tag + b"OK"):
                    raise RuntimeError(f"{text[:40]!r}: {line!r}")
                return fetches, exists

    def login(self, user: str, password: str) -> None:
        self.command(f'LOGIN "{user}" "{password}"')

    def close(self) -> None:
        try:
            self.command("LOGOUT")
        except (OSError, RuntimeError):
            pass
        self.sock.close()


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    started = time.monotonic()
    out = fn()
    return time.monotonic() - started, out


# -- 2. a large folder ------------------------------------------------------------------------
def large_folder(target: ImapTarget, user: str, password: str, expected: int
                 ) -> dict[str, float]:
    """First SELECT of INBOX (the caller restarted the server and left the files in new/),
    then `FETCH 1:* (UID FLAGS RFC822.SIZE)` and `UID FETCH 1:* (BODY.PEEK[HEADER])` warm:
    each run once untimed, then timed. Seconds."""
    session = ImapSession(target)
    try:
        session.login(user, password)
        took, (_, exists) = timed(lambda: session.command("SELECT INBOX"))
        if exists != expected:
            raise RuntimeError(f"SELECT showed {exists} messages, expected {expected}")
        figures = {"select-first": took}
        for name, command in (("fetch-flags", "FETCH 1:* (UID FLAGS RFC822.SIZE)"),
                              ("fetch-headers", "UID FETCH 1:* (BODY.PEEK[HEADER])")):
            session.command(command)
            took, (fetched, _) = timed(lambda: session.command(command))
            if fetched != expected:
                raise RuntimeError(f"{command}: {fetched} FETCH responses, expected {expected}")
            figures[name] = took
        return figures
    finally:
        session.close()


def open_folders(target: ImapTarget, user: str, password: str, folders: list[str]) -> None:
    """Log in, SELECT each folder once, CLOSE it, log out."""
    session = ImapSession(target)
    try:
        session.login(user, password)
        for folder in folders:
            session.command(f'SELECT "{folder}"')
            session.command("CLOSE")
    finally:
        session.close()


# -- 3. LOGIN latency -------------------------------------------------------------------------
def login_latency(target: ImapTarget, user: str, password: str, count: int) -> float:
    """`count` sequential sessions; the time from sending LOGIN to its tagged OK (TLS
    handshake and greeting not included). Median in milliseconds."""
    samples = []
    for _ in range(count):
        session = ImapSession(target, timeout=60)
        took, _ = timed(lambda: session.login(user, password))
        samples.append(took * 1000)
        session.close()
    return statistics.median(samples)


# -- 4. many clients: connect + LOGIN + SELECT + IDLE ------------------------------------------
async def _idler(target: ImapTarget, user: str, password: str
                 ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(target.host, target.port,
                                                   ssl=target.ssl_context, limit=1 << 20)
    line = await reader.readline()
    writer.write(f'a LOGIN "{user}" "{password}"\r\nb SELECT INBOX\r\nc IDLE\r\n'.encode())
    while True:
        last, line = line, await reader.readline()
        if not line:
            raise RuntimeError(f"an idle client lost its connection before IDLE (last "
                               f"response {last[:80]!r})")
        if line.startswith((b"a NO", b"a BAD", b"b NO", b"b BAD", b"c NO", b"c BAD")):
            raise RuntimeError(f"an idle client was refused: {line!r}")
        if line.startswith(b"+"):
            return reader, writer


async def open_idlers(target: ImapTarget, user: str, password: str, count: int,
                      concurrency: int = 0
                      ) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """`count` idling sessions, all at once, or at most `concurrency` logging in at a time."""
    gate = asyncio.Semaphore(concurrency or count)

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with gate:
            return await _idler(target, user, password)
    return list(await asyncio.gather(*(one() for _ in range(count))))


async def close_idlers(idlers: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _, writer in idlers:
        writer.close()
    for _, writer in idlers:
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


def idle_storm(target: ImapTarget, user: str, password: str, count: int) -> float:
    """`count` clients at once: connect, LOGIN, SELECT INBOX, IDLE. Seconds until every one
    has its IDLE continuation."""
    async def run() -> float:
        started = time.monotonic()
        idlers = await open_idlers(target, user, password, count)
        took = time.monotonic() - started
        await close_idlers(idlers)
        return took
    return asyncio.run(run())


# -- 6. memory --------------------------------------------------------------------------------
def memory(target: ImapTarget, pss: Callable[[], int], user: str, password: str, count: int,
           other_user: str, folders: list[str], settle: float = 2.0) -> dict[str, float]:
    """PSS (KiB, from `pss`) with `count` idle clients of `user`, then again after
    `other_user` opened each of `folders` once and logged out. MiB. The clients log in ten at
    a time: how fast a login storm is served is the idle-clients workload, not this one."""
    async def run() -> dict[str, float]:
        idlers = await open_idlers(target, user, password, count, concurrency=10)
        try:
            await asyncio.sleep(settle)
            idle = pss()
            await asyncio.to_thread(open_folders, target, other_user, password, folders)
            await asyncio.sleep(settle)
            after = pss()
        finally:
            await close_idlers(idlers)
        return {"memory-idle": idle / 1024, "memory-after-folders": after / 1024}
    return asyncio.run(run())


# -- 5. imaptest stress -----------------------------------------------------------------------
def imaptest(binary: str, host: str, port: int, tls: bool, user: str, password: str, mbox: str,
             clients: int, secs: int, profile: list[str]) -> tuple[float, int]:
    """Dovecot's imaptest stress (all clients on one mailbox) over IMAPS (or plain IMAP):
    (commands per second from its Totals line, number of `Error:` lines)."""
    env = dict(os.environ, LD_LIBRARY_PATH="/usr/lib/dovecot")
    command = [binary, f"host={host}", f"port={port}", *(["ssl=any-cert"] if tls else []),
               f"user={user}", f"pass={password}", f"mbox={mbox}", f"clients={clients}",
               f"secs={secs}", *profile]
    result = subprocess.run(command, env=env, capture_output=True, timeout=secs + 180,
                            stdin=subprocess.DEVNULL)
    out = (result.stdout + result.stderr).decode("utf-8", "replace")
    errors = sum(1 for line in out.splitlines() if line.startswith("Error:"))
    totals = out.split("Totals:", 1)
    if len(totals) != 2:
        raise RuntimeError(f"imaptest printed no totals:\n{out[-3000:]}")
    # The Totals block: command names, percentages, then one line of counts (Error: lines and
    # others may follow it).
    counts = next(([int(n) for n in line.split()] for line in totals[1].splitlines()
                   if line.split() and all(n.isdigit() for n in line.split())), None)
    if counts is None:
        raise RuntimeError(f"imaptest printed no counts under Totals:\n{out[-3000:]}")
    return sum(counts) / secs, errors

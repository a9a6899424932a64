"""imaptest (Dovecot's IMAP conformance and stress tool, tools/imaptest) against a real server.

Every scripted group whose capability we advertise must pass with no failed command and no
`Error:` line; a group for a capability we do not advertise is skipped with that reason. The
stress profile (many clients searching, fetching, storing, expunging and appending in one
mailbox) must give no `Error:` line at 10 and at 50 clients (docs/design/imap.md,
"Conformance"). The binary: $MAILSUITE_IMAPTEST (.ci/run builds it), else
/tmp/imaptest/src/imaptest, else the test is skipped locally and fails under CI.
"""
from __future__ import annotations

import datetime
import imaplib
import os
import random
import re
import ssl
import subprocess
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from email.utils import format_datetime

import pytest

from tests.environment import unavailable
from tests.harness import HOST, MailServer
from tests.polling import wait_until

pytestmark = pytest.mark.external

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS_DIR = os.path.join(REPO_ROOT, "tools", "imaptest", "src", "tests")
PASSWORD = "pw1"

# Every scripted group of tools/imaptest/src/tests (not broken/) -> the capability it needs
# (None: base IMAP4rev1). A capability is taken from the group's own `capabilities:` header;
# groups that need several list the one we lack first.
GROUPS: dict[str, str | None] = {
    "append": None, "atoms": None, "close": None, "copy": None, "expunge": None,
    "expunge2": None, "fetch": None, "fetch-body": None, "fetch-body-message-rfc822": None,
    "fetch-body-message-rfc822-mime": None, "fetch-body-message-rfc822-x2": None,
    "fetch-body-mime": None, "fetch-bodystructure": None, "fetch-envelope": None,
    "list": None, "logout": None, "mutf7": None, "nil": None, "pipeline": None,
    "search-addresses": None, "search-body": None, "search-date": None, "search-flags": None,
    "search-header": None, "search-sets": None, "search-size": None, "select": None,
    "store": None, "subscribe": None, "uidvalidity": None, "uidvalidity-rename": None,
    "id": "ID", "listext": "LIST-EXTENDED", "move": "MOVE", "uidplus": "UIDPLUS",
    "append-binary": "BINARY", "fetch-binary-mime": "BINARY",
    "fetch-binary-mime-base64": "BINARY", "fetch-binary-mime-qp": "BINARY",
    "catenate": "CATENATE", "catenate-multiappend": "CATENATE", "multiappend": "MULTIAPPEND",
    "esearch": "ESEARCH", "esearch-condstore": "ESEARCH", "esort": "ESORT",
    "search-context-update": "CONTEXT=SEARCH", "search-context-update2": "CONTEXT=SEARCH",
    "search-context-update3": "CONTEXT=SEARCH", "search-partial": "CONTEXT=SEARCH",
    "sort-addresses": "SORT", "sort-arrival": "SORT", "sort-date": "SORT", "sort-size": "SORT",
    "sort-subject": "SORT", "sort-display-from": "SORT=DISPLAY",
    "sort-display-to": "SORT=DISPLAY", "sort-partial": "CONTEXT=SORT",
    "thread": "THREAD=REFERENCES", "thread2": "THREAD=REFERENCES",
    "thread3": "THREAD=REFERENCES", "thread4": "THREAD=REFERENCES",
    "thread5": "THREAD=REFERENCES", "thread6": "THREAD=REFERENCES",
    "thread7": "THREAD=REFERENCES", "thread8": "THREAD=REFERENCES",
    "thread-orderedsubject": "THREAD=ORDEREDSUBJECT",
    "thread-orderedsubject2": "THREAD=ORDEREDSUBJECT",
    "notify": "NOTIFY", "urlauth": "URLAUTH", "urlauth2": "URLAUTH",
    "urlauth-binary": "URLAUTH=BINARY",
}
# Groups that need a second capability besides the one above.
ALSO_NEEDS = {"catenate-multiappend": "MULTIAPPEND", "esearch-condstore": "CONDSTORE",
              "notify": "QRESYNC", "urlauth-binary": "URLAUTH"}

STRESS = ["logout=0", "search=30", "uidfetch=30", "noop=10", "check=10"]
STRESS_SECONDS = 12


def imaptest_binary() -> str:
    for path in (os.environ.get("MAILSUITE_IMAPTEST"), "/tmp/imaptest/src/imaptest"):
        if path and os.access(path, os.X_OK):
            return path
    unavailable("imaptest is not built (set MAILSUITE_IMAPTEST; .ci/run builds tools/imaptest)")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def binary() -> str:
    return imaptest_binary()


@pytest.fixture(scope="module")
def server(tmp_path_factory, binary):
    s = MailServer(str(tmp_path_factory.mktemp("imaptest")), listeners=["imaps"], extra={
        # imaptest opens many connections from one address, fast, and its `id` group sends
        # the largest ID command RFC 2971 §3.3 allows (30 pairs of 30 + 1024 octets) before
        # login: above the default 8 KiB pre-login line limit.
        "limits": {"max_connections_per_ip": 500, "max_preauth_per_ip": 200,
                   "max_preauth_per_prefix": 500, "max_connections": 1000},
        "imap": {"max_commands_per_second": 0},
    })
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def capabilities(server) -> set[str]:
    server.add_user("caps@example.org", PASSWORD)
    ctx = ssl.create_default_context(cafile=server.cafile)
    ctx.check_hostname = False
    with imaplib.IMAP4_SSL(HOST, server.ports["imaps"], ssl_context=ctx) as c:
        c.login("caps@example.org", PASSWORD)
        typ, data = c.capability()
        assert typ == "OK"
        return {cap.upper() for cap in data[0].decode().split()}


def run_imaptest(binary: str, server: MailServer, *args: str, timeout: float = 120) -> str:
    env = dict(os.environ, LD_LIBRARY_PATH="/usr/lib/dovecot")
    cmd = [binary, f"host={HOST}", f"port={server.ports['imaps']}", "ssl=any-cert",
           f"pass={PASSWORD}", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    return (result.stdout + result.stderr).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def group_outputs(binary, server, capabilities) -> dict[str, str]:
    """imaptest's output of every group we advertise the capabilities for, run in parallel:
    each group as its own pair of users, so no two touch the same mailbox."""
    runnable = [g for g in GROUPS if _missing(g, capabilities) is None]
    for g in runnable:
        server.add_user(f"{g}@example.org", PASSWORD)
        server.add_user(f"{g}-2@example.org", PASSWORD)

    def run(group: str) -> tuple[str, str]:
        return group, run_imaptest(binary, server, f"user={group}@example.org",
                                   f"user2={group}-2@example.org",
                                   f"test={os.path.join(TESTS_DIR, group)}")
    with ThreadPoolExecutor(8) as pool:
        return dict(pool.map(run, runnable))


def _missing(group: str, capabilities: set[str]) -> str | None:
    for cap in (GROUPS[group], ALSO_NEEDS.get(group)):
        if cap and cap not in capabilities:
            return cap
    return None


def test_every_group_is_listed():
    groups = {n for n in os.listdir(TESTS_DIR)
              if not n.endswith(".mbox") and n != "broken"}
    assert groups == set(GROUPS)


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_group(group, capabilities, group_outputs):
    missing = _missing(group, capabilities)
    if missing is not None:
        pytest.skip(f"{missing} is not advertised")
    out = group_outputs[group]
    summary = re.search(r"(\d+) test groups: (\d+) failed", out)
    assert summary, out
    counts = re.findall(r"(?:base protocol|extensions): (\d+)/(\d+) individual commands failed",
                        out)
    assert len(counts) == 2, out
    failed = sum(int(f) for f, _ in counts)
    ran = sum(int(n) for _, n in counts)
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert summary.group(2) == "0" and failed == 0 and not errors, out
    assert ran > 0, f"no command of {group} ran:\n{out}"


@pytest.fixture(scope="module")
def stress_mbox(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("mbox") / "stress.mbox")
    generate_mbox(path, 300)
    return path


@pytest.mark.parametrize("clients", [10, 50])
def test_stress_gives_no_errors(binary, server, stress_mbox, clients):
    """Many sessions on one mailbox: what one expunges, the others still show until told
    (RFC 3501 §7.4.1, RFC 2180 §4.1); imaptest checks every reply against its model."""
    user = f"stress{clients}@example.org"
    server.add_user(user, PASSWORD)
    out = run_imaptest(binary, server, f"user={user}", f"mbox={stress_mbox}",
                       f"clients={clients}", f"secs={STRESS_SECONDS}", *STRESS,
                       timeout=STRESS_SECONDS + 120)
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert not errors, "\n".join(errors[:50]) + f"\n({len(errors)} errors)"
    totals = out.split("Totals:", 1)
    assert len(totals) == 2, out
    # The last line of the totals counts each command: the clients did real work.
    counts = [int(n) for n in totals[1].strip().splitlines()[-1].split()]
    assert sum(counts) > clients * 10, out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """A server with a worker process beside the first on the same IMAPS socket
    (docs/design/architecture.md, "Worker processes")."""
    s = MailServer(str(tmp_path_factory.mktemp("imaptest-workers")), listeners=["imaps"], extra={
        "server": {"workers": 2, "worker_listeners": ["imaps"]},
        "limits": {"max_connections_per_ip": 500, "max_preauth_per_ip": 200,
                   "max_preauth_per_prefix": 500, "max_connections": 1000},
        "imap": {"max_commands_per_second": 0},
    })
    s.start()
    try:
        wait_until(lambda: "serving imaps on the listening socket" in s.log_text(), timeout=60,
                   message="the worker process")
        yield s
    finally:
        s.stop()


@pytest.mark.parametrize("profile", [[], ["logout=0"], STRESS],
                         ids=["default", "logout0", "searches"])
def test_stress_on_two_processes_gives_no_errors(binary, two_processes, stress_mbox, profile):
    """imaptest's own profiles (APPEND with dates, STORE, EXPUNGE, FETCH with CONDSTORE) with
    the sessions of one mailbox spread over two processes: what one process changes, the
    other must report with the same INTERNALDATE and a real MODSEQ, and a SEARCH that could
    not read a message expunged there says EXPUNGEISSUED.

    The kernel gives each connection to whichever process accepts first: when one is busy
    (ending the sessions of the run before) the other may take every client of a run. Such a
    run proved nothing about two processes, so it is made again, on a fresh mailbox."""
    spread = []
    for attempt in range(3):
        # A mailbox of its own per profile and attempt.
        user = f"workers{len(profile)}-{attempt}@example.org"
        two_processes.add_user(user, PASSWORD)
        out = run_imaptest(binary, two_processes, f"user={user}", f"mbox={stress_mbox}",
                           "clients=30", f"secs={STRESS_SECONDS}", *profile,
                           timeout=STRESS_SECONDS + 120)
        errors = [line for line in out.splitlines() if line.startswith("Error:")]
        assert not errors, "\n".join(errors[:50]) + f"\n({len(errors)} errors)"
        # Which processes served sessions of this run (each logs its logins with its pid).
        pids = set(re.findall(r"\[pid=(\d+) [^]]*\] imap: " + re.escape(user) + " logged in",
                              two_processes.log_text()))
        spread.append(pids)
        if len(pids) == 2:
            return
    raise AssertionError(f"no run had sessions in both processes: {spread}")


def generate_mbox(path: str, count: int, seed: int = 11) -> None:
    """A deterministic mbox of `count` varied messages: plain text, multipart/alternative,
    attachments, replies with References, 8-bit subjects, groups and comments in addresses."""
    rnd = random.Random(seed)
    names = ["Alice Example", "Bob Builder", "Carol Jones", "Dave O'Brien", "Eve Müller",
             "Frank Zhang", "Grace Hopper", "Heidi Klum"]
    domains = ["example.org", "example.com", "mail.test", "lists.example.net"]
    words = ("meeting report budget quarterly lunch release notes invoice travel plans draft "
             "review schedule update question patch server backup holiday photos").split()
    start = datetime.datetime(2023, 1, 1, 8, 0, tzinfo=datetime.timezone.utc)
    ids: list[str] = []
    with open(path, "wb") as out:
        for i in range(count):
            m = EmailMessage()
            n1, n2 = rnd.sample(names, 2)
            d1, d2 = rnd.choice(domains), rnd.choice(domains)
            a1 = n1.split()[0].lower() + "@" + d1
            a2 = n2.split()[0].lower() + "@" + d2
            m["From"] = f"{n1} <{a1}>" if i % 5 else f"{a1} ({n1})"
            m["To"] = f"{n2} <{a2}>" if i % 7 else f"team: {a2}, {a1};"
            if i % 3 == 0:
                m["Cc"] = f"{rnd.choice(names)} <cc{i}@{rnd.choice(domains)}>"
            subject = " ".join(rnd.choice(words) for _ in range(rnd.randint(2, 6)))
            if i % 4 == 0 and ids:
                subject = "Re: " + subject
                m["In-Reply-To"] = m["References"] = rnd.choice(ids)
            m["Subject"] = subject if i % 11 else "Grüße: " + subject
            date = start + datetime.timedelta(minutes=rnd.randint(0, 500000))
            m["Date"] = format_datetime(date)
            ids.append(f"<msg{i}.{seed}@{d1}>")
            m["Message-ID"] = ids[-1]
            body = "\n".join(" ".join(rnd.choice(words) for _ in range(rnd.randint(5, 14)))
                             for _ in range(rnd.randint(3, 40)))
            m.set_content(f"Hello {n2.split()[0]},\n\n{body}\n\n-- \n{n1}\n")
            if i % 6 == 0:
                m.add_alternative(f"<html><body><p>{body}</p></body></html>", subtype="html")
            if i % 9 == 0:
                m.add_attachment(bytes(rnd.getrandbits(8) for _ in range(rnd.randint(500, 6000))),
                                 maintype="application", subtype="octet-stream",
                                 filename=f"file{i}.bin")
            raw = m.as_bytes(policy=m.policy.clone(linesep="\n"))
            # mbox: a From_ line before each message, body lines starting "From " escaped.
            raw = b"\n".join(b">" + line if line.startswith(b"From ") else line
                             for line in raw.split(b"\n"))
            out.write(b"From " + a1.encode() + b" " +
                      date.strftime("%a %b %d %H:%M:%S %Y").encode() + b"\n")
            out.write(raw.rstrip(b"\n") + b"\n\n")

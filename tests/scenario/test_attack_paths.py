"""Attack: addresses that are valid mail addresses but unsafe as directory names (docs/design/
directory.md, "Addresses that name directories"), against the real server.

- `mailsuite user add` refuses every unsafe local part and domain, in one line;
- accounts inserted straight into the database with such names (an import) get no Maildir:
  mail to them is accepted, then deferred in the queue with a log line, and nothing is written
  outside data_dir (nor a folder inside another user's Maildir); their IMAP and POP3 logins are
  refused without a traceback;
- a normal user is served all along (mail delivered, IMAP and POP3 logins).

Prints `ATTACK paths: rss_before=.. rss_after=.. served=N/M`.
"""
from __future__ import annotations

import imaplib
import os
import poplib
import smtplib
import uuid

import pytest
from sqlalchemy import insert, select

from mailsuite.directory.models import Domain, User
from mailsuite.directory.passwords import hash_password
from tests.harness import HOST, MailServer, rss_kib
from tests.polling import wait_until

PASSWORD = "secret-pw-1"




@pytest.fixture
def server(tmp_path):
    s = MailServer(str(tmp_path / "server"), listeners=["mx", "imaps", "pop3s"],
                   extra={"limits": {"auth_failure_delay": 0}})
    s.start()
    try:
        s.add_user("alice@example.org")
        yield s
    finally:
        s.stop()


def imap_client(server: MailServer) -> imaplib.IMAP4:
    return imaplib.IMAP4_SSL(HOST, server.ports["imaps"], ssl_context=server.ssl_context(),
                             timeout=30)


def pop_client(server: MailServer) -> poplib.POP3:
    return poplib.POP3_SSL(HOST, server.ports["pop3s"], context=server.ssl_context(), timeout=30)


def around(base: str) -> set[str]:
    """What sits beside the server's directory, and what in /tmp (shared with other processes)
    carries a name an escape would create."""
    names = ("ms-attack", "evil", "escape", "sent", "hidden")
    return set(os.listdir(os.path.dirname(base))) | {
        n for n in os.listdir("/tmp") if any(word in n for word in names)}


def snapshot(root: str) -> set[str]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.add(os.path.join(dirpath, name))
    return found


# As real subprocesses, a few of each kind (every case runs in process in
# tests/unit/test_directory_paths.py and tests/unit/test_admin_input.py).
CLI_REFUSED = ["/tmp/x/evil", "alice/.sent", "a\u202eb"]
DOMAINS_REFUSED = ["exa/mple.org"]


def test_user_add_refuses_every_unsafe_name(server):
    refused = 0
    cases = [f"{local}@example.org" for local in CLI_REFUSED] + [
        f"alice@{domain}" for domain in DOMAINS_REFUSED]
    for address in cases:
        result = server.admin("user", "add", address, "--password-stdin", input="pw\n",
                              check=False)
        lines = result.stderr.splitlines()
        assert result.returncode in (1, 2), (address, result)
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        refused += 1
    for domain in DOMAINS_REFUSED:
        result = server.admin("domain", "add", domain, check=False)
        assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result
    assert server.admin("user", "list").stdout == "alice@example.org\n"
    assert refused == len(cases)


def test_imported_unsafe_accounts_never_touch_anything_outside_data_dir(server, tmp_path):
    # Absolute and relative escapes, a folder inside alice's Maildir, hidden names.
    outside = f"/tmp/ms-attack-{uuid.uuid4().hex[:8]}"
    locals_ = [f"{outside}/evil", "alice/.sent", "../../../escape", ".hidden", "x/../../y"]
    addresses = [f"{local}@example.org" for local in locals_]
    # Not dot-atoms: SMTP refuses them at RCPT already (RFC 5321 §4.1.2).
    bad_syntax = {a for a in addresses if a.startswith(".") or "/../" in a or a.startswith("..")}
    store = server.directory()
    try:
        stored_hash = hash_password(PASSWORD)
        with store._unit(write=True) as s:
            domain_id = s.scalar(select(Domain.id).where(Domain.name == "example.org"))
            for address in addresses:
                s.execute(insert(User).values(address=address, domain_id=domain_id,
                                              password_hash=stored_hash))
    finally:
        store.close()
    base = os.path.dirname(server.data_dir)
    before_outside = around(base)
    alice_before = snapshot(server.maildir("alice@example.org"))
    pid = server.process.pid
    rss_before = rss_kib(pid)

    served = total = 0
    # Mail: one message to every unsafe address and alice; alice gets hers, the others wait.
    with smtplib.SMTP(HOST, server.ports["mx"], timeout=30) as smtp:
        smtp.ehlo("attacker.example")
        refused = smtp.sendmail("mallory@remote.example", addresses + ["alice@example.org"],
                                b"Subject: paths\r\n\r\nhello\r\n")
    # The others exist: accepted, then kept in the queue.
    assert set(refused) == bad_syntax and all(code >= 500 for code, _ in refused.values())
    total += 1
    if len(server.wait_for_messages("alice@example.org", 1)) == 1:
        served += 1
    accepted = len(addresses) - len(bad_syntax)
    wait_until(lambda: server.log_text().count("status=deferred") >= accepted,
               timeout=20, message="the deferred deliveries")

    # Logins for the unsafe accounts are refused (no Maildir to open), without a traceback.
    for address in addresses:
        imap = imap_client(server)
        try:
            with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
                imap.login(address, PASSWORD)
        finally:
            imap.shutdown()
        pop = pop_client(server)
        try:
            pop.user(address)
            with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
                pop.pass_(PASSWORD)
        finally:
            pop.close()
        # A normal user is served between the attacks.
        total += 2
        imap = imap_client(server)
        if imap.login("alice@example.org", PASSWORD)[0] == "OK":
            served += 1
        imap.logout()
        pop = pop_client(server)
        pop.user("alice@example.org")
        if pop.pass_(PASSWORD).startswith(b"+OK"):
            served += 1
        pop.quit()

    rss_after = rss_kib(pid)
    print(f"\nATTACK paths: rss_before={rss_before}kB rss_after={rss_after}kB "
          f"served={served}/{total}")
    assert served == total
    # Nothing outside data_dir, nothing new in alice's Maildir but her message.
    assert not os.path.exists(outside)
    assert around(base) == before_outside
    # alice's login made her default folders (.Sent, ...); the account "alice/.sent" must not
    # have made a lower-case .sent beside them, nor anything else.
    alice_after = snapshot(server.maildir("alice@example.org"))
    assert not [p for p in alice_after - alice_before if os.path.basename(p) == ".sent"]
    assert ".sent" not in os.listdir(server.maildir("alice@example.org"))
    for path in snapshot(server.data_dir):
        assert os.path.realpath(path).startswith(os.path.realpath(server.data_dir))
    mail_domain = os.path.join(server.data_dir, "mail", "example.org")
    assert sorted(os.listdir(mail_domain)) == ["alice"]
    log = server.log_text()
    assert "Traceback" not in log, log[-3000:]
    assert "address unusable as a mailbox name" in log  # the login refusals say why

"""Acceptance: the real Thunderbird (Debian ESR, headless, Marionette) against a real mailsuite.

1. The account comes from our autoconfig: Thunderbird's own FetchConfig.fromISP fetches
   config-v1.1.xml from the running server and its own CreateInBackend writes the prefs.
2. Receive over IMAP STARTTLS and over IMAPS: a >100 KB message delivered through the MX port
   appears in INBOX and the full body Thunderbird streams (fetched in chunks, not from an
   offline copy) matches the stored file byte for byte.
3. Send through submission 587 (STARTTLS) and 465 (TLS) with AUTH: the message reaches the local
   recipient's Maildir and Thunderbird's copy lands in Sent (IMAP APPEND).
4. Mark read, flag, archive, delete to Trash, empty Trash; each change checked with imaplib.
5. A second profile downloads INBOX over POP3 with STLS.
Also: Thunderbird's own Autodiscover client reads our POX answer; Thunderbird's IMAP/SMTP/POP3
traces and the server log show no error replies or tracebacks; and a blocking dialog (wrong SMTP
password) fails a step with its text instead of hanging the run.

Everything runs twice: with Thunderbird's defaults, and with its CONDSTORE support switched on
(`mail.server.default.use_condstore`, off by default), where its IMAP trace must show that it
used CONDSTORE and got neither BAD nor NO (RFC 7162; docs/design/imap.md, "CONDSTORE and
QRESYNC").

The self-signed server certificate is accepted with a per-host:port override in the profile (what
"Confirm Security Exception" stores), never by switching TLS off. Set MAILSUITE_UPDATE_SCREENSHOT=1
to refresh docs/thunderbird-inbox.png from the IMAPS profile.
"""
from __future__ import annotations

import email
import email.message
import imaplib
import os
import re
import shutil
import smtplib
import time
import uuid

import pytest

from tests import polling
from tests.environment import unavailable
from tests.harness import MailServer
from tests.thunderbird.driver import BINARY, Thunderbird, ThunderbirdError

try:
    import marionette_driver  # noqa: F401
    HAVE_MARIONETTE = True
except ImportError:
    HAVE_MARIONETTE = False

pytestmark = [
    pytest.mark.external,
    pytest.mark.timeout(180),  # includes the shared set-up (Thunderbird start-up) on a busy machine
]


@pytest.fixture(scope="module", autouse=True)
def thunderbird_installed():
    """Before any module fixture starts Thunderbird: skip, or fail under CI."""
    if not os.path.exists(BINARY):
        unavailable("Thunderbird is not installed (Debian package thunderbird)")
    if not HAVE_MARIONETTE:
        unavailable("the marionette-driver package (PyPI, in .[test]) is not installed")

from tests.thunderbird.mail import (SOCKET_SSL, SOCKET_STARTTLS, TBAccount,  # noqa: E402
                                    exchange_autodiscover, proxy_prefs)

PASSWORD = "secret-pw-1"
ALICE = "alice@example.org"
BOB = "bob@example.org"
TLS_LISTENERS = ("imap", "imaps", "submission", "submissions", "pop3", "pop3s")
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "docs")


# -- fixtures: one server, one Thunderbird profile per connection mode ----------------------------

@pytest.fixture(scope="module", params=["default", "condstore"])
def mail(request, tmp_path_factory):
    """The server, and four fresh Thunderbird profiles launched while it starts (Thunderbird's
    start-up is most of this test's time); in the "condstore" run the profiles use CONDSTORE."""
    base = tmp_path_factory.mktemp("thunderbird")
    server = MailServer(str(base / "server"))
    server.condstore = request.param == "condstore"
    # The server's own self-signed certificate, made before it starts (it keeps an existing
    # one), so the profiles can carry their exceptions for it from their first start.
    from mailsuite.tls import create_self_signed

    create_self_signed(server.hostname, server.cafile,
                       os.path.join(os.path.dirname(server.cafile), "key.pem"))
    server.thunderbirds = {name: _thunderbird(server, str(base / f"profile-{name}"))
                           for name in ("starttls", "tls", "pop3")}
    # Its own profile for the test that logs in with a wrong password on purpose, so that its
    # 535 replies are not in the traces the error check reads, whatever the order of the tests.
    server.dialog_thunderbird = _thunderbird(server, str(base / "profile-dialog"))
    everyone = [*server.thunderbirds.values(), server.dialog_thunderbird]
    try:
        for tb in everyone:
            tb.launch()
        server.start()
        # In-process rather than admin CLI runs: start-up of a Python process is slow on a busy
        # machine (the admin CLI has its own tests).
        from mailsuite.config import load
        from mailsuite.directory.store import DirectoryStore

        store = DirectoryStore(load(server.config_path).database_url)
        try:
            store.add_domain("example.org")
            store.add_user(ALICE, PASSWORD)
            store.add_user(BOB, PASSWORD)
        finally:
            store.close()
        yield server
    finally:
        for tb in everyone:
            tb.request_quit()
        for tb in everyone:
            tb.wait()
        server.stop()


def _thunderbird(mail: MailServer, profile_dir: str) -> Thunderbird:
    overrides = [(mail.hostname, mail.ports[n], mail.cafile) for n in TLS_LISTENERS]
    prefs = proxy_prefs(mail.ports["autoconfig"])
    if mail.condstore:
        prefs["mail.server.default.use_condstore"] = True
    return Thunderbird(profile_dir, prefs, cert_overrides=overrides)


@pytest.fixture(scope="module")
def profiles(mail):
    for tb in mail.thunderbirds.values():
        tb.connect(60)
    yield mail.thunderbirds
    # After every test of the module, in whatever order they ran: nothing went wrong underneath.
    problems = server_errors_behind_thunderbirds_back(mail, mail.thunderbirds)
    assert not problems, "\n".join(problems[:10])


@pytest.fixture(scope="module")
def dialog_tb(mail):
    """Alice again, in a profile of its own (see `mail`)."""
    mail.dialog_thunderbird.connect(60)
    account = TBAccount.from_autoconfig(mail.dialog_thunderbird, ALICE, PASSWORD,
                                        "Alice Example", "imap", SOCKET_STARTTLS,
                                        SOCKET_STARTTLS)
    account.sync_folder("INBOX")
    return account


@pytest.fixture(scope="module")
def alice_tb(profiles):
    """Alice: IMAP with STARTTLS, submission on 587 with STARTTLS."""
    account = TBAccount.from_autoconfig(profiles["starttls"], ALICE, PASSWORD, "Alice Example",
                                        "imap", SOCKET_STARTTLS, SOCKET_STARTTLS)
    account.sync_folder("INBOX")
    return account


@pytest.fixture(scope="module")
def bob_tb(profiles):
    """Bob: IMAPS (implicit TLS), submissions on 465 (implicit TLS)."""
    account = TBAccount.from_autoconfig(profiles["tls"], BOB, PASSWORD, "Bob Example", "imap",
                                        SOCKET_SSL, SOCKET_SSL)
    account.sync_folder("INBOX")
    return account


# -- helpers --------------------------------------------------------------------------------------

def big_message(to: str, message_id: str, subject: str) -> bytes:
    """Over 100 KB (Thunderbird fetches it in chunks), 8-bit UTF-8 text, CRLF line ends."""
    lines = [f"{i:05d} The quick brown fox jumps over the lazy dog. Grüße aus Zürich, ½ € ✓ "
             f"{uuid.uuid4().hex}" for i in range(1400)]
    header = (f"From: Carol Remote <carol@remote.test>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
              f"Message-ID: <{message_id}>\r\nDate: Sat, 28 Nov 2026 01:00:00 +0000\r\n"
              "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
              "Content-Transfer-Encoding: 8bit\r\n\r\n")
    data = (header + "\r\n".join(lines) + "\r\n").encode("utf-8")
    assert len(data) > 100 * 1024
    return data


def deliver_via_mx(mail: MailServer, to: str, data: bytes) -> bytes:
    """Send through the MX port; the bytes of the message as stored in the Maildir."""
    before = {_unique(p) for p in mail.messages(to)}
    with smtplib.SMTP("127.0.0.1", mail.ports["mx"], timeout=30) as client:
        client.ehlo("remote.test")
        client.sendmail("carol@remote.test", [to], data)

    def arrived() -> bytes | None:
        for path in mail.messages(to):
            if _unique(path) not in before:
                try:
                    with open(path, "rb") as f:
                        return f.read()
                except FileNotFoundError:
                    return None  # an IMAP session moved it to cur/ meanwhile: look again
        return None

    return polling.wait_until(arrived, timeout=15, interval=0.05,
                              message=f"the message for {to} to reach its Maildir")


def _unique(path: str) -> str:
    """A Maildir file's identity: its name without the ":2,<flags>" info part."""
    return os.path.basename(path).split(":2,")[0]


class ImapProbe:
    """One imaplib session (STARTTLS) for checking what Thunderbird did, server side."""

    def __init__(self, mail: MailServer, user: str):
        self.client = imaplib.IMAP4("127.0.0.1", mail.ports["imap"], timeout=30)
        self.client.starttls(mail.ssl_context())
        self.client.login(user, PASSWORD)

    def close(self) -> None:
        try:
            self.client.logout()
        except (imaplib.IMAP4.error, OSError):
            pass

    def __enter__(self) -> "ImapProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def find(self, folder: str, message_id: str) -> tuple[bool, set[str]]:
        """(present, flags) of the message with that Message-ID in `folder` (EXAMINE anew each
        time, so changes by Thunderbird's sessions are seen)."""
        typ, _ = self.client.select(_quote(folder), readonly=True)
        if typ != "OK":
            return False, set()
        typ, data = self.client.uid("SEARCH", "HEADER", "Message-ID", f"<{message_id}>")
        uids = data[0].split() if typ == "OK" and data and data[0] else []
        if not uids:
            return False, set()
        typ, data = self.client.uid("FETCH", uids[0], "(FLAGS)")
        if typ != "OK" or not data or not isinstance(data[0], bytes):
            return False, set()  # moved away by Thunderbird between SEARCH and FETCH
        flags = re.search(rb"FLAGS \(([^)]*)\)", data[0]).group(1).decode().split()
        return True, set(flags)

    def folders(self) -> list[str]:
        typ, data = self.client.list()
        names = []
        for line in data:
            match = re.match(rb'\((?P<flags>[^)]*)\) (?P<delim>"[^"]*"|NIL) (?P<name>.+)$', line)
            if match:
                names.append(match.group("name").decode().strip('"'))
        return names

    def count(self, folder: str) -> int:
        typ, data = self.client.select(_quote(folder), readonly=True)
        return int(data[0]) if typ == "OK" else -1

    def search_subject(self, folder: str, word: str) -> list[bytes]:
        typ, _ = self.client.select(_quote(folder), readonly=True)
        assert typ == "OK", f"cannot select {folder}"
        typ, data = self.client.search(None, "SUBJECT", f'"{word}"')
        return data[0].split() if typ == "OK" else []


def wait_until(check, what: str, timeout: float = 15.0):
    return polling.wait_until(check, timeout=timeout, interval=0.1, message=what)


def find_subject(mail: MailServer, user: str, folder: str, subject: str
                 ) -> email.message.Message | None:
    """The message with that Subject in a Maildir folder, read from disk (None if not there)."""
    for path in mail.messages(user, folder):
        try:
            with open(path, "rb") as f:
                message = email.message_from_binary_file(f)
        except FileNotFoundError:
            continue  # moved from new/ to cur/ by an IMAP session meanwhile: next poll finds it
        if message["Subject"] == subject:
            return message
    return None


def _quote(folder: str) -> str:
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- 1. autoconfig ------------------------------------------------------------------------------

def test_account_comes_from_our_autoconfig(mail, alice_tb, bob_tb):
    s = alice_tb.settings
    assert (s.type, s.hostname, s.port, s.socket_type) == ("imap", mail.hostname,
                                                            mail.ports["imap"], SOCKET_STARTTLS)
    assert (s.smtp_hostname, s.smtp_port, s.smtp_socket_type) == (
        mail.hostname, mail.ports["submission"], SOCKET_STARTTLS)
    assert s.auth_method == s.smtp_auth_method == 3  # nsMsgAuthMethod.passwordCleartext
    assert s.username == s.smtp_username == ALICE  # %EMAILADDRESS% replaced by Thunderbird
    assert s.fcc_folder.endswith("/Sent")
    assert s.use_condstore == bob_tb.settings.use_condstore == mail.condstore
    b = bob_tb.settings
    assert (b.port, b.socket_type, b.smtp_port, b.smtp_socket_type) == (
        mail.ports["imaps"], SOCKET_SSL, mail.ports["submissions"], SOCKET_SSL)
    # Thunderbird really asked our listener (through the proxy pref, as autoconfig.example.org).
    assert "sent config-v1.1.xml for example.org" in mail.log_text()


# -- 2. receiving ---------------------------------------------------------------------------------

@pytest.mark.parametrize("who", ["alice-imap-starttls", "bob-imaps"])
def test_receive_big_message_byte_for_byte(mail, alice_tb, bob_tb, who):
    account, user = (alice_tb, ALICE) if who.startswith("alice") else (bob_tb, BOB)
    message_id = f"{uuid.uuid4().hex}@remote.test"
    stored = deliver_via_mx(mail, user, big_message(user, message_id, f"big message for {who}"))
    listed = account.sync_folder("INBOX", expect=message_id)
    assert message_id in [m["messageId"] for m in listed], listed
    body = account.stream_body(message_id)
    on_disk = stored
    assert len(body) == len(on_disk) > 100 * 1024
    assert body == on_disk


# -- 3. sending -----------------------------------------------------------------------------------

@pytest.mark.parametrize("who", ["alice-587-starttls", "bob-465-tls"])
def test_send_reaches_maildir_and_sent(mail, alice_tb, bob_tb, who):
    account, sender, rcpt = ((alice_tb, ALICE, BOB) if who.startswith("alice")
                             else (bob_tb, BOB, ALICE))
    subject = f"from Thunderbird {who} {uuid.uuid4().hex[:8]}"
    text = "Hello,\r\n\r\nsent by Thunderbird through mailsuite. Grüße!\r\n"
    account.send(rcpt, subject, text)
    message = wait_until(lambda: find_subject(mail, rcpt, "", subject), f"delivery to {rcpt}")
    assert sender in message["From"]
    assert "Grüße" in message.get_payload(decode=True).decode(
        message.get_content_charset() or "utf-8")
    # The Sent copy is Thunderbird's APPEND; check it through IMAP, not the file system.
    with ImapProbe(mail, sender) as imap:
        assert imap.search_subject("Sent", subject.split()[-1]), \
            f"no copy of {subject!r} in {sender}'s Sent"


# -- 4. filing ------------------------------------------------------------------------------------

def test_read_flag_archive_delete_empty_trash(mail, alice_tb):
    message_id = f"{uuid.uuid4().hex}@remote.test"
    deliver_via_mx(mail, ALICE, (
        f"From: <carol@remote.test>\r\nTo: <{ALICE}>\r\nSubject: file me\r\n"
        f"Message-ID: <{message_id}>\r\nDate: Sat, 28 Nov 2026 01:00:00 +0000\r\n\r\n"
        "to be read, flagged, archived and deleted\r\n").encode())
    listed = alice_tb.sync_folder("INBOX", expect=message_id)
    assert message_id in [m["messageId"] for m in listed]

    with ImapProbe(mail, ALICE) as imap:
        alice_tb.mark_read(message_id)
        wait_until(lambda: "\\Seen" in imap.find("INBOX", message_id)[1], "\\Seen")

        alice_tb.mark_flagged(message_id)
        wait_until(lambda: "\\Flagged" in imap.find("INBOX", message_id)[1], "\\Flagged")

        alice_tb.archive(message_id)
        wait_until(lambda: not imap.find("INBOX", message_id)[0], "removal from INBOX")

        def archived_in():
            for folder in imap.folders():
                if folder.lower().startswith("archive") and imap.find(folder, message_id)[0]:
                    return folder
            return None
        archive = wait_until(archived_in, "the message in an Archive folder")
        present, flags = imap.find(archive, message_id)
        assert {"\\Seen", "\\Flagged"} <= flags, (archive, flags)

        tb_path = "/".join(re.split(r"[./]", archive))  # Thunderbird names folders with "/"
        alice_tb.delete_to_trash(message_id, tb_path)
        wait_until(lambda: not imap.find(archive, message_id)[0], f"removal from {archive}")
        wait_until(lambda: imap.find("Trash", message_id)[0], "the message in Trash")

        alice_tb.empty_trash()
        wait_until(lambda: not imap.find("Trash", message_id)[0], "an empty Trash")
        assert imap.count("Trash") == 0


# -- screenshot of the message list -------------------------------------------------------------

def test_message_list_screenshot(mail, bob_tb, tmp_path):
    message_id = f"{uuid.uuid4().hex}@remote.test"
    deliver_via_mx(mail, BOB, (
        "From: Carol Remote <carol@remote.test>\r\nTo: Bob Example <bob@example.org>\r\n"
        f"Subject: Welcome to mailsuite\r\nMessage-ID: <{message_id}>\r\n"
        "Date: Sat, 28 Nov 2026 01:00:00 +0000\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "Hello Bob,\r\n\r\nthis message came in through mailsuite's MX port and Thunderbird "
        "read it over IMAPS.\r\n").encode())
    listed = bob_tb.sync_folder("INBOX", expect=message_id)
    assert message_id in [m["messageId"] for m in listed]
    bob_tb.show_inbox(message_id)
    path = str(tmp_path / "inbox.png")
    bob_tb.tb.screenshot(path)
    with open(path, "rb") as f:
        png = f.read()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    if os.environ.get("MAILSUITE_UPDATE_SCREENSHOT"):
        os.makedirs(DOCS, exist_ok=True)
        shutil.copyfile(path, os.path.join(DOCS, "thunderbird-inbox.png"))


# -- Outlook Autodiscover, read by Thunderbird's own parser ---------------------------------------

def test_thunderbird_reads_our_autodiscover(mail, profiles):
    found = exchange_autodiscover(profiles["pop3"], BOB, PASSWORD)
    incoming = {(e["type"], e["hostname"], e["port"], e["socket_type"], e["username"])
                for e in found["incoming"]}
    assert incoming == {("imap", mail.hostname, mail.ports["imaps"], SOCKET_SSL, BOB),
                        ("pop3", mail.hostname, mail.ports["pop3s"], SOCKET_SSL, BOB)}
    outgoing = {(e["type"], e["hostname"], e["port"], e["socket_type"])
                for e in found["outgoing"]}
    assert outgoing == {("smtp", mail.hostname, mail.ports["submissions"], SOCKET_SSL)}
    assert "sent Autodiscover settings for bob@example.org" in mail.log_text()


# -- 5. POP3 --------------------------------------------------------------------------------------

def test_pop3_stls_download(mail, profiles):
    message_id = f"{uuid.uuid4().hex}@remote.test"
    stored = deliver_via_mx(mail, BOB, big_message(BOB, message_id, "big message for POP3"))

    def message_ids() -> set[str] | None:
        found = set()
        for path in mail.messages(BOB):
            try:
                with open(path, "rb") as f:
                    found.add(email.message_from_binary_file(f)["Message-ID"].strip("<>"))
            except FileNotFoundError:
                return None  # an IMAP session moved it to cur/ meanwhile: list again
        return found

    expected = polling.wait_until(message_ids, timeout=15, interval=0.05,
                                  message="a listing of bob's Maildir that holds still")
    account = TBAccount.from_autoconfig(profiles["pop3"], BOB, PASSWORD, "Bob Example", "pop3",
                                        SOCKET_STARTTLS, SOCKET_STARTTLS)
    assert (account.settings.port, account.settings.socket_type) == (
        mail.ports["pop3"], SOCKET_STARTTLS)
    downloaded = account.pop3_get_new_mail()
    assert {m["messageId"] for m in downloaded} == expected
    body = account.local_body(message_id)
    # Thunderbird's local mbox store puts its own headers (X-Account-Key, X-UIDL,
    # X-Mozilla-Status...) in front of the message and keeps it with LF line ends on Linux;
    # apart from that it is what RETR sent.
    body = re.sub(rb"\A((X-Mozilla-[A-Za-z0-9-]+|X-Account-Key|X-UIDL):[^\n]*\n)+", b"", body)
    assert body == stored.replace(b"\r\n", b"\n")


# -- nothing went wrong underneath ----------------------------------------------------------------

def test_no_server_errors_behind_thunderbirds_back(mail, profiles, alice_tb):
    """Thunderbird hides some failures (it shrugs off a failed IDLE and polls instead): read its
    own IMAP, SMTP and POP3 traces for error replies, and the server log for tracebacks. This
    checks what happened so far; the `profiles` fixture checks again after the last test.

    In the CONDSTORE run, whatever the order of the tests, a flag changed by another session
    first makes Thunderbird resynchronize by mod-sequence (CHANGEDSINCE)."""
    if mail.condstore:
        message_id = f"{uuid.uuid4().hex}@remote.test"
        deliver_via_mx(mail, ALICE, big_message(ALICE, message_id, "condstore resync"))
        alice_tb.sync_folder("INBOX", expect=message_id)
        with ImapProbe(mail, ALICE) as probe:
            probe.client.select("INBOX")
            typ, data = probe.client.uid("SEARCH", "HEADER", "Message-ID", f"<{message_id}>")
            assert typ == "OK" and data[0], data
            probe.client.uid("STORE", data[0].split()[0], "+FLAGS", "(\\Flagged)")
        headers = alice_tb.sync_folder("INBOX")
        assert headers
    problems = server_errors_behind_thunderbirds_back(mail, profiles)
    assert not problems, "\n".join(problems[:10])
    if mail.condstore:
        # The run really used CONDSTORE: Thunderbird's IMAP_CS trace (driver.py) says so for
        # every folder it synchronized. (It needs no ENABLE or SELECT (CONDSTORE): we send
        # HIGHESTMODSEQ on every SELECT, RFC 7162 §3.1.2.1.)
        trace = "\n".join(tb.protocol_log(last=10 ** 6) for tb in profiles.values())
        assert "useCS=true" in trace and "useCS=false" not in trace, \
            "Thunderbird did not use CONDSTORE"


def server_errors_behind_thunderbirds_back(mail: MailServer, profiles: dict) -> list[str]:
    """Error replies in Thunderbird's protocol traces, and tracebacks in the server log. With
    CONDSTORE on, any NO counts too: every command Thunderbird sends there must succeed."""
    problems = []
    refused = r"(\d+|\*) (BAD|NO)\b" if mail.condstore else r"(\d+|\*) (BAD|NO \[SERVERBUG\])"
    for name, tb in profiles.items():
        sent: dict[tuple[str, str], str] = {}  # (connection, tag) -> command
        for line in tb.protocol_log(last=10 ** 6).splitlines():
            match = re.search(r"I/IMAP (\w+):[^:]*:[^:]*:(SendData|CreateNewLineFromSocket): (.*)",
                              line)
            if not match:
                continue
            connection, kind, text = match.groups()
            tag = text.split(" ")[0]
            if kind == "SendData":
                sent[(connection, tag)] = text
            elif re.match(refused, text):
                problems.append(f"{name}: {sent.get((connection, tag), '?')!r} -> {text!r}")
        # SMTP and POP3: any 4xx/5xx or -ERR reply to what Thunderbird sent.
        command = "?"
        for line in tb.console_trace(last=10 ** 6).splitlines():
            match = re.search(r'"([CS]): (.*)"$', line)
            if not match:
                continue
            if match.group(1) == "C":
                command = match.group(2)
            elif re.match(r"(-ERR|[45]\d\d[ -])", match.group(2)):
                problems.append(f"{name}: {command!r} -> {match.group(2)!r}")
    log = mail.log_text()
    if "Traceback" in log:
        start = log.index("Traceback")
        problems.append("server log:\n" + log[max(0, start - 300):start + 1500])
    return problems


def test_a_dialog_fails_the_step_with_its_text(mail, dialog_tb):
    """The harness itself: a wrong SMTP password makes Thunderbird show a blocking dialog; the
    step must fail with the dialog's text instead of hanging. (In its own profile: the 535
    replies here are on purpose.)"""
    alice_tb = dialog_tb
    alice_tb.run(r"""
const identity = theAccount().defaultIdentity;
MailServices.outgoingServer.getServerByIdentity(identity).password = 'not-the-password';
""")
    with pytest.raises(ThunderbirdError) as failure:
        alice_tb.send(BOB, "never sent", "x\r\n")
    # The failed login comes first; "Sending of the message failed" may follow after the step
    # already failed.
    # Thunderbird words a refused SMTP login in one of two dialogs, depending on timing
    # (mailServerLoginFailed2 or smtpAuthFailure); either must come through as text. It may
    # open the dialog only after its fallback to AUTH LOGIN was refused too, after the step
    # failed and later than drain_dialogs' quiet time: collect until it came, or the deadline.
    login_failed = f"Login to server {mail.hostname} with username {ALICE} failed"
    auth_failed = "Unable to authenticate to Outgoing server (SMTP)"

    def shown(text: str) -> bool:
        return login_failed in text or (auth_failed in text and mail.hostname in text)

    dialogs = str(failure.value)
    deadline = time.monotonic() + 30
    while not shown(dialogs) and time.monotonic() < deadline:
        dialogs += alice_tb.tb.drain_dialogs()
    assert shown(dialogs), dialogs
    # Thunderbird still answers once the dialogs of this failure ("Sending of the message
    # failed" may open after the ones collected above) are closed.
    deadline = time.monotonic() + 30
    while True:
        try:
            assert alice_tb.tb.run("return 'still answering';") == "still answering"
            break
        except ThunderbirdError as late:
            if not shown(str(late)) and "Sending of the message failed" not in str(late) \
                    or time.monotonic() > deadline:
                raise

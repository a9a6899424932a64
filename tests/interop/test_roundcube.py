"""Acceptance: Roundcube (Debian's package, Elastic skin) in headless Chromium against mailsuite.

Roundcube is a second real IMAP/SMTP client beside Thunderbird, and a very different one: a PHP
web application that opens a new IMAP connection (STARTTLS, AUTHENTICATE PLAIN) for every
request and relies on UID commands, SEARCH, STORE, MOVE, APPEND and BODYSTRUCTURE with sections.
It runs from a private lighttpd + php-cgi with its own config and SQLite database
(tests/roundcube.py; docs/design/testing.md, "Roundcube").

Each test drives the browser and checks the result server side, in the Maildir: the list, a
message with a PDF attachment, a forwarded-as-attachment message (message/rfc822), sending
through submission 587 (STARTTLS, AUTH) to a local user and the copy in Sent, quick search,
moving to a folder, flagging (the F in the file name), deleting to Trash and from Trash. After
the module: no tagged NO/BAD in Roundcube's IMAP trace, no IMAP/SMTP error in its errors.log, no
traceback in the server log. Set MAILSUITE_UPDATE_SCREENSHOT=1 to refresh
docs/roundcube-message-list.png.
"""
from __future__ import annotations

import email.policy
import imaplib
import os
import re
import shutil
import smtplib
import uuid
from email.message import EmailMessage

import pytest

from tests.environment import require_program, unavailable
from tests.harness import MailServer

pytestmark = [pytest.mark.external, pytest.mark.timeout(180)]

PASSWORD = "secret-pw-1"
ALICE = "alice@example.org"
BOB = "bob@example.org"
DANA = "dana@example.org"  # the screenshot's mailbox, with nothing else in it
FOLDER = "Projects"
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "docs")
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 24 + b"\n%%EOF\n"  # binary, so base64 in the mail


@pytest.fixture(scope="module", autouse=True)
def programs():
    """Before any fixture starts something: skip, or fail under CI."""
    for program, package in (("chromium", "chromium"), ("chromedriver", "chromium-driver"),
                             ("lighttpd", "lighttpd"), ("php-cgi", "php-cgi")):
        require_program(program, package)
    try:
        import selenium  # noqa: F401
    except ImportError:
        unavailable("the selenium package (PyPI, in .[test]) is not installed")


from tests.roundcube import RoundcubeUI, RoundcubeWeb, chromium  # noqa: E402


# -- fixtures: one server, one Roundcube, one browser logged in as Alice --------------------------

@pytest.fixture(scope="module")
def mail(tmp_path_factory):
    base = tmp_path_factory.mktemp("roundcube")
    server = MailServer(str(base / "server"), listeners=["imap", "mx", "submission"])
    server.start()
    try:
        for user in (ALICE, BOB, DANA):
            server.add_user(user, PASSWORD)
        # A folder of Alice's own for the move, made (and subscribed) before Roundcube lists her
        # folders; Roundcube makes Drafts, Sent, Junk and Trash itself (create_default_folders).
        with imap_session(server, ALICE) as imap:
            assert imap.create(FOLDER)[0] == "OK"
            assert imap.subscribe(FOLDER)[0] == "OK"
        server.base = str(base)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def web(mail):
    with RoundcubeWeb(os.path.join(mail.base, "web"), mail.ports["imap"],
                      mail.ports["submission"], mail.cafile, mail.hostname) as web:
        yield web
    # After every test of the module, in whatever order they ran: nothing went wrong underneath.
    problems = hidden_errors(mail, web)
    assert not problems, "\n".join(problems[:10])


@pytest.fixture(scope="module")
def ui(mail, web):
    driver = chromium(os.path.join(mail.base, "chromium-alice"))
    try:
        ui = RoundcubeUI(driver, web)
        ui.login(ALICE, PASSWORD)
        yield ui
    finally:
        driver.quit()


# -- helpers --------------------------------------------------------------------------------------

def imap_session(server: MailServer, user: str) -> imaplib.IMAP4:
    imap = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
    imap.starttls(server.ssl_context())
    imap.login(user, PASSWORD)
    return imap


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def plain_message(subject: str, to: str = ALICE, sender: str = "Carol <carol@remote.test>",
                  body: str = "Hello from the test.\n",
                  date: str = "Sat, 28 Nov 2026 01:00:00 +0000") -> EmailMessage:
    m = EmailMessage()
    m["From"] = sender
    m["To"] = to
    m["Subject"] = subject
    m["Date"] = date
    m["Message-ID"] = f"<{uuid.uuid4().hex}@remote.test>"
    m.set_content(body)
    return m


def with_pdf(subject: str, to: str = ALICE, **headers: str) -> EmailMessage:
    m = plain_message(subject, to, body="Please find the report attached.\n", **headers)
    m.add_attachment(PDF, maintype="application", subtype="pdf", filename="report-q3.pdf")
    return m


def forwarded(subject: str, inner_subject: str, to: str = ALICE, **headers: str) -> EmailMessage:
    """A message forwarded as an attachment: the original as a message/rfc822 part."""
    inner = plain_message(inner_subject, "carol@remote.test", "Dave <dave@remote.test>",
                          "Notes from the meeting.\n", "Fri, 27 Nov 2026 09:30:00 +0000")
    m = plain_message(subject, to, body="Forwarding the notes as an attachment.\n", **headers)
    m.add_attachment(inner)
    return m


def deliver(server: MailServer, *messages: EmailMessage) -> None:
    """Through the MX port, as mail from outside arrives; waits until each is in a Maildir."""
    for m in messages:
        to = str(m["To"])
        before = len(server.messages(to))
        with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as client:
            client.sendmail("carol@remote.test", [to], m.as_bytes(policy=email.policy.SMTP))
        found = server.wait_for_messages(to, before + 1)
        assert len(found) > before, f"{m['Subject']!r} did not arrive:\n{server.log_text()[-3000:]}"


def stored(server: MailServer, user: str, folder: str, subject: str) -> list[str]:
    """Maildir paths (in `folder`, "" for INBOX) of the messages whose Subject is `subject`."""
    found = []
    for path in server.messages(user, folder):
        try:
            with open(path, "rb") as f:
                head = f.read(64 * 1024).split(b"\r\n\r\n")[0].split(b"\n\n")[0]
        except FileNotFoundError:
            continue  # renamed (new/ -> cur/, flags) while we looked
        if re.search(rb"^Subject: " + re.escape(subject.encode()) + rb"\r?$", head, re.M):
            found.append(path)
    return found


def wait_stored(ui: RoundcubeUI, server: MailServer, user: str, folder: str, subject: str,
                flags: str | None = None) -> str:
    """Poll until exactly one message `subject` is in `folder` (with Maildir `flags` among its
    flags if given); its path."""
    def there(_):
        paths = stored(server, user, folder, subject)
        if len(paths) != 1:
            return None
        info = paths[0].rpartition(":2,")[2] if ":2," in paths[0] else ""
        return paths[0] if flags is None or set(flags) <= set(info) else None

    return ui.wait(there, f"{subject!r} in {user}'s {folder or 'INBOX'}"
                          + (f" with flags {flags}" if flags else ""))


def hidden_errors(server: MailServer, web: RoundcubeWeb) -> list[str]:
    """Tagged NO/BAD replies in Roundcube's IMAP trace (with the command that got them), IMAP
    or SMTP errors Roundcube logged, and tracebacks in the server log."""
    problems = []
    sent: dict[tuple[str, str], str] = {}  # (connection, tag) -> command
    for line in web.log("imap.log").splitlines():
        match = re.search(r"\[([0-9A-F]+)\] ([CS]): (.*)", line)
        if not match:
            continue
        connection, side, text = match.groups()
        tag = text.split(" ")[0]
        if side == "C":
            sent[(connection, tag)] = text
        elif re.match(r"([A-Z]\d+ (NO|BAD)|\* BAD)\b", text):
            problems.append(f"IMAP {sent.get((connection, tag), '?')!r} -> {text!r}")
    for line in web.log("errors.log").splitlines():
        if re.search(r"(IMAP|SMTP) Error|PHP (Fatal|Warning)", line):
            problems.append(f"Roundcube errors.log: {line}")
    log = server.log_text()
    if "Traceback" in log:
        start = log.index("Traceback")
        problems.append("server log:\n" + log[max(0, start - 300):start + 1500])
    return problems


# -- the tests ------------------------------------------------------------------------------------

def test_list_shows_delivered_messages(mail, ui):
    subjects = [unique("Listed one"), unique("Listed two")]
    deliver(mail, *(plain_message(s) for s in subjects))
    ui.open_folder("INBOX", expect=subjects[1])
    assert set(subjects) <= set(ui.subjects())
    # Unread on the server, unread in the list.
    for subject in subjects:
        assert "unread" in ui.row(subject).get_attribute("class")


def test_open_message_with_pdf_attachment(mail, ui):
    subject = unique("Quarterly report")
    deliver(mail, with_pdf(subject))
    ui.open_folder("INBOX", expect=subject)
    ui.preview(subject)
    try:
        attachments = [li.text for li in ui.visible("#attachment-list li")]
        assert any(a.startswith("report-q3.pdf") for a in attachments), attachments
        assert "Please find the report attached." in ui.css("#messagebody").text
        # The PDF itself, as Roundcube downloads it (BODY.PEEK[2] over IMAP, base64 decoded).
        link = ui.css("#attachment-list li a.filename").get_attribute("href")
    finally:
        ui.driver.switch_to.default_content()
    assert fetch_with_session(ui, link + "&_download=1") == PDF
    # Opening it marked it \Seen: S in the Maildir name.
    wait_stored(ui, mail, ALICE, "", subject, flags="S")


def fetch_with_session(ui: RoundcubeUI, url: str) -> bytes:
    """GET `url` inside the page (Roundcube's session cookie), the body as bytes."""
    data = ui.driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(arguments[0], {credentials: 'same-origin'})
            .then(r => r.arrayBuffer())
            .then(b => done(Array.from(new Uint8Array(b))))
            .catch(e => done('error: ' + e));
    """, url)
    assert isinstance(data, list), data
    return bytes(data)


def test_open_forwarded_message(mail, ui):
    subject, inner = unique("Fwd: meeting notes"), unique("Original meeting notes")
    deliver(mail, forwarded(subject, inner))
    ui.open_folder("INBOX", expect=subject)
    ui.preview(subject)
    try:
        # The attached message is listed as an attachment and shown inline with its headers.
        attachments = [li.get_attribute("class") for li in ui.visible("#attachment-list li")]
        assert any("rfc822" in a for a in attachments), attachments
        headers = ui.visible(".message-partheaders .header.subject")
        assert [h.text for h in headers] == [inner]
        body = ui.css("#messagebody").text
        assert "Forwarding the notes as an attachment." in body
        assert "Notes from the meeting." in body
    finally:
        ui.driver.switch_to.default_content()


def test_send_through_submission(mail, ui):
    subject = unique("Hello Bob from Roundcube")
    ui.wait(lambda d: ui.list_ready(), "Roundcube idle before Compose")
    ui.click("#taskmenu a.compose", "the Compose button")
    ui.wait(lambda d: ui.visible("#compose-subject"), "the compose form")
    ui.visible(".recipient-input input")[0].send_keys(BOB + ",")
    ui.css("#compose-subject").send_keys(subject)
    ui.css("#composebody").send_keys("Sent through submission with STARTTLS and AUTH.\n")
    ui.click("#layout-content button.send, button.btn.send", "the Send button")
    # Roundcube goes back to the list once the SMTP transaction and the APPEND to Sent are done.
    ui.wait(lambda d: "_action=compose" not in d.current_url and ui.in_mail_list(),
            "the list after sending")
    path = wait_stored(ui, mail, BOB, "", subject)
    with open(path, "rb") as f:
        received = f.read()
    assert b"From: alice@example.org" in received
    assert b"Sent through submission with STARTTLS and AUTH." in received
    # Submission took it from an authenticated Alice over TLS (our trace header).
    assert re.search(rb"with ESMTPSA", received), received[:1500]
    wait_stored(ui, mail, ALICE, "Sent", subject, flags="S")


def test_quick_search_by_subject(mail, ui):
    needle = uuid.uuid4().hex[:10]
    found, other = f"Invoice {needle}", unique("Unrelated newsletter")
    deliver(mail, plain_message(found), plain_message(other))
    ui.open_folder("INBOX", expect=other)
    ui.search(needle)
    ui.wait(lambda d: ui.list_ready() and ui.subjects() == [found],
            f"only {found!r} in the list after searching")
    ui.click(".searchbar a.reset", "the reset search button")
    ui.wait(lambda d: ui.list_ready() and other in ui.subjects(), "the full list again")


def test_move_to_folder(mail, ui):
    subject = unique("Move me to Projects")
    deliver(mail, plain_message(subject))
    ui.open_folder("INBOX", expect=subject)
    ui.select(subject)
    ui.menu_item("more", "message-menu", "move", "Move to... in the More menu")

    def target(d):
        for a in ui.visible("#folder-selector li a"):
            if a.text == FOLDER:
                return a
        return None

    ui.wait(target, f"{FOLDER} in the folder selector").click()
    ui.wait(lambda d: subject not in ui.subjects(), f"{subject!r} gone from the INBOX list")
    wait_stored(ui, mail, ALICE, FOLDER, subject)
    assert stored(mail, ALICE, "", subject) == []
    ui.open_folder(FOLDER, expect=subject)


def test_flag(mail, ui):
    subject = unique("Flag me")
    deliver(mail, plain_message(subject))
    ui.open_folder("INBOX", expect=subject)
    ui.select(subject)
    ui.menu_item("markmessage", "markmessage-menu", "flag", "As flagged in the Mark menu")
    ui.wait(lambda d: "flagged" in ui.row(subject).get_attribute("class"), "the flagged row")
    wait_stored(ui, mail, ALICE, "", subject, flags="F")
    # And back: the F goes away.
    ui.select(subject)
    ui.menu_item("markmessage", "markmessage-menu", "unflag", "As unflagged in the Mark menu")
    ui.wait(lambda _: "F" not in wait_stored(ui, mail, ALICE, "", subject).rpartition(":2,")[2],
            "the F flag gone from the Maildir name")


def test_delete_to_trash_then_for_good(mail, ui):
    subject = unique("Delete me")
    deliver(mail, plain_message(subject))
    ui.open_folder("INBOX", expect=subject)
    ui.select(subject)
    ui.click("#toolbar-menu a.delete", "the Delete button")
    ui.wait(lambda d: subject not in ui.subjects(), f"{subject!r} gone from the INBOX list")
    # Roundcube's default (flag_for_deletion off, a Trash folder): UID MOVE to Trash.
    wait_stored(ui, mail, ALICE, "Trash", subject)
    assert stored(mail, ALICE, "", subject) == []
    # In Trash, Delete removes for good: \Deleted and UID EXPUNGE.
    ui.open_folder("Trash", expect=subject)
    ui.select(subject)
    ui.click("#toolbar-menu a.delete", "the Delete button in Trash")
    ui.wait(lambda d: subject not in ui.subjects(), f"{subject!r} gone from the Trash list")
    ui.wait(lambda _: not stored(mail, ALICE, "Trash", subject), f"{subject!r} expunged")


def test_message_list_screenshot(mail, web, tmp_path):
    """Dana's INBOX, in a browser of its own, so the picture never shows other tests' mail."""
    deliver(mail,
            plain_message("Welcome to mailsuite", DANA,
                          body="This came in through the MX port; Roundcube reads it over IMAP.\n",
                          date="Fri, 27 Nov 2026 08:15:00 +0000"),
            with_pdf("Quarterly report attached", DANA, date="Sat, 28 Nov 2026 10:42:00 +0000"),
            forwarded("Fwd: Original meeting notes", "Original meeting notes", DANA,
                      date="Sat, 28 Nov 2026 11:05:00 +0000"))
    driver = chromium(str(tmp_path / "chromium-dana"))
    try:
        from selenium.webdriver.common.action_chains import ActionChains

        ui = RoundcubeUI(driver, web)
        ui.login(DANA, PASSWORD)
        ui.open_folder("INBOX", expect="Welcome to mailsuite")
        ui.preview("Fwd: Original meeting notes")
        driver.switch_to.default_content()
        # The pointer off the list, so no row shows its hover state in the picture.
        ActionChains(driver).move_to_element(ui.css("#messagecontframe")).perform()
        ui.wait(lambda d: ui.list_ready(), "Roundcube idle")
        assert {"Welcome to mailsuite", "Quarterly report attached",
                "Fwd: Original meeting notes"} <= set(ui.subjects())
        path = str(tmp_path / "roundcube-message-list.png")
        assert driver.save_screenshot(path)
    finally:
        driver.quit()
    with open(path, "rb") as f:
        png = f.read()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    if os.environ.get("MAILSUITE_UPDATE_SCREENSHOT"):
        os.makedirs(DOCS, exist_ok=True)
        shutil.copyfile(path, os.path.join(DOCS, "roundcube-message-list.png"))


def test_threads_view(mail, ui):
    """List mode "Threads": Roundcube asks the server (UID THREAD REFERENCES, RFC 5256) and
    shows a reply under its parent. Roundcube offers threads only when the server advertises
    THREAD=REFERENCES."""
    with imap_session(mail, ALICE) as imap:
        if b"THREAD=REFERENCES" not in imap.capability()[1][0].split():
            pytest.skip("the server does not advertise THREAD=REFERENCES")
    subject = unique("Thread root")
    root = plain_message(subject, date="Sat, 28 Nov 2026 01:00:00 +0000")
    reply = plain_message("Re: " + subject, date="Sat, 28 Nov 2026 02:00:00 +0000")
    reply["In-Reply-To"] = reply["References"] = root["Message-ID"]
    deliver(mail, root, reply)
    ui.open_folder("INBOX", expect=subject)
    set_list_mode(ui, "threads")
    try:
        def parents(d):
            if not (ui.list_ready() and d.execute_script("return rcmail.env.threading;")):
                return None
            rows = d.execute_script(
                "const r = rcmail.message_list.rows; return Object.keys(r).map(k =>"
                " [k, String(r[k].parent_uid || ''), r[k].obj.querySelector('span.subject a')"
                ".textContent]);")
            uids = {text: uid for uid, _, text in rows}
            return {text: parent for _, parent, text in rows} if "Re: " + subject in uids \
                and subject in uids else None

        found = ui.wait(parents, "the thread in the list")
        with imap_session(mail, ALICE) as imap:
            imap.select("INBOX", readonly=True)
            root_uid = imap.uid("SEARCH", "HEADER", "Message-ID", root["Message-ID"])[1][0]
        assert found[subject] == ""
        assert found["Re: " + subject] == root_uid.decode()
        # The root row is a collapsed thread: the reply is not shown until expanded.
        assert "thread" in ui.row(subject).get_attribute("class")
        assert "Re: " + subject not in ui.subjects()
    finally:
        set_list_mode(ui, "list")


def set_list_mode(ui: RoundcubeUI, mode: str) -> None:
    """The list options dialog (Options above the list): list mode "list" or "threads"."""
    from selenium.webdriver.support.ui import Select

    ui.click("#layout-list a.options", "the list Options button")
    select = ui.wait(lambda d: ui.visible("#listoptions-threads-clone"), "the list options")[0]
    Select(select).select_by_value(mode)
    ui.wait(lambda d: ui.visible(".ui-dialog button.save"), "the Save button")[0].click()
    ui.wait(lambda d: ui.list_ready() and not ui.visible(".ui-dialog")
            and d.execute_script("return !!rcmail.env.threading;") == (mode == "threads"),
            f"the list in {mode} mode")

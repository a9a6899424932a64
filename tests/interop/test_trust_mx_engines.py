"""The MX listener with the real engines behind it (docs/design/trust-engines.md): rspamd refuses
or files GTUBE by configuration, clamd refuses EICAR before the 250, an engine that stops
mid-run gives a temporary failure and the message arrives once the client retries. Also a
message signed by OpenDKIM (opendkim-testmsg, Debian's opendkim-tools) verifies here.

Debian packages: rspamd, clamav-daemon, opendkim-tools."""
from __future__ import annotations

import smtplib
import subprocess
from email.message import EmailMessage

import pytest

from tests.daemons import EICAR, EICAR_FOUND, GTUBE, ClamdDaemon
from tests.dnsserver import DNSServer
from tests.harness import MailServer
from tests.trustkit import auth_results, message, result_of

pytestmark = pytest.mark.external

RCPT = "alice@example.org"
HAM = ("Hi Alice,\r\n\r\nare we still on for lunch tomorrow at noon? The usual place.\r\n\r\n"
       "Bob\r\n")


def mx(make_server, rspamd=None, clamd=None, **rspamd_settings) -> MailServer:
    extra: dict = {}
    if rspamd is not None:
        extra["rspamd"] = {"url": rspamd.url, "timeout": 10.0, **rspamd_settings}
    if clamd is not None:
        extra["clamd"] = {"socket": clamd.socket, "timeout": 10.0}
    server = make_server(extra=extra)
    server.add_user(RCPT)
    return server


def send(server: MailServer, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=60) as s:
        s.sendmail("bob@sender.test", [RCPT], data)


def with_attachment(payload: bytes) -> bytes:
    msg = EmailMessage()
    msg["From"] = "bob@sender.test"
    msg["To"] = RCPT
    msg["Subject"] = "the file"
    msg.set_content("Here it is.\n")
    msg.add_attachment(payload, maintype="application", subtype="octet-stream",
                       filename="file.com")
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def stored(server: MailServer, folder: str = "") -> bytes:
    [path] = server.wait_for_messages(RCPT, folder=folder, timeout=30)
    with open(path, "rb") as f:
        return f.read()


def test_gtube_is_refused_and_ham_is_scored(make_server, rspamd, clamd):
    server = mx(make_server, rspamd, clamd)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(server, message("bob@sender.test", RCPT, body=GTUBE.decode() + "\r\n"))
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error.startswith(b"5.7.1")
    send(server, message("bob@sender.test", RCPT, body=HAM))
    data = stored(server)
    assert b"\r\nX-Spam-Score: " in b"\r\n" + data
    assert b"X-Spam-Status: No" in data


def test_gtube_can_be_filed_to_junk_instead(make_server, rspamd):
    server = mx(make_server, rspamd, reject_action="junk")
    send(server, message("bob@sender.test", RCPT, body=GTUBE.decode() + "\r\n"))
    data = stored(server, folder="Junk")
    assert b"X-Spam-Status: Yes" in data
    assert server.messages(RCPT) == []


def test_eicar_is_refused_with_its_signature(make_server, clamd):
    server = mx(make_server, clamd=clamd)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(server, with_attachment(EICAR))
    assert refused.value.smtp_code == 554
    assert refused.value.smtp_error == f"5.7.0 message refused: {EICAR_FOUND}".encode()
    assert server.messages(RCPT) == []


def test_engine_stopped_mid_run_tempfails_and_the_retry_arrives(make_server, tmp_path):
    daemon = ClamdDaemon(str(tmp_path / "clamd-mid")).start()
    try:
        server = mx(make_server, clamd=daemon)
        send(server, message("bob@sender.test", RCPT, subject="first", body=HAM))
        daemon.stop()
        data = message("bob@sender.test", RCPT, subject="second", body=HAM)
        with pytest.raises(smtplib.SMTPDataError) as refused:
            send(server, data)
        assert refused.value.smtp_code == 451
        assert refused.value.smtp_error.startswith(b"4.7.1")
        assert "clamd" in server.log_text().lower()
        daemon.start()
        send(server, data)  # what an MTA does after a 451: the same message again
        server.wait_for_messages(RCPT, count=2, timeout=30)
    finally:
        daemon.stop()


def test_a_message_signed_by_opendkim_verifies(make_server, require_program, tmp_path):
    genkey = require_program("opendkim-genkey", "opendkim-tools")
    testmsg = require_program("opendkim-testmsg", "opendkim-tools")
    subprocess.run([genkey, "-b", "1024", "-d", "odkim.test", "-s", "od", "-D", str(tmp_path)],
                   check=True, capture_output=True)
    record = open(tmp_path / "od.txt").read()
    # od._domainkey IN TXT ( "v=DKIM1; h=sha256; k=rsa; " "p=..." ) ; ----- comment
    value = "".join(part for part in record.split('"')[1::2])
    zones = {"odkim.test": [("od._domainkey.odkim.test", "TXT", value)]}
    with DNSServer(zones) as dns:
        server = make_server(extra={"courier": {"nameservers": [dns.nameserver]}})
        server.add_user(RCPT)
        unsigned = message("carol@odkim.test", RCPT, body=HAM)
        signed = subprocess.run([testmsg, "-C", "-d", "odkim.test", "-s", "od", "-k",
                                 str(tmp_path / "od.private")], input=unsigned,
                                capture_output=True, check=True).stdout
        assert signed.startswith(b"DKIM-Signature:")
        signed = signed.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        send(server, signed)
        [ours] = auth_results(stored(server), server.hostname)
        assert result_of(ours, "dkim") == ["pass"]

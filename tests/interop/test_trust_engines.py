"""Our content scanners against the real engines: private rspamd and clamd instances
(tests/daemons.py) on loopback, each scan run by the real reactor in a child process
(tests/engineprobe.py). See docs/design/trust-engines.md, "Tests".

Debian packages: rspamd, clamav-daemon (clamd). No network: rspamd runs with network modules
off, clamd with a one-signature database the test writes (EICAR)."""
from __future__ import annotations

import os
import signal
from email.message import EmailMessage

import pytest

from tests.daemons import EICAR, EICAR_FOUND, GTUBE, ClamdDaemon, RspamdDaemon
from tests.engineprobe import probe

pytestmark = pytest.mark.external


def write_message(path, body: str | bytes, attachment: bytes | None = None,
                  subject: str = "Lunch tomorrow") -> str:
    msg = EmailMessage()
    msg["From"] = "Sender <sender@example.com>"
    msg["To"] = "Recipient <rcpt@example.org>"
    msg["Subject"] = subject
    msg["Message-ID"] = "<probe.1@example.com>"
    msg["Date"] = "Mon, 01 Jan 2024 10:00:00 +0000"
    msg.set_content(body.decode() if isinstance(body, bytes) else body)
    if attachment is not None:
        msg.add_attachment(attachment, maintype="application", subtype="octet-stream",
                           filename="file.com")
    data = msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


HAM = "Hi Bob,\n\nare we still on for lunch tomorrow at noon? The usual place.\n\nAlice\n"


# -- rspamd -----------------------------------------------------------------------------------
def test_rspamd_gtube_is_rejected(rspamd, tmp_path):
    path = write_message(tmp_path / "gtube.eml", b"Buy now\n" + GTUBE + b"\n")
    v = probe("rspamd", {"url": rspamd.url}, path)
    assert v["disposition"] == "reject", v
    assert v["reply"] == {"code": 550, "enhanced": "5.7.1", "text": "message refused as spam",
                          "reason": "spam"}


def test_rspamd_gtube_junk_when_configured(rspamd, tmp_path):
    path = write_message(tmp_path / "gtube.eml", b"Buy now\n" + GTUBE + b"\n")
    v = probe("rspamd", {"url": rspamd.url, "reject_action": "junk"}, path)
    assert v["disposition"] == "junk", v
    assert any(h.startswith("X-Spam-Status: Yes, score=") for h in v["headers"])


def test_rspamd_normal_message_is_accepted_with_score(rspamd, tmp_path):
    path = write_message(tmp_path / "ham.eml", HAM)
    v = probe("rspamd", {"url": rspamd.url}, path)
    assert v["disposition"] == "accept", v
    assert any(h.startswith("X-Spam-Status: No, score=") for h in v["headers"]), v
    assert any(h.startswith("X-Spam-Score: ") for h in v["headers"]), v


def test_rspamd_takes_null_sender_and_authenticated_user(rspamd, tmp_path):
    path = write_message(tmp_path / "ham.eml", HAM)
    envelope = {"mail_from": "", "auth_user": "alice@example.org", "listener": "submission",
                "recipients": ["a@example.org", "b@example.net"]}
    v = probe("rspamd", {"url": rspamd.url, "scan_submission": True}, path, envelope=envelope)
    assert v["disposition"] == "accept", v
    assert any(h.startswith("X-Spam-Score: ") for h in v["headers"]), v


def test_rspamd_too_large_is_not_sent(rspamd, tmp_path):
    path = write_message(tmp_path / "gtube.eml", b"Buy now\n" + GTUBE + b"\n")
    v = probe("rspamd", {"url": rspamd.url, "max_size": 100}, path)
    assert v["disposition"] == "accept"
    assert v["headers"] == ["X-Spam-Status: Unknown, message too large to scan"]


def test_rspamd_stopped_mid_run(tmp_path):
    path = write_message(tmp_path / "ham.eml", HAM)
    daemon = RspamdDaemon(str(tmp_path / "rspamd"))
    with daemon:
        assert probe("rspamd", {"url": daemon.url}, path)["disposition"] == "accept"
    v = probe("rspamd", {"url": daemon.url}, path)
    assert v["disposition"] == "tempfail", v
    assert v["reply"] == {"code": 451, "enhanced": "4.7.1",
                          "text": "content scanner unavailable, try again later",
                          "reason": "scanner_unavailable"}
    v = probe("rspamd", {"url": daemon.url, "on_failure": "accept"}, path)
    assert v["disposition"] == "accept", v
    assert v["headers"] == ["X-Spam-Status: Unknown, scanner unavailable"]


def test_rspamd_hanging_times_out(tmp_path):
    path = write_message(tmp_path / "ham.eml", HAM)
    with RspamdDaemon(str(tmp_path / "rspamd")) as daemon:
        daemon.signal(signal.SIGSTOP)  # accepts connections (the kernel does), never answers
        v = probe("rspamd", {"url": daemon.url, "timeout": 1.0}, path)
    assert v["disposition"] == "tempfail", v
    assert "timeout" in v["log"], v


# -- clamd ------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["unix", "tcp"])
def test_clamd_eicar_attachment_is_rejected(clamd, tmp_path, where):
    path = write_message(tmp_path / "virus.eml", "see attached\n", attachment=EICAR)
    with open(path, "rb") as f:
        assert EICAR not in f.read()  # only the decoded attachment holds it
    socket = clamd.socket if where == "unix" else clamd.tcp
    v = probe("clamd", {"socket": socket}, path)
    assert v["disposition"] == "reject", v
    assert v["reply"] == {"code": 554, "enhanced": "5.7.0",
                          "text": f"message refused: {EICAR_FOUND}", "reason": "virus"}


def test_clamd_clean_message_is_accepted(clamd, tmp_path):
    path = write_message(tmp_path / "ham.eml", HAM, attachment=os.urandom(300 * 1024))
    v = probe("clamd", {"socket": clamd.socket}, path)
    assert v["disposition"] == "accept", v
    assert v["headers"] == [] and v["reply"] is None


def test_clamd_stream_limit_is_a_failure(tmp_path):
    path = write_message(tmp_path / "big.eml", HAM, attachment=os.urandom(3 * 1024 * 1024))
    with ClamdDaemon(str(tmp_path / "clamd"), stream_max="1M") as daemon:
        v = probe("clamd", {"socket": daemon.socket}, path)
        assert v["disposition"] == "tempfail", v
        v = probe("clamd", {"socket": daemon.socket, "on_failure": "accept"}, path)
    assert v["disposition"] == "accept", v
    assert v["headers"] == ["X-Virus-Scanned: unscanned (size limit exceeded)"], v


def test_clamd_stopped_mid_run(tmp_path):
    path = write_message(tmp_path / "virus.eml", "see attached\n", attachment=EICAR)
    daemon = ClamdDaemon(str(tmp_path / "clamd"))
    with daemon:
        assert probe("clamd", {"socket": daemon.tcp}, path)["disposition"] == "reject"
    for socket in (daemon.tcp, daemon.socket):
        v = probe("clamd", {"socket": socket}, path)
        assert v["disposition"] == "tempfail", v
        assert v["reply"] == {"code": 451, "enhanced": "4.7.1",
                              "text": "virus scanner unavailable, try again later",
                              "reason": "scanner_unavailable"}
    v = probe("clamd", {"socket": daemon.tcp, "on_failure": "accept"}, path)
    assert v["disposition"] == "accept", v
    assert v["headers"] == ["X-Virus-Scanned: unscanned (connection failed)"]


def test_clamd_hanging_times_out(tmp_path):
    path = write_message(tmp_path / "ham.eml", HAM)
    with ClamdDaemon(str(tmp_path / "clamd")) as daemon:
        daemon.signal(signal.SIGSTOP)
        v = probe("clamd", {"socket": daemon.tcp, "timeout": 1.0}, path)
    assert v["disposition"] == "tempfail", v
    assert "no answer within" in v["log"], v

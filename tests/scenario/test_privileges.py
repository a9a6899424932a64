"""README's production start: as root, dropping privileges with `twistd --uid/--gid`."""
from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import ssl
import tempfile

import pytest

from mailsuite.tls import create_self_signed
from tests.environment import unavailable
from tests.harness import HOST, MailServer
from tests.polling import wait_until



@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        unavailable("starting as root and dropping privileges needs root")


@pytest.fixture
def world_traversable_dir():
    # pytest's tmp_path lives under a 0700 root directory that the dropped user cannot enter.
    path = tempfile.mkdtemp(prefix="mailsuite-priv-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_root_start_drops_to_data_dir_owner(world_traversable_dir):
    nobody = pwd.getpwnam("nobody")
    base = world_traversable_dir
    # A certificate the way Let's Encrypt leaves it: a root-only key outside data_dir.
    keys = os.path.join(base, "letsencrypt")
    os.mkdir(keys, 0o700)
    create_self_signed("mx.test.example", os.path.join(keys, "cert.pem"),
                       os.path.join(keys, "key.pem"))
    data_dir = os.path.join(base, "data")
    os.mkdir(data_dir, 0o700)
    os.chown(data_dir, nobody.pw_uid, nobody.pw_gid)

    server = MailServer(base, listeners=["mx", "submission", "imap"],
                        extra={"tls": {"cert": os.path.join(keys, "cert.pem"),
                                       "key": os.path.join(keys, "key.pem")}})
    try:
        server.start(twistd_args=[f"--uid={nobody.pw_uid}", f"--gid={nobody.pw_gid}"])
        def uids() -> set[str]:
            with open(f"/proc/{server.process.pid}/status") as f:
                return set(next(line for line in f if line.startswith("Uid:")).split()[1:])

        # The ports listen (and the kernel accepts) while still root: twistd drops privileges
        # just after, before its reactor runs. Real, effective and saved uid: all dropped.
        wait_until(lambda: uids() == {str(nobody.pw_uid)}, timeout=10,
                   message=f"the server's uids to drop to {nobody.pw_uid}")

        server.add_user("alice@example.org")  # the admin CLI as root, as an operator would
        for sub in ("mail", "queue"):
            assert os.stat(os.path.join(data_dir, sub)).st_uid == nobody.pw_uid

        # STARTTLS needs the root-only key after the drop; the queue and Maildir need the
        # directories start-up created while still root.
        ctx = ssl.create_default_context(cafile=os.path.join(keys, "cert.pem"))
        ctx.check_hostname = False  # 127.0.0.1; the chain is still verified
        with smtplib.SMTP(HOST, server.ports["mx"], timeout=30) as client:
            client.starttls(context=ctx)
            client.sendmail("someone@elsewhere.test", ["alice@example.org"],
                            b"Subject: after the privilege drop\r\n\r\nhello\r\n")
        (message,) = server.wait_for_messages("alice@example.org")
        assert os.stat(message).st_uid == nobody.pw_uid
        log = server.log_text()
        assert "Traceback" not in log, log
    finally:
        server.stop()

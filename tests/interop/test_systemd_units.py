"""The systemd units in etc/systemd/ are valid for systemd itself, not only to the eye.

`systemd-analyze verify` loads a unit as the manager would (no systemd as PID 1 needed) and
checks that ExecStart's program exists, so the units are copied to a temporary directory with
ExecStart pointing at this machine's twistd. verify exits 0 on most parse problems (it only
says "ignoring"), so anything it prints counts as a failure; deliberately broken copies prove
the check fails. The ExecStart command line itself (twistd options verify does not read) is run
and must serve mail.
"""
from __future__ import annotations

import os
import shlex
import signal
import smtplib
import subprocess

import pytest

from tests.environment import require_program
from tests.harness import HOST, REPO_ROOT, MailServer, subprocess_env, twistd_command
from tests.polling import wait_until

pytestmark = pytest.mark.external

UNITS = os.path.join(REPO_ROOT, "etc", "systemd")
TEMPLATE = "mailsuite@.service"
INSTANCE = "mailsuite@a.service"
SHIPPED_TWISTD = "/opt/mailsuite/bin/twistd"
# systemd-analyze security's overall exposure, in tenths (its --threshold unit): 2.0 is "OK".
MAX_EXPOSURE = 20


@pytest.fixture(scope="module", autouse=True)
def _systemd_analyze() -> None:
    require_program("systemd-analyze", "systemd")


def unit_text(name: str) -> str:
    with open(os.path.join(UNITS, name)) as f:
        return f.read()


def settings(text: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (a key may repeat), comments left out."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def local_copy(directory, edit=lambda text: text) -> str:
    """The units in `directory`, ExecStart on this machine's twistd, then `edit` applied to the
    template. Returns the directory."""
    twistd = twistd_command()
    assert len(twistd) == 1, "verify needs a twistd executable: " + " ".join(twistd)
    for name in os.listdir(UNITS):
        text = unit_text(name)
        if name == TEMPLATE:
            assert SHIPPED_TWISTD in text
            text = edit(text.replace(SHIPPED_TWISTD, twistd[0]))
        (directory / name).write_text(text)
    return str(directory)


def verify(directory: str) -> subprocess.CompletedProcess:
    # Relative to cwd: verify takes unit files by path; their directory joins the search path,
    # so the template is found for the instance name and PartOf=mailsuite.target resolves.
    return subprocess.run(["systemd-analyze", "verify", f"./{INSTANCE}", "./mailsuite.target"],
                          cwd=directory, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, SYSTEMD_LOG_LEVEL="notice"))


def test_units_pass_systemd_analyze_verify(tmp_path):
    result = verify(local_copy(tmp_path))
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("broken", [
    ("Type=simple", "Type=simpel"),                       # a bad value: verify says "ignoring"
    ("NoNewPrivileges=yes", "NoNewPrivilege=yes"),       # an unknown key: "ignoring" too
    ("ReadWritePaths=/var/lib/mailsuite", "ReadWritePaths=var/lib/mailsuite"),
    ("ExecStart=/", "ExecStart=/nonexistent/"),           # a missing program
], ids=["bad-value", "unknown-key", "relative-path", "missing-program"])
def test_verify_catches_a_broken_unit(tmp_path, broken):
    old, new = broken
    directory = local_copy(tmp_path, lambda text: text.replace(old, new, 1))
    result = verify(directory)
    assert result.returncode != 0 or (result.stdout + result.stderr).strip(), \
        f"verify did not notice {new!r}"


def test_template_confines_the_server(tmp_path):
    """What issue 13 asks of the unit, and systemd's own exposure score of the result."""
    values = settings(unit_text(TEMPLATE))
    assert values["Type"] == ["simple"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes",
                       "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
                       "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
                       "Restart": "on-failure"}.items():
        assert values.get(key) == [value], key
    assert values["User"] != ["root"] and values["User"]
    assert "/var/lib/mailsuite" in values["ReadWritePaths"]
    for key in ("RestrictAddressFamilies", "LimitNOFILE"):
        assert values.get(key), key
    # Privileges are never dropped by twistd: there are none to drop.
    assert "--uid" not in values["ExecStart"][0] and "--gid" not in values["ExecStart"][0]
    directory = local_copy(tmp_path)
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes",
                             f"--threshold={MAX_EXPOSURE}", f"./{INSTANCE}"],
                            cwd=directory, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_execstart_command_line_serves_mail(tmp_path):
    """The unit's ExecStart as written (twistd's options are not verify's business), with the
    instance's configuration: it starts, listens, delivers and logs to stdout (the journal)."""
    server = MailServer(str(tmp_path), listeners=["mx"])
    server.add_user("alice@example.org")
    [execstart] = settings(unit_text(TEMPLATE))["ExecStart"]
    argv = [twistd_command()[0] if word == SHIPPED_TWISTD else word
            for word in shlex.split(execstart.replace("/etc/mailsuite/%i.toml",
                                                      server.config_path))]
    process = subprocess.Popen(argv, cwd=str(tmp_path), env=subprocess_env(PYTHONUNBUFFERED="1"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        def listening() -> bool:
            assert process.poll() is None, process.stdout.read().decode(errors="replace")
            try:
                smtplib.SMTP(HOST, server.ports["mx"], timeout=5).quit()
                return True
            except OSError:
                return False

        wait_until(listening, timeout=30, interval=0.1, message="the MX listener")
        with smtplib.SMTP(HOST, server.ports["mx"], timeout=30) as client:
            client.sendmail("someone@elsewhere.test", ["alice@example.org"],
                            b"Subject: started as systemd would\r\n\r\nhello\r\n")
        assert server.wait_for_messages("alice@example.org")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        out = process.communicate(timeout=30)[0].decode(errors="replace")
    assert "status=sent" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert not os.path.exists(os.path.join(str(tmp_path), "twistd.pid"))

"""Starting `twistd mailsuite`: embedded defaults, and one clear line for every bad configuration."""
from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest

from tests.harness import HOST, MailServer, subprocess_env, twistd_command, write_toml
from tests.polling import wait_until

DEFAULT_PORTS = [2525, 2587, 2465, 2143, 2993, 2110, 2995, 9425]


def run_twistd(cwd, *args, timeout=30):
    return subprocess.run(twistd_command() + ["-n", "--pidfile=", "mailsuite", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=subprocess_env())


def assert_one_clear_line(result, *fragments):
    assert result.returncode != 0
    output = result.stderr + result.stdout
    assert "Traceback" not in output, output
    lines = [line for line in result.stderr.splitlines() if line.startswith("mailsuite:")]
    assert len(lines) == 1, output
    for fragment in fragments:
        assert fragment in lines[0], output


def test_plugin_is_listed_by_twistd():
    result = subprocess.run(twistd_command() + ["--help"], capture_output=True, text=True,
                            env=subprocess_env())
    assert "mailsuite" in result.stdout


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def test_no_arguments_starts_on_embedded_defaults(tmp_path):
    if not all(port_free(p) for p in DEFAULT_PORTS):
        pytest.skip("a default port (2525/2587/2465/2143/2993/2110/2995/9425) is in use on this "
                    "machine")
    process = subprocess.Popen(twistd_command() + ["-n", "--pidfile=", "mailsuite"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env=subprocess_env())
    try:
        pending = set(DEFAULT_PORTS)

        def listening() -> bool:
            assert process.poll() is None, "twistd exited"
            for port in list(pending):
                try:
                    socket.create_connection((HOST, port), timeout=0.5).close()
                    pending.discard(port)
                except OSError:
                    pass
            return not pending

        wait_until(listening, timeout=30, interval=0.1, message="the default ports")
        data = tmp_path / "mailsuite-data"
        assert (data / "mailsuite.db").exists()
        assert (data / "tls" / "cert.pem").exists() and (data / "tls" / "key.pem").exists()
        assert oct((data / "tls" / "key.pem").stat().st_mode & 0o777) == "0o600"
        banner = socket.create_connection((HOST, 2525), timeout=5).recv(512)
        assert banner.startswith(b"220 ")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        output = process.communicate(timeout=15)[0]
    assert "created a self-signed TLS certificate" in output
    assert str(tmp_path / "mailsuite-data" / "tls" / "cert.pem") in output


def test_unknown_key(tmp_path):
    write_toml(str(tmp_path / "c.toml"), {"server": {"data_dir": str(tmp_path), "hostnme": "x"}})
    assert_one_clear_line(run_twistd(tmp_path, "--config", "c.toml"), "unknown key 'hostnme'")


def test_missing_config_file(tmp_path):
    assert_one_clear_line(run_twistd(tmp_path, "--config", "nope.toml"), "does not exist")


def test_malformed_endpoint(tmp_path):
    write_toml(str(tmp_path / "c.toml"), {"server": {"data_dir": str(tmp_path / "d")},
                                          "listen": {"mx": "tcp:notaport"}})
    assert_one_clear_line(run_twistd(tmp_path, "--config", "c.toml"), "[listen] mx", "tcp:notaport")


def test_unreadable_certificate(tmp_path):
    write_toml(str(tmp_path / "c.toml"), {"server": {"data_dir": str(tmp_path / "d")},
                                          "tls": {"cert": str(tmp_path / "missing.pem"),
                                                  "key": str(tmp_path / "missing.key")}})
    assert_one_clear_line(run_twistd(tmp_path, "--config", "c.toml"), "missing.pem")


def test_garbage_certificate(tmp_path):
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    write_toml(str(tmp_path / "c.toml"), {"server": {"data_dir": str(tmp_path / "d")},
                                          "tls": {"cert": str(tmp_path / "cert.pem"),
                                                  "key": str(tmp_path / "key.pem")}})
    assert_one_clear_line(run_twistd(tmp_path, "--config", "c.toml"), "cert.pem")


def test_port_in_use(tmp_path):
    server = MailServer(str(tmp_path / "s"), listeners=["mx", "submission"])
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind((HOST, server.ports["submission"]))
        blocker.listen(1)
        result = run_twistd(tmp_path, "--config", server.config_path)
    assert_one_clear_line(result, "submission", str(server.ports["submission"]), "in use")

"""`mailsuite dns DOMAIN`: the records to publish, printed by the CLI's entry point in process
for a configuration on tmp_path (fixed listener ports; nothing listens). The `--check` against a
real DNS server is in tests/scenario/test_dns_cmd.py.
"""
from __future__ import annotations

import io
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import pytest

from mailsuite.admin import cli as admin_cli
from mailsuite.directory import DirectoryStore
from tests.harness import LISTENERS, write_toml

ADDRESS = "alice@example.org"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class Hosted:
    """A configuration and data directory like MailServer's, with the admin command run in
    process; every listener has a fixed port (none is opened)."""

    def __init__(self, base: str, capsys: Any, monkeypatch: Any,
                 listeners: list[str] | None = None,
                 extra: dict[str, dict[str, Any]] | None = None):
        self.hostname = "mx.test.example"
        self.data_dir = os.path.join(base, "data")
        self.config_path = os.path.join(base, "mailsuite.toml")
        enabled = listeners or LISTENERS
        self.ports = {name: 40000 + i for i, name in enumerate(LISTENERS) if name in enabled}
        sections: dict[str, dict[str, Any]] = {
            "server": {"hostname": self.hostname, "data_dir": self.data_dir,
                       "admin_address": "admin@" + self.hostname},
            "listen": {name: (f"tcp:{self.ports[name]}:interface=127.0.0.1"
                              if name in self.ports else "") for name in LISTENERS},
        }
        for name, values in (extra or {}).items():
            sections.setdefault(name, {}).update(values)
        os.makedirs(base, exist_ok=True)
        write_toml(self.config_path, sections)
        self.capsys = capsys
        self.monkeypatch = monkeypatch

    def add_domain(self, domain: str) -> None:
        store = DirectoryStore("sqlite:///" + os.path.join(self.data_dir, "mailsuite.db"))
        try:
            store.prepare()
            store.add_domain(domain)
        finally:
            store.close()

    def add_user(self, address: str, password: str = "secret-pw-1") -> None:
        self.add_domain(address.rpartition("@")[2])
        store = DirectoryStore("sqlite:///" + os.path.join(self.data_dir, "mailsuite.db"))
        try:
            store.add_user(address, password)
        finally:
            store.close()

    def admin(self, *args: str, check: bool = True) -> Result:
        self.capsys.readouterr()
        self.monkeypatch.setattr(sys, "stdin", io.StringIO(""))
        try:
            code = admin_cli.main(["--config", self.config_path, *args])
        except SystemExit as e:
            code = e.code
        out, err = self.capsys.readouterr()
        if check and code != 0:
            raise AssertionError(f"mailsuite {' '.join(args)} failed ({code}): {err}{out}")
        return Result(code, out, err)


@pytest.fixture
def make_hosted(tmp_path, capsys, monkeypatch):
    def make(**kwargs: Any) -> Hosted:
        return Hosted(str(tmp_path / "server"), capsys, monkeypatch, **kwargs)
    return make


@pytest.fixture
def hosted(make_hosted):
    """example.org hosted, with DKIM keys made by `mailsuite dkim generate`."""
    server = make_hosted()
    server.add_user(ADDRESS)
    server.admin("dkim", "generate", "example.org")
    return server


def zone_records(output: str) -> list[tuple[str, str, str]]:
    """(name, type, rdata) of each record line of `mailsuite dns` output; TXT rdata unquoted."""
    records = []
    for line in output.splitlines():
        if not line.strip() or line.startswith(";"):
            continue
        match = re.match(r"^(\S+)\s+(\d+)\s+IN\s+(\S+)\s+(.*)$", line)
        assert match, f"not a zone-file record line: {line!r}"
        name, ttl, rtype, rdata = match.groups()
        assert name.endswith(".") and int(ttl) > 0
        if rtype == "TXT":
            strings = re.findall(r'"((?:[^"\\]|\\.)*)"', rdata)
            assert strings and all(len(s.encode()) <= 255 for s in strings)
            rdata = "".join(s.replace('\\"', '"').replace("\\\\", "\\") for s in strings)
        records.append((name.rstrip(".").lower(), rtype, rdata))
    return records



def test_dns_prints_every_record(hosted):
    result = hosted.admin("dns", "example.org")
    records = zone_records(result.stdout)
    host = hosted.hostname
    p = hosted.ports
    by_name = {}
    for name, rtype, rdata in records:
        by_name.setdefault((name, rtype), []).append(rdata)
    assert by_name[("example.org", "MX")] == [f"10 {host}."]
    assert by_name[("example.org", "TXT")] == ["v=spf1 mx -all"]
    assert by_name[("_dmarc.example.org", "TXT")] == ["v=DMARC1; p=quarantine"]
    assert by_name[("autoconfig.example.org", "CNAME")] == [f"{host}."]
    assert by_name[("autodiscover.example.org", "CNAME")] == [f"{host}."]
    assert by_name[("_submissions._tcp.example.org", "SRV")] == [f"0 1 {p['submissions']} {host}."]
    assert by_name[("_submission._tcp.example.org", "SRV")] == [f"10 1 {p['submission']} {host}."]
    assert by_name[("_imaps._tcp.example.org", "SRV")] == [f"0 1 {p['imaps']} {host}."]
    assert by_name[("_imap._tcp.example.org", "SRV")] == [f"10 1 {p['imap']} {host}."]
    assert by_name[("_pop3s._tcp.example.org", "SRV")] == [f"20 1 {p['pop3s']} {host}."]
    # DKIM: exactly the values `mailsuite dkim generate` wrote, RSA split into 255-octet strings.
    dkim_dir = os.path.join(hosted.data_dir, "dkim", "example.org")
    for name in os.listdir(dkim_dir):
        if name.endswith(".txt"):
            with open(os.path.join(dkim_dir, name)) as f:
                value = f.read().strip()
            assert by_name[(f"{name[:-4]}._domainkey.example.org", "TXT")] == [value]
    assert len([n for n, t in by_name if n.endswith("._domainkey.example.org")]) == 2
    # Not configured: no MTA-STS or TLS-RPT records.
    assert not [n for n, _ in by_name if "mta-sts" in n or "_smtp._tls" in n]
    assert "A/AAAA" in result.stdout  # the reminder about the host's own address records



def test_dns_optional_records_and_disabled_listeners(make_hosted):
    server = make_hosted(listeners=["mx", "submission", "imaps", "autoconfig"],
                         extra={"dns": {"mta_sts_mode": "testing",
                                        "tlsrpt_rua": "mailto:tls@example.org",
                                        "dmarc_policy": "reject",
                                        "dmarc_rua": "mailto:dmarc@example.org"}})
    server.add_domain("example.org")
    result = server.admin("dns", "example.org")
    records = {(n, t): r for n, t, r in zone_records(result.stdout)}
    assert records[("_dmarc.example.org", "TXT")] == \
        "v=DMARC1; p=reject; rua=mailto:dmarc@example.org"
    assert records[("_mta-sts.example.org", "TXT")].startswith("v=STSv1; id=")
    assert records[("mta-sts.example.org", "CNAME")] == f"{server.hostname}."
    assert records[("_smtp._tls.example.org", "TXT")] == "v=TLSRPTv1; rua=mailto:tls@example.org"
    # RFC 6186 §4: a service that is not offered is published with the target ".".
    for service in ("_submissions", "_imap", "_pop3s", "_pop3"):
        assert records[(f"{service}._tcp.example.org", "SRV")] == "0 0 0 ."
    assert records[("_imaps._tcp.example.org", "SRV")] == \
        f"0 1 {server.ports['imaps']} {server.hostname}."
    assert "no DKIM key yet" in result.stdout



def test_dns_unknown_domain_is_one_line(hosted):
    result = hosted.admin("dns", "not-hosted.test", check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "mailsuite: not-hosted.test is not a domain of this server (add it with "
        "`mailsuite domain add not-hosted.test`)"]
    result = hosted.admin("dns", "bad_name!", check=False)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1



def test_dns_check_bad_nameserver_argument(hosted):
    result = hosted.admin("dns", "example.org", "--check", "--nameserver", "127.0.0.1:x",
                          check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "mailsuite: --nameserver '127.0.0.1:x' is not HOST or HOST:PORT"



"""`mailsuite dns DOMAIN` (the records to publish) and `--check` against a real DNS server.

The check is tested end to end: the zone printed by `mailsuite dns` is parsed and served by a
small authoritative twisted.names server on a free loopback port (run as
`python -m tests.test_dns_cmd ZONE.json`, it speaks UDP and TCP), then `mailsuite dns --check
--nameserver 127.0.0.1:PORT` asks it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.harness import MailServer, free_port

ADDRESS = "alice@example.org"


@pytest.fixture(scope="module")
def hosted(tmp_path_factory):
    """A server hosting example.org, with DKIM keys made by `mailsuite dkim generate`."""
    server = MailServer(str(tmp_path_factory.mktemp("dns") / "server"))
    server.start()
    try:
        server.add_user(ADDRESS)
        server.admin("dkim", "generate", "example.org")
        yield server
    finally:
        server.stop()


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


def test_dns_optional_records_and_disabled_listeners(make_server):
    server = make_server(listeners=["mx", "submission", "imaps", "autoconfig"],
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


def test_dns_check_ok_missing_wrong(hosted, tmp_path):
    published = zone_records(hosted.admin("dns", "example.org").stdout)
    # Other TXT records at the apex (site verifications) are normal and must not confuse it.
    published.append(("example.org", "TXT", "google-site-verification=abc"))
    zone = tmp_path / "zone.json"
    zone.write_text(json.dumps(published))
    with DNSServer(str(zone)) as dns:
        result = hosted.admin("dns", "example.org", "--check", "--nameserver", dns.nameserver,
                              check=False)
        lines = result.stdout.splitlines()
        assert result.returncode == 0, result.stdout + result.stderr
        assert len(lines) == len(published) - 1 + 1  # one line per record, then the summary
        assert all(line.startswith("ok ") for line in lines[:-1]), lines
        assert lines[-1].startswith(f"{len(published) - 1} ok, 0 missing or wrong")

        # Now drop DMARC, point SPF elsewhere and move an SRV port.
        changed = []
        for name, rtype, rdata in published:
            if name == "_dmarc.example.org":
                continue
            if rdata == "v=spf1 mx -all":
                rdata = "v=spf1 a -all"
            if name == "_imaps._tcp.example.org":
                rdata = f"0 1 993 {hosted.hostname}."
            changed.append((name, rtype, rdata))
        zone.write_text(json.dumps(changed))
        later = time.time() + 2  # the server re-reads the zone when its mtime changes
        os.utime(zone, (later, later))
        result = hosted.admin("dns", "example.org", "--check", "--nameserver", dns.nameserver,
                              check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    bad = [line for line in lines[:-1] if not line.startswith("ok ")]
    assert bad == [
        'wrong    example.org. TXT: expected "v=spf1 mx -all", found "v=spf1 a -all"',
        'missing  _dmarc.example.org. TXT "v=DMARC1; p=quarantine"',
        f"wrong    _imaps._tcp.example.org. SRV: expected 0 1 {hosted.ports['imaps']} "
        f"{hosted.hostname}., found 0 1 993 {hosted.hostname}.",
    ]
    assert "3 missing or wrong" in lines[-1]


def test_dns_check_without_an_answering_resolver(hosted):
    started = time.monotonic()
    result = hosted.admin("dns", "example.org", "--check", "--nameserver",
                          f"127.0.0.1:{free_port()}", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert all(line.startswith("error ") for line in result.stdout.splitlines()[:-1])
    assert time.monotonic() - started < 30


def test_dns_check_bad_nameserver_argument(hosted):
    result = hosted.admin("dns", "example.org", "--check", "--nameserver", "127.0.0.1:x",
                          check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "mailsuite: --nameserver '127.0.0.1:x' is not HOST or HOST:PORT"


# -- a small authoritative DNS server (twisted.names) for the zone a test writes ---------------

class DNSServer:
    """Serves the records in a JSON file [(name, type, rdata)], re-read when it changes."""

    def __init__(self, zone_path: str):
        self.zone_path = zone_path
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> "DNSServer":
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.process = subprocess.Popen([sys.executable, "-m", "tests.test_dns_cmd",
                                         self.zone_path], cwd=root, stdout=subprocess.PIPE,
                                        start_new_session=True)
        line = self.process.stdout.readline().decode()
        assert line.startswith("PORT "), f"DNS server did not start: {line!r}"
        self.port = int(line.split()[1])
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.process.stdout.close()


def _serve(zone_path: str) -> None:
    from twisted.internet import defer, reactor
    from twisted.names import common, dns, error, server

    def payload(rtype: str, rdata: str):
        if rtype == "MX":
            preference, exchange = rdata.split()
            return dns.MX, dns.Record_MX(int(preference), exchange.rstrip(".").encode(), ttl=60)
        if rtype == "CNAME":
            return dns.CNAME, dns.Record_CNAME(rdata.rstrip(".").encode(), ttl=60)
        if rtype == "SRV":
            priority, weight, port, target = rdata.split()
            target = b"" if target == "." else target.rstrip(".").encode()
            return dns.SRV, dns.Record_SRV(int(priority), int(weight), int(port), target, ttl=60)
        if rtype == "TXT":
            data = rdata.encode()
            return dns.TXT, dns.Record_TXT(*[data[i:i + 255] for i in range(0, len(data), 255)],
                                           ttl=60)
        if rtype == "A":
            return dns.A, dns.Record_A(rdata, ttl=60)
        raise ValueError(rtype)

    class Zone(common.ResolverBase):
        def __init__(self) -> None:
            super().__init__()
            self.mtime = -1.0
            self.records: dict[str, list] = {}

        def _lookup(self, name, cls, qtype, timeout):
            if os.stat(zone_path).st_mtime != self.mtime:
                self.mtime = os.stat(zone_path).st_mtime
                self.records = {}
                with open(zone_path) as f:
                    for owner, rtype, rdata in json.load(f):
                        self.records.setdefault(owner.lower(), []).append(payload(rtype, rdata))
            key = name.decode().lower().rstrip(".")
            if key not in self.records:
                return defer.fail(error.DomainError(name))  # NXDOMAIN
            answers = [dns.RRHeader(name, t, dns.IN, 60, p, auth=True)
                       for t, p in self.records[key] if t == qtype]
            return defer.succeed((answers, [], []))

    factory = server.DNSServerFactory()
    factory.resolver = Zone()  # directly: a ResolverChain would turn every error into NXDOMAIN
    udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(controller=factory),
                            interface="127.0.0.1")
    port = udp.getHost().port
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    _serve(sys.argv[1])

"""`mailsuite dns DOMAIN --check` against a real DNS server, end to end.

The zone printed by `mailsuite dns` is parsed and served by a small authoritative twisted.names
server on a free loopback port (run as `python -m tests.scenario.test_dns_cmd ZONE.json`, it
speaks UDP and TCP), then `mailsuite dns --check --nameserver 127.0.0.1:PORT` (the real command,
a subprocess) asks it. Printing the records is tested in process in tests/unit/test_dns_cmd.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.harness import REPO_ROOT, MailServer, free_port, subprocess_env
from tests.unit.test_dns_cmd import zone_records

ADDRESS = "alice@example.org"


@pytest.fixture(scope="module")
def hosted(tmp_path_factory):
    """A server's configuration hosting example.org, with DKIM keys made by `mailsuite dkim
    generate`. It is not started: the command reads the configuration and the database."""
    server = MailServer(str(tmp_path_factory.mktemp("dns") / "server"))
    server.add_user(ADDRESS)
    server.admin("dkim", "generate", "example.org")
    return server


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
        self.process = subprocess.Popen([sys.executable, "-m", "tests.scenario.test_dns_cmd",
                                         self.zone_path], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                        start_new_session=True, env=subprocess_env())
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

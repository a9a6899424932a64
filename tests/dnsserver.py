"""An authoritative twisted.names DNS server on loopback that serves test zones.

Tests describe their zones as records and run the server in a subprocess (so the test process
needs no reactor):

    with DNSServer({"a.test": [("a.test", "MX", "10 mx.a.test"), ("mx.a.test", "A", "127.0.0.1")]},
                   servfail=["broken.test"]) as dns:
        config = {"courier": {"nameservers": [dns.nameserver]}}

Answers: a name with records gets them (NOERROR with an empty answer when it has none of the asked
type); any other name gets NXDOMAIN; a name listed in `servfail` (or under it) gets SERVFAIL. The
zones can be replaced while the server runs (`dns.update(...)`); the server reloads the file
before each query when it changed. A name listed in `silent` (or under it) gets no answer at all,
so the client times out (a dead name server, for temperror cases). Record values use zone-file syntax: "10 mx.a.test" for MX,
"." as MX exchange for a null MX (RFC 7505), the full text for TXT (split into 255-octet strings).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Iterable

Record = tuple[str, str, str]  # (name, type, value)


class DNSServer:
    def __init__(self, zones: dict[str, Iterable[Record]] | None = None,
                 servfail: Iterable[str] = (), silent: Iterable[str] = ()):
        self._dir = tempfile.mkdtemp(prefix="mailsuite-dns-")
        self.zone_path = os.path.join(self._dir, "zones.json")
        self.update(zones or {}, servfail, silent)
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def nameserver(self) -> str:
        """The "host:port" string for [courier] nameservers."""
        return f"127.0.0.1:{self.port}"

    def update(self, zones: dict[str, Iterable[Record]], servfail: Iterable[str] = (),
               silent: Iterable[str] = ()) -> None:
        records = [list(r) for rs in zones.values() for r in rs]
        tmp = self.zone_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"records": records, "servfail": list(servfail), "silent": list(silent)},
                      f)
        os.replace(tmp, self.zone_path)
        # mtime granularity could hide a quick second update: bump it explicitly.
        now = time.time()
        os.utime(self.zone_path, (now, now + (time.monotonic_ns() % 1000) / 1e6))

    def start(self, timeout: float = 15.0) -> "DNSServer":
        # Imported here: the server process (`python -m tests.dnsserver`) needs neither.
        from tests.harness import REPO_ROOT as root
        from tests.harness import subprocess_env
        from tests.polling import wait_until

        env = subprocess_env()
        with open(os.path.join(self._dir, "stderr.log"), "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.dnsserver", self.zone_path], cwd=root, env=env,
                stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
        line = self.process.stdout.readline().decode()
        if not line.startswith("PORT "):
            with open(os.path.join(self._dir, "stderr.log"), errors="replace") as f:
                err = f.read()
            self.stop()
            raise RuntimeError(f"DNS server did not start: {line!r} {err}")
        self.port = int(line.split()[1])

        def tcp_accepts() -> bool:  # the TCP side must accept too (truncated answers)
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                return False

        try:
            wait_until(tcp_accepts, timeout=timeout, interval=0.05,
                       message="the DNS server's TCP port")
        except AssertionError:
            self.stop()
            raise RuntimeError(f"DNS server did not accept TCP on port {self.port}")
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process:
            for stream in (self.process.stdout, self.process.stderr):
                if stream:
                    stream.close()
        self.process = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "DNSServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def dnsfunc(self, name: bytes | str, timeout: int = 5) -> bytes:
        """A `dnsfunc` for dkimpy's verify: the TXT record of `name`, asked of this server."""
        import dns.message
        import dns.query
        import dns.rdatatype

        qname = name.decode() if isinstance(name, bytes) else name
        reply = dns.query.udp(dns.message.make_query(qname, "TXT"), "127.0.0.1",
                              port=self.port, timeout=timeout)
        for rrset in reply.answer:
            if rrset.rdtype == dns.rdatatype.TXT:
                for rdata in rrset:
                    return b"".join(rdata.strings)
        return b""


# -- the server process --------------------------------------------------------------------------

def _serve(zone_path: str) -> None:
    from twisted.internet import defer, reactor
    from twisted.names import common, dns, error, server

    types = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "TXT": dns.TXT, "CNAME": dns.CNAME}

    def payload(rtype: str, value: str):
        if rtype == "A":
            return dns.Record_A(value, ttl=60)
        if rtype == "AAAA":
            return dns.Record_AAAA(value, ttl=60)
        if rtype == "MX":
            pref, exchange = value.split(None, 1)
            exchange = "" if exchange.strip() == "." else exchange.strip().rstrip(".")
            return dns.Record_MX(int(pref), exchange.encode(), ttl=60)
        if rtype == "CNAME":
            return dns.Record_CNAME(value.rstrip(".").encode(), ttl=60)
        if rtype == "TXT":
            data = value.encode()
            return dns.Record_TXT(*[data[i:i + 255] for i in range(0, len(data), 255)] or [b""],
                                  ttl=60)
        raise ValueError(rtype)

    class TestZones(common.ResolverBase):
        def __init__(self) -> None:
            super().__init__()
            self._mtime = -1.0
            self._records: dict[str, list[tuple[int, object]]] = {}
            self._servfail: list[str] = []
            self._silent: list[str] = []

        def _load(self) -> None:
            mtime = os.stat(zone_path).st_mtime
            if mtime == self._mtime:
                return
            with open(zone_path) as f:
                data = json.load(f)
            records: dict[str, list[tuple[int, object]]] = {}
            for name, rtype, value in data["records"]:
                records.setdefault(name.lower().rstrip("."), []).append(
                    (types[rtype.upper()], payload(rtype.upper(), value)))
            self._records = records
            self._servfail = [s.lower().rstrip(".") for s in data["servfail"]]
            self._silent = [s.lower().rstrip(".") for s in data.get("silent", [])]
            self._mtime = mtime

        def _lookup(self, name, cls, type, timeout):
            self._load()
            key = name.decode().lower().rstrip(".")
            if any(key == s or key.endswith("." + s) for s in self._servfail):
                # Not error.DNSServerError: it subclasses DomainError, which the server answers NXDOMAIN.
                return defer.fail(RuntimeError("configured to fail"))
            if any(key == s or key.endswith("." + s) for s in self._silent):
                return defer.Deferred()  # never answered: the client times out
            if key not in self._records:
                return defer.fail(error.DomainError(name))
            answers = [dns.RRHeader(name, t, dns.IN, 60, p, auth=True)
                       for t, p in self._records[key] if t == type or type == dns.ALL_RECORDS]
            if not answers and type != dns.CNAME:
                # Follow a CNAME the way an authoritative server includes it in the answer.
                answers = [dns.RRHeader(name, t, dns.IN, 60, p, auth=True)
                           for t, p in self._records[key] if t == dns.CNAME]
            return defer.succeed((answers, [], []))

    factory = server.DNSServerFactory()
    # Directly, not through authorities=[...]: a ResolverChain turns every error into NXDOMAIN.
    factory.resolver = TestZones()
    for _ in range(50):
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(controller=factory),
                                interface="127.0.0.1")
        port = udp.getHost().port
        try:
            reactor.listenTCP(port, factory, interface="127.0.0.1")
        except Exception:
            udp.stopListening()  # that port is taken for TCP: another pair
            continue
        break
    else:
        raise SystemExit("no free port for UDP and TCP")
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    _serve(sys.argv[1])

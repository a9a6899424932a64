"""The courier's parts over real loopback sockets: the MX resolver against a real DNS
server, and the remote agent against scripted Twisted SMTP servers (timeouts, HELO fallback,
AUTH LOGIN, SIZE, next MX after a 421 greeting, STARTTLS that fails, 4xx/5xx at DATA)."""
from __future__ import annotations

import os
import random
import tempfile

from twisted.internet import defer, protocol, reactor
from twisted.protocols.basic import LineReceiver
from twisted.trial import unittest

from mailsuite.config import Config
from mailsuite.courier.agent import RemoteAgent
from mailsuite.courier.mx import MXResolver, make_resolver
from mailsuite.pools import Pools
from mailsuite.queue.spool import QueueEntry, Recipient
from tests.dnsserver import DNSServer


# -- MX resolution against a real DNS server -----------------------------------------------------

ZONES = {
    "multi.test": [("multi.test", "MX", "20 mx3.multi.test"), ("multi.test", "MX", "10 mx1.multi.test"),
                   ("multi.test", "MX", "10 mx2.multi.test"), ("mx1.multi.test", "A", "127.0.0.11"),
                   ("mx2.multi.test", "A", "127.0.0.12"), ("mx2.multi.test", "AAAA", "::1"),
                   ("mx3.multi.test", "A", "127.0.0.13")],
    "noaddr.test": [("noaddr.test", "MX", "10 gone.noaddr.test")],
    "amx.test": [("amx.test", "A", "127.0.0.21")],
    "txt.test": [("txt.test", "TXT", "hello")],
    "nullmx.test": [("nullmx.test", "MX", "0 .")],
}


class MXTests(unittest.TestCase):
    def setUp(self):
        self.dns = DNSServer(ZONES, servfail=["fail.test"]).start()
        self.addCleanup(self.dns.stop)
        self.resolver = make_resolver([self.dns.nameserver])

    @defer.inlineCallbacks
    def test_preference_order_and_shuffle_within_a_preference(self):
        seen = set()
        for seed in range(12):
            res = yield MXResolver(self.resolver, random.Random(seed)).resolve("multi.test")
            names = [h.name for h in res.hosts]
            self.assertEqual(sorted(names[:2]), ["mx1.multi.test", "mx2.multi.test"])
            self.assertEqual(names[2], "mx3.multi.test")
            seen.add(tuple(names[:2]))
        self.assertEqual(len(seen), 2)  # both orders occur: equal preferences are randomised
        host = next(h for h in res.hosts if h.name == "mx2.multi.test")
        self.assertEqual(host.addresses, ("127.0.0.12", "::1"))

    @defer.inlineCallbacks
    def test_outcomes(self):
        mx = MXResolver(self.resolver)
        res = yield mx.resolve("amx.test")  # no MX: the A record (RFC 5321 §5.1)
        self.assertEqual([(h.name, h.addresses) for h in res.hosts], [("amx.test", ("127.0.0.21",))])
        for domain, code in [("nullmx.test", "5.1.10"), ("nowhere.test", "5.1.2"),
                             ("txt.test", "5.1.2"), ("fail.test", "4.4.3"),
                             ("noaddr.test", "4.4.3")]:
            res = yield mx.resolve(domain)
            self.assertEqual(res.failure.status if res.failure else None, code, domain)
        res = yield mx.resolve("[127.0.0.9]")
        self.assertEqual(res.hosts[0].addresses, ("127.0.0.9",))


# -- the agent against scripted servers ----------------------------------------------------------

class Scripted(LineReceiver):
    """Replies from factory.script: {"greeting": ..., "EHLO": [...], "RCPT": fn, ...}."""

    def connectionMade(self):
        self.factory.connections += 1
        self.factory.current += 1
        self.factory.peak = max(self.factory.peak, self.factory.current)
        greeting = self.factory.script.get("greeting", "220 scripted ESMTP")
        if greeting is not None:
            self.sendLine(greeting.encode())
        self.in_data = False
        self.data = []

    def connectionLost(self, reason=None):
        self.factory.current -= 1

    def lineReceived(self, line):
        script = self.factory.script
        if self.in_data:
            if line == b".":
                self.in_data = False
                self.factory.messages.append(b"\r\n".join(self.data))
                self.data = []
                reply = script.get("DATA_END", "250 2.0.0 ok").encode()
                if script.get("delay_end"):  # a slow receiver keeps the connection busy
                    reactor.callLater(script["delay_end"], self.sendLine, reply)
                else:
                    self.sendLine(reply)
            else:
                self.data.append(line[1:] if line.startswith(b".") else line)
            return
        if line.upper() == b"STARTTLS" and getattr(self.factory, "tls_context", None):
            self.sendLine(b"220 2.0.0 ready")
            self.transport.startTLS(self.factory.tls_context)
            return
        text = line.decode()
        self.factory.commands.append(text)
        verb = text.split(" ")[0].upper()
        reply = script.get(text, script.get(verb, "250 ok"))
        if callable(reply):
            reply = reply(text)
        if reply is None:
            return  # say nothing: the client must time out
        if verb == "STARTTLS" and reply.startswith("220"):
            self.sendLine(reply.encode())
            self.transport.write(b"this is not a TLS server hello\r\n")
            self.transport.loseConnection()
            return
        if isinstance(reply, list):
            for i, r in enumerate(reply):
                self.sendLine(f"250{'-' if i < len(reply) - 1 else ' '}{r}".encode())
            return
        if verb == "DATA" and reply.startswith("354"):
            self.in_data = True
        self.sendLine(reply.encode())
        if verb == "QUIT":
            self.transport.loseConnection()


class ScriptedFactory(protocol.ServerFactory):
    protocol = Scripted
    current = 0
    peak = 0


def listen(script: dict, interface: str = "127.0.0.1", port: int = 0, tls_context=None):
    factory = ScriptedFactory()
    factory.tls_context = tls_context
    factory.protocol = Scripted
    factory.script = script
    factory.connections = 0
    factory.commands = []
    factory.messages = []
    return factory, reactor.listenTCP(port, factory, interface=interface)


class AgentTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.dns = DNSServer({
            "one.test": [("one.test", "MX", "10 mx.one.test"), ("mx.one.test", "A", "127.0.0.1")],
            "two.test": [("two.test", "MX", "10 bad.two.test"), ("two.test", "MX", "20 good.two.test"),
                         ("bad.two.test", "A", "127.0.0.3"), ("good.two.test", "A", "127.0.0.1")],
        }).start()
        self.addCleanup(self.dns.stop)
        self.pools = Pools()
        self.pools.startService()
        self.addCleanup(self.pools.stopService)
        self.ports = []

    def tearDown(self):
        return defer.gatherResults([p.stopListening() for p in self.ports])

    def server(self, script, interface="127.0.0.1", port=0, tls_context=None):
        factory, p = listen(script, interface, port, tls_context)
        self.ports.append(p)
        return factory, p.getHost().port

    def agent(self, port, **courier):
        config = Config()
        config.server.hostname = "client.test"
        config.server.data_dir = self.tmp
        config.courier.nameservers = [self.dns.nameserver]
        config.courier.mx_port = port
        config.courier.connect_timeout = 2
        config.courier.command_timeout = 2
        for k, v in courier.items():
            setattr(config.courier, k, v)
        agent = RemoteAgent(config.courier, config.hostname, reactor=reactor, clock=reactor,
                            io=self.pools.io)
        self.addCleanup(agent.close)
        return agent

    def entry(self, *rcpts, body=b"Subject: t\r\n\r\nhello\r\n"):
        path = os.path.join(self.tmp, "msg.eml")
        with open(path, "wb") as f:
            f.write(body)
        recipients = [Recipient(address=r, original=r, local=False) for r in rcpts]
        return QueueEntry(id="0123456789abcdef", sender="s@client.test", recipients=recipients,
                          created=0.0), recipients, path

    @defer.inlineCallbacks
    def test_silent_server_times_out_and_defers(self):
        _, port = self.server({"greeting": None})
        results = yield self.agent(port).deliver(*self.entry("x@one.test"))
        self.assertEqual([r.status for r in results], ["deferred"])
        self.assertIn("timeout", results[0].detail)

    @defer.inlineCallbacks
    def test_helo_fallback_auth_login_and_per_recipient_results(self):
        def rcpt(cmd):
            return "550 5.1.1 nope" if "bad" in cmd else "452 4.2.2 full" if "full" in cmd \
                else "250 2.1.5 ok"
        factory, port = self.server({"EHLO": "502 5.5.1 what", "HELO": "250 hi", "RCPT": rcpt,
                                     "DATA": "354 go"})
        results = yield self.agent(port).deliver(*self.entry("a@one.test", "bad@one.test",
                                                             "full@one.test"))
        self.assertEqual([r.status for r in results], ["sent", "bounced", "deferred"])
        self.assertEqual(results[1].enhanced, "5.1.1")
        self.assertEqual(results[1].remote_mta, "mx.one.test")
        self.assertIn("HELO client.test", factory.commands)
        self.assertEqual(len(factory.messages), 1)
        self.assertTrue(all("SIZE=" not in c for c in factory.commands))  # no ESMTP, no params

        factory, port = self.server({"EHLO": ["s", "AUTH LOGIN", "SIZE 10"], "AUTH": "334 VXNlcm5hbWU6"})
        factory.script["dGhlLXVzZXI="] = "334 UGFzc3dvcmQ6"  # base64 "the-user"
        factory.script["dGhlLXBhc3M="] = "235 2.7.0 ok"  # base64 "the-pass"
        agent = self.agent(0, relay=f"127.0.0.1:{port}", relay_tls="none",
                           relay_username="the-user", relay_password="the-pass")
        results = yield agent.deliver(*self.entry("x@anywhere.test"))
        # SIZE 10 is smaller than the message: bounced (5.3.4) without sending it.
        self.assertEqual([(r.status, r.enhanced) for r in results], [("bounced", "5.3.4")])
        self.assertIn("AUTH LOGIN", factory.commands)
        self.assertEqual(factory.messages, [])

    @defer.inlineCallbacks
    def test_next_mx_after_421_greeting_and_data_replies(self):
        good, port = self.server({"DATA": "354 go", "DATA_END": "451 4.3.0 disk full"})
        try:
            bad, _ = self.server({"greeting": "421 4.3.2 busy"}, interface="127.0.0.3", port=port)
        except Exception:
            raise unittest.SkipTest("could not bind 127.0.0.3 on the same port")
        results = yield self.agent(port).deliver(*self.entry("x@two.test"))
        self.assertEqual(bad.connections, 1)
        self.assertEqual([r.status for r in results], ["deferred"])  # 451 after DATA
        self.assertEqual(results[0].remote_mta, "good.two.test")
        good.script["DATA_END"] = "554 5.6.0 content rejected"
        results = yield self.agent(port).deliver(*self.entry("x@two.test"))
        self.assertEqual([(r.status, r.enhanced) for r in results], [("bounced", "5.6.0")])

    @defer.inlineCallbacks
    def test_failed_starttls_falls_back_to_plain_text(self):
        factory, port = self.server({"EHLO": ["s", "STARTTLS"], "STARTTLS": "220 go ahead",
                                     "DATA": "354 go"})
        results = yield self.agent(port).deliver(*self.entry("x@one.test"))
        self.assertEqual([r.status for r in results], ["sent"], results)
        self.assertEqual(factory.connections, 2)  # the TLS attempt, then plain text
        self.assertEqual(len(factory.messages), 1)

    @defer.inlineCallbacks
    def test_required_tls_defers_when_not_offered(self):
        factory, port = self.server({"DATA": "354 go"})
        results = yield self.agent(port, require_tls_domains=["one.test"]).deliver(
            *self.entry("x@one.test"))
        self.assertEqual([(r.status, r.enhanced) for r in results], [("deferred", "4.7.5")])
        self.assertEqual(factory.messages, [])

    @defer.inlineCallbacks
    def test_per_domain_connection_cap_and_reuse(self):
        factory, port = self.server({"DATA": "354 go", "EHLO": ["s", "PIPELINING"],
                                     "delay_end": 0.2})
        agent = self.agent(port, max_connections_per_domain=2)
        entries = []
        for i in range(6):
            e, rcpts, _ = self.entry(f"x{i}@one.test")
            path = os.path.join(self.tmp, f"m{i}.eml")
            with open(path, "wb") as f:
                f.write(b"Subject: %d\r\n\r\nhi\r\n" % i)
            entries.append((e, rcpts, path))
        results = yield defer.gatherResults([agent.deliver(*e) for e in entries])
        self.assertEqual([r[0].status for r in results], ["sent"] * 6)
        self.assertEqual(factory.peak, 2)  # never more than the cap at once
        self.assertEqual(factory.connections, 2)  # and the two were reused (RSET between)
        self.assertEqual(sum(1 for c in factory.commands if c == "RSET"), 4)

    @defer.inlineCallbacks
    def test_required_tls_verifies_the_certificate(self):
        import trustme
        from twisted.internet import ssl

        ca = trustme.CA()
        ca_path = os.path.join(self.tmp, "ca.pem")
        ca.cert_pem.write_to_path(ca_path)

        def context(name):
            cert = ca.issue_cert(name)
            priv = ssl.PrivateCertificate.loadPEM(cert.private_key_and_cert_chain_pem.bytes())
            return ssl.CertificateOptions(privateKey=priv.privateKey.original,
                                          certificate=priv.original)

        script = {"EHLO": ["s", "STARTTLS"], "DATA": "354 go"}
        good, port = self.server(dict(script), tls_context=context("mx.one.test"))
        agent = self.agent(port, require_tls_domains=["one.test"], relay_cafile=ca_path)
        results = yield agent.deliver(*self.entry("x@one.test"))
        self.assertEqual([r.status for r in results], ["sent"], results)
        self.assertEqual(len(good.messages), 1)
        yield agent.close()
        yield self.ports.pop().stopListening()

        # The same server with a certificate for another name: deferred, nothing sent.
        wrong, port = self.server(dict(script), tls_context=context("other.example"))
        agent = self.agent(port, require_tls_domains=["one.test"], relay_cafile=ca_path)
        results = yield agent.deliver(*self.entry("x@one.test"))
        self.assertEqual([(r.status, r.enhanced) for r in results], [("deferred", "4.7.5")])
        self.assertEqual(wrong.messages, [])
        # Without the requirement, the same unverifiable certificate is used (opportunistic).
        agent = self.agent(port)
        results = yield agent.deliver(*self.entry("x@one.test"))
        self.assertEqual([r.status for r in results], ["sent"])
        self.assertEqual(len(wrong.messages), 1)

    @defer.inlineCallbacks
    def test_utf8_address_needs_smtputf8(self):
        factory, port = self.server({"DATA": "354 go"})
        results = yield self.agent(port).deliver(*self.entry("jörg@one.test"))
        self.assertEqual([(r.status, r.enhanced) for r in results], [("bounced", "5.6.7")])
        factory.script["EHLO"] = ["s", "SMTPUTF8"]
        results = yield self.agent(port).deliver(*self.entry("jörg@one.test"))
        self.assertEqual([r.status for r in results], ["sent"])
        self.assertIn("MAIL FROM:<s@client.test> SMTPUTF8", factory.commands)

"""The dialog tests must catch the defects of stock Twisted ESMTP (TWISTED-NOTES §1).

This runs every tests/dialogs/*.txt conversation against `twisted.mail.smtp.ESMTP` 26.10 as
shipped (with a minimal delivery that accepts alice@/bob@example.org, slowly, like a database)
and checks that each one fails. A dialog that passes on stock Twisted tests nothing we fixed.
"""
from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys

import pytest

from tests.test_dialogs import DIALOG_DIR, DIALOGS, run_dialog


def serve(base: str) -> None:  # pragma: no cover - runs in the child process
    from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
    from twisted.cred.portal import IRealm, Portal
    from twisted.internet import defer, reactor
    from twisted.mail import smtp
    from twisted.mail.imap4 import PLAINCredentials
    from zope.interface import implementer

    from mailsuite.tls import create_self_signed, server_context

    cert, key = os.path.join(base, "cert.pem"), os.path.join(base, "key.pem")
    create_self_signed("localhost", cert, key)
    ctx = server_context(cert, key)

    @implementer(smtp.IMessage)
    class Message:
        def lineReceived(self, line):
            pass

        def eomReceived(self):
            return defer.succeed(None)

        def connectionLost(self):
            pass

    def later(fire, value):
        d = defer.Deferred()
        reactor.callLater(0.05, fire(d), value)
        return d

    @implementer(smtp.IMessageDelivery)
    class Delivery:
        def receivedHeader(self, helo, origin, recipients):
            return b"Received: from stock"

        def validateFrom(self, helo, origin):
            return later(lambda d: d.callback, origin)

        def validateTo(self, user):
            local = user.dest.local.split(b"+")[0].lower()
            if user.dest.domain.lower() == b"example.org" and local in (b"alice", b"bob",
                                                                        b"postmaster"):
                return later(lambda d: d.callback, lambda: Message())
            return later(lambda d: d.errback, smtp.SMTPBadRcpt(user))

    @implementer(IRealm)
    class Realm:
        def requestAvatar(self, avatar_id, mind, *interfaces):
            return smtp.IMessageDelivery, Delivery(), lambda: None

    class Factory(smtp.SMTPFactory):
        protocol = smtp.ESMTP

        def buildProtocol(self, addr):
            p = smtp.SMTPFactory.buildProtocol(self, addr)
            p.delivery, p.host, p.ctx = Delivery(), b"stock.example", ctx
            p.challengers = {b"PLAIN": PLAINCredentials, b"LOGIN": smtp.LOGINCredentials}
            return p

    checker = InMemoryUsernamePasswordDatabaseDontUse(**{"alice@example.org": b"secret-pw-1",
                                                          "bob@example.org": b"secret-pw-1"})
    factory = Factory(Portal(Realm(), [checker]))
    factory.timeout = 3  # what the dialog server is configured with (stock ignores it)
    plain = reactor.listenTCP(0, factory, interface="127.0.0.1").getHost().port
    tls = reactor.listenSSL(0, factory, ctx, interface="127.0.0.1").getHost().port
    print(json.dumps({"mx": plain, "submission": plain, "submissions": tls}), flush=True)
    reactor.run()


class StockServer:
    """Looks like tests.harness.MailServer to run_dialog; no mail is ever stored."""

    def __init__(self, base: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.test_smtp_stock_twisted",
                                      "serve", base], stdout=subprocess.PIPE,
                                     cwd=os.path.dirname(os.path.dirname(__file__)))
        self.ports = json.loads(self.proc.stdout.readline())

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def messages(self, address: str) -> list[str]:
        return []

    def wait_for_messages(self, address: str, count: int = 1, timeout: float = 0) -> list[str]:
        return []


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    server = StockServer(str(tmp_path_factory.mktemp("stock")))
    yield server
    server.proc.kill()
    server.proc.wait()


@pytest.mark.parametrize("name", DIALOGS)
def test_dialog_fails_on_stock_twisted(stock, name):
    with pytest.raises(AssertionError):
        run_dialog(stock, os.path.join(DIALOG_DIR, name + ".txt"))


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2])

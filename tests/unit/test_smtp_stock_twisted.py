"""The dialog tests must catch the defects of stock Twisted ESMTP (docs/design/smtp.md).

Every tests/dialogs/*.txt conversation is played in memory against `twisted.mail.smtp.ESMTP`
as shipped, with a minimal delivery that accepts alice@/bob@example.org (slowly, like a
database) and remembers the messages it gets. Each dialog must fail, and for the defect it
was written for: DEFECTS names it as the expected-vs-got text of the failure.
"""
from __future__ import annotations

import re

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, task
from twisted.mail import smtp
from twisted.mail.imap4 import PLAINCredentials
from zope.interface import implementer

from tests.unit.smtpkit import DIALOGS, PASSWORD, Client, FakeTLS, dialog_path, run_dialog

LATENCY = 0.05  # every validation answers this much clock time later


class StockWorld:
    """Stock ESMTP listeners (mx and submission share one; submissions is marked secure)."""

    def __init__(self) -> None:
        self.clock = task.Clock()
        self.delivered: list[bytes] = []  # one entry per (message, recipient)
        world = self

        @implementer(smtp.IMessage)
        class Message:
            def __init__(self, rcpt: bytes):
                self.rcpt = rcpt

            def lineReceived(self, line: bytes) -> None:
                pass

            def eomReceived(self) -> defer.Deferred:
                world.delivered.append(self.rcpt)
                return defer.succeed(None)

            def connectionLost(self) -> None:
                pass

        def later(value: object = None, error: Exception | None = None) -> defer.Deferred:
            def fire() -> object:
                if error is not None:
                    raise error
                return value

            return task.deferLater(world.clock, LATENCY, fire)

        @implementer(smtp.IMessageDelivery)
        class Delivery:
            def receivedHeader(self, helo, origin, recipients):
                return b"Received: from stock"

            def validateFrom(self, helo, origin):
                return later(origin)

            def validateTo(self, user):
                local = user.dest.local.split(b"+")[0].lower()
                if user.dest.domain.lower() == b"example.org" and local in (b"alice", b"bob",
                                                                            b"postmaster"):
                    rcpt = local + b"@example.org"
                    return later(lambda: Message(rcpt))
                return later(error=smtp.SMTPBadRcpt(user))

        @implementer(IRealm)
        class Realm:
            def requestAvatar(self, avatar_id, mind, *interfaces):
                return smtp.IMessageDelivery, Delivery(), lambda: None

        class Factory(smtp.SMTPFactory):
            protocol = smtp.ESMTP

            def buildProtocol(self, addr):
                p = smtp.SMTPFactory.buildProtocol(self, addr)
                p.delivery, p.host, p.ctx = Delivery(), b"stock.example", FakeTLS.context
                p.challengers = {b"PLAIN": PLAINCredentials, b"LOGIN": smtp.LOGINCredentials}
                p.callLater = world.clock.callLater
                return p

        checker = InMemoryUsernamePasswordDatabaseDontUse(
            **{"alice@example.org": PASSWORD.encode(), "bob@example.org": PASSWORD.encode()})
        self.factory = Factory(Portal(Realm(), [checker]))
        self.factory.timeout = 3  # what the dialogs are written for (stock ignores it)

    def connect(self, port: str) -> Client:
        return Client(self.factory, self.clock, secure=port == "submissions")

    def count_for(self, address: str) -> int:
        return self.delivered.count(address.encode())


# dialog -> the defect it must find in stock Twisted: the start of the failure text,
# "expected <what the dialog wants>, got <what stock did>". Stock speaks no enhanced status codes
# (RFC 2034) and advertises neither PIPELINING nor SIZE; that would hide every other defect, so
# only reply codes are compared and the S~ (advertised) checks are skipped here.
DEFECTS = {
    # a 1200-octet AUTH response raises out of dataReceived: the connection drops
    "auth_line_too_long": "expected 500 5.5.2, got the connection dropped (IllegalClientResponse: "
                          "Malformed Response - wrong number of parts)",
    # after AUTH, MAIL FROM someone else's address is accepted
    "auth_login_and_plain": "expected 553 5.7.1, got [b'250 Sender address accepted']",
    # AUTH without a mechanism raises IndexError: the connection drops
    "auth_malformed": "expected 501, got the connection dropped (IndexError: list index out of "
                      "range)",
    # the MX port advertises AUTH
    "auth_on_mx": "'AUTH' must not be in [b'250-stock.example Hello 127.0.0.1, nice to meet you', "
                  "b'250-AUTH PLAIN LOGIN'",
    # no limit on failed logins: the third failure does not close the connection
    "auth_too_many_failures": "expected 421 4.7.0, got no reply within 30.0 s",
    # AUTH is advertised (and accepted) without TLS
    "auth_without_tls": "'AUTH' must not be in [b'250-stock.example Hello 127.0.0.1, nice to "
                        "meet you', b'250-AUTH PLAIN LOGIN'",
    # a message with bare LF around a dot is stored
    "bad_data_dot": "expected 550 5.6.0, got [b'250 Delivery in progress']",
    # no NOOP
    "basic_commands": "expected 250 2.0.0, got [b'500 Command not implemented']",
    # an over-long DATA line is accepted (the body after it ends up as commands or as mail)
    "data_line_too_long": "expected 500 5.5.2, got [b'250 Delivery in progress']",
    # the "." tail of a long line split over two packets ends DATA
    "data_long_line_then_dot": "expected 500 5.5.2, got [b'250 Delivery in progress']",
    # a non-ASCII command raises UnicodeDecodeError: the connection drops
    "eight_bit_commands": "expected 500 5.5.2, got the connection dropped (UnicodeDecodeError: "
                          "'ascii' codec can't decode byte 0xff",
    # ESMTP parameters are accepted after plain HELO
    "helo_no_params": "expected 555, got [b'250 Sender address accepted']",
    # the configured idle timeout is ignored: no 421 after 3 s of silence
    "idle_timeout": "expected 421 4.4.2, got no reply within 30.0 s",
    # a line without CRLF gets 500 and the session stays (memory grows) instead of 421 + close
    "line_flood": "expected 421 4.7.0, got [b'500 Line too long']",
    # a 1100-octet command line is accepted (limit 16 KiB instead of RFC 5321's 1000)
    "line_too_long": "expected 500 5.5.2, got [b'250 Sender address accepted']",
    # a declared SIZE over the limit is accepted
    "message_too_big": "expected 552 5.3.4, got [b'250 Sender address accepted']",
    # pipelined RCPT is answered before the slow MAIL FROM: replies out of order
    "pipelining_in_order": "expected 250 2.1.0, got [b'503 Must have sender before recipient']",
    # a relay attempt gets the same 550 as an unknown user
    "relay_and_unknown_user": "expected 554 5.7.1, got [b'550 Cannot receive for specified "
                              "address']",
    # <LF>.<LF> smuggling: the message with bare LFs is accepted
    "smuggling_bare_lf": "expected 550 5.6.0, got [b'250 Delivery in progress']",
    # <CR>.<LF> smuggling: the message with a bare CR is accepted
    "smuggling_cr_dot_lf": "expected 550 5.6.0, got [b'250 Delivery in progress']",
    # a MAIL pipelined after STARTTLS is answered inside TLS (CVE-2011-0411)
    "starttls_injection_mx": "expected no reply within 0.4 s, got b'250 Sender address "
                             "accepted",
    # an AUTH pipelined after STARTTLS logs the client in inside TLS
    "starttls_injection_submission": "expected no reply, got b'235 Authentication successful.",
    # MAIL before HELO/EHLO is accepted
    "syntax_errors": "expected 503 5.5.1, got [b'250 Sender address accepted']",
    # no error limit: the 21st bad command does not close the connection
    "too_many_errors": "expected 421 4.7.0, got no reply within 30.0 s",
    # no recipient limit
    # a message with 50 Received: fields is accepted (to be bounced later to a forgeable sender)
    "received_loop": "expected 554 5.4.6, got [b'250 Delivery in progress']",
    # a submitted message whose From: names another user is accepted
    "from_header_spoof": "expected 553 5.7.1, got [b'250 Delivery in progress']",
    # eleven ESMTP parameters on MAIL are accepted
    "mail_parameters_flood": "expected 501 5.5.4, got [b'250 Sender address accepted']",
    # a NUL in the body is stored
    "nul_in_data": "expected 550 5.6.0, got [b'250 Delivery in progress']",
    "too_many_recipients": "expected 452 4.5.3, got [b'250 Recipient address accepted']",
    # EXPN (a known command we do not implement) gets 500 "unknown" instead of 502
    "unknown_command": "expected 502 5.5.1, got [b'500 Command not implemented']",
}


def test_every_dialog_names_its_stock_defect():
    assert sorted(DEFECTS) == DIALOGS


@pytest.mark.parametrize("name", DIALOGS)
def test_dialog_fails_on_stock_twisted_for_its_defect(name):
    world = StockWorld()
    with pytest.raises(AssertionError, match=re.escape(DEFECTS[name])):
        run_dialog(world.connect, world.count_for, dialog_path(name), enhanced_codes=False,
                   advertised=False)

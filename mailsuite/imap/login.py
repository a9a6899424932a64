"""The commands of the not-authenticated state (RFC 3501 §6.2): STARTTLS, LOGIN and
AUTHENTICATE PLAIN (SASL-IR, RFC 4959), and the login timeout. Mixed into
`server.IMAPServer`; why STARTTLS discards what was pipelined after it, and the limits before
login: docs/design/imap.md, "STARTTLS" and "Limits".
"""
from __future__ import annotations

import base64
from typing import Any, Callable, Optional

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from mailsuite.directory.api import DirectoryService, DirectoryUnavailable
from mailsuite.imap import responses as R
from mailsuite.imap.parser import Token, astring
from mailsuite.imap.responses import bad, no
from mailsuite.imap.session import MAX_LINE, Session
from mailsuite.mailbox import MailStoreAPI
from mailsuite.metrics import Metrics
from mailsuite.notify import ChangeHub
from mailsuite.tls import TLSMaterial

log = Logger()


class LoginCommands(Session):
    """STARTTLS, LOGIN, AUTHENTICATE and what a successful login switches on."""

    directory: DirectoryService
    mailstore: MailStoreAPI
    metrics: Metrics
    changes: Optional[ChangeHub]
    tls_material: Optional[TLSMaterial]
    auth_failures: int
    tag: bytes
    segments: list
    MAX_LENGTH: int
    _login_call: Optional[IDelayedCall]
    on_authenticated: Callable[[], None]
    capabilities: Callable[[], bytes]
    clearLineBuffer: Callable[[], Any]
    read_continuation: Callable[[], Any]

    def do_STARTTLS(self, tag: bytes, args: list[Token]) -> None:
        if self.tls:
            raise bad("TLS is already active")
        if self.tls_material is None:
            raise no("TLS is not available")
        # Anything the client pipelined after STARTTLS was sent in plaintext: discard it.
        self.clearLineBuffer()
        self.segments = []
        self.send(tag + b" OK Begin TLS negotiation now")
        self.transport.startTLS(self.tls_material.server_context())
        self.tls = True
        return None  # already answered

    @defer.inlineCallbacks
    def do_LOGIN(self, tag: bytes, args: list[Token]):
        if not self.tls:
            raise no("LOGIN is disabled before STARTTLS", R.PRIVACYREQUIRED)
        if len(args) != 2:
            raise bad("LOGIN needs a user name and a password")
        user, password = astring(args[0]), astring(args[1])
        result = yield self.login(user, password)
        return result

    @defer.inlineCallbacks
    def do_AUTHENTICATE(self, tag: bytes, args: list[Token]):
        if not args:
            raise bad("AUTHENTICATE needs a mechanism")
        mech = astring(args[0]).upper()
        if mech != b"PLAIN":
            raise no("unsupported authentication mechanism")
        if not self.tls:
            raise no("authentication is disabled before STARTTLS", R.PRIVACYREQUIRED)
        if len(args) > 1:  # SASL-IR (RFC 4959)
            response = astring(args[1])
        else:
            self.send(b"+ ")
            response = yield self.read_continuation()
            self.pauseProducing()
        if response.strip() == b"*":
            raise bad("AUTHENTICATE cancelled")
        if response == b"=":
            response = b""
        try:
            decoded = base64.b64decode(response.strip(), validate=True)
            authzid, user, password = decoded.split(b"\0")
        except (ValueError, TypeError):
            raise bad("malformed PLAIN response")
        if authzid and authzid.lower() != user.lower():
            # RFC 4616 §2: acting as another user is not supported.
            raise no("authorization identity not permitted", R.AUTHENTICATIONFAILED)
        result = yield self.login(user, password)
        return result

    @defer.inlineCallbacks
    def login(self, user_raw: bytes, password_raw: bytes):
        user = user_raw.decode("utf-8", "replace").strip()
        password = password_raw.decode("utf-8", "replace")
        try:
            # The directory slows repeated failures from one address down (its LoginThrottle).
            canonical = yield self.directory.authenticate(user, password, client_ip=self.peer)
        except DirectoryUnavailable as e:
            self.metrics.auth("imap", "tempfail")
            log.warn("imap: login of {user} from {peer}: directory unavailable: {error}",
                     user=user[:100], peer=self.peer, error=str(e)[:200])
            raise no("temporary failure, try again later", R.UNAVAILABLE)
        except UnauthorizedLogin:
            self.auth_failures += 1
            self.metrics.auth("imap", "failure")
            log.warn("imap: authentication failed for {user} from {peer} (failure {n})",
                     user=user[:100], peer=self.peer, n=self.auth_failures)
            if self.auth_failures >= self.config.limits.max_auth_failures:
                self.send(self.tag + b" NO " + R.code(R.AUTHENTICATIONFAILED) + b"authentication failed")
                self.send(b"* BYE too many authentication failures")
                self.hangup()
                self.closed = True
                return None
            raise no("authentication failed", R.AUTHENTICATIONFAILED)
        account = self.mailstore.account(canonical)
        yield self.io(account.ensure_layout)  # first login creates Sent, Drafts, ...
        self.user, self.account = canonical, account
        self.state = "auth"
        self.MAX_LENGTH = MAX_LINE
        if self._login_call is not None and self._login_call.active():
            self._login_call.cancel()
        self._login_call = None
        self.on_authenticated()
        self.metrics.auth("imap", "success")
        if self.changes is not None:
            self.changes.sessions.add(canonical, self)
        log.info("imap: {user} logged in from {peer}", user=canonical, peer=self.peer)
        return R.code(b"CAPABILITY", self.capabilities()) + b"logged in"

    def _login_expired(self) -> None:
        self._login_call = None
        if self.state == "notauth" and not self.closed:
            log.info("imap: no login from {peer} within {n} s: closing", peer=self.peer,
                     n=self.config.imap.login_timeout)
            self.send(b"* BYE no login in time")
            self.hangup()

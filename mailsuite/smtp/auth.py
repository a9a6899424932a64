"""SMTP AUTH for the SMTP server (RFC 4954): PLAIN (RFC 4616) and LOGIN
(draft-murchison-sasl-login), the continuation lines, the check against the directory and the
held-back failure reply (docs/design/smtp.md). A mixin of `SMTPServer`; `do_AUTH` itself, which
decides whether AUTH is allowed at all, stays with the other commands in server.py.
"""
from __future__ import annotations

import binascii

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsuite.directory.api import DirectoryUnavailable
from mailsuite.smtp import replies
from mailsuite.smtp.replies import Reply

log = Logger(namespace="mailsuite.smtp.server")


class AuthExchange:
    """The AUTH half of `SMTPServer` (state in `self._auth_state`, `self._auth_failures`)."""

    def _auth_continue(self, line: bytes) -> Reply | defer.Deferred:
        state, self._auth_state, self._mode = self._auth_state, (), "command"
        self._command = "AUTH (continuation)"
        try:
            text = line.decode("ascii").strip()
        except UnicodeDecodeError:
            return replies.AUTH_BAD_ENCODING
        if text == "*":
            return replies.AUTH_CANCELLED
        if state[0] == "plain":
            return self._auth_plain(text)
        if state[0] == "login-user":
            return self._auth_login_user(text)
        if state[0] == "login-pass":
            password = decode_b64(text)
            if password is None:
                return replies.AUTH_BAD_ENCODING
            return self._verify(state[1], password)
        return replies.BAD_SEQUENCE

    def _auth_plain(self, b64: str) -> Reply | defer.Deferred:
        decoded = b"" if b64 == "=" else decode_b64(b64)
        if decoded is None:
            return replies.AUTH_BAD_ENCODING
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            return replies.AUTH_BAD_ENCODING
        try:
            authzid, authcid, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            return replies.AUTH_BAD_ENCODING
        if authzid and authzid.lower() != authcid.lower():
            # Acting as someone else (RFC 4616 authzid) is not supported: a failed login.
            return self._auth_failed(authcid, "authzid differs")
        return self._verify(authcid, password)

    def _auth_login_user(self, b64: str) -> Reply:
        decoded = decode_b64(b64)
        if decoded is None:
            return replies.AUTH_BAD_ENCODING
        try:
            user = decoded.decode("utf-8")
        except UnicodeDecodeError:
            return replies.AUTH_BAD_ENCODING
        self._mode, self._auth_state = "auth", ("login-pass", user)
        return replies.auth_challenge(encode_b64(b"Password:"))

    def _verify(self, user: str | bytes, password: str | bytes) -> defer.Deferred | Reply:
        if isinstance(user, bytes) or isinstance(password, bytes):
            try:
                user = user.decode("utf-8") if isinstance(user, bytes) else user
                password = (password.decode("utf-8") if isinstance(password, bytes)
                            else password)
            except UnicodeDecodeError:
                return replies.AUTH_BAD_ENCODING
        if not user or not password:
            return self._auth_failed(user, "empty user or password")
        # The directory counts failures in its throttle (shared with IMAP and POP3) and holds
        # back its answer by the throttle's delay.
        d = defer.maybeDeferred(self.factory.directory.authenticate, user, password,
                                client_ip=self.client_ip)

        def ok(canonical: str) -> Reply:
            self.session.auth_user = canonical
            log.info("authenticated {user} from {client_ip}", user=canonical,
                     client_ip=self.client_ip)
            if self.on_authenticated is not None:
                self.on_authenticated()
            self.factory.metrics.auth("smtp", "success")
            return replies.AUTH_OK

        def failed(failure: Failure) -> Reply | defer.Deferred:
            if failure.check(UnauthorizedLogin):
                return self._auth_failed(user, "bad credentials", delay=0.0)
            if failure.check(DirectoryUnavailable):
                log.warn("authentication unavailable for {client_ip}: {error}",
                         client_ip=self.client_ip, error=str(failure.value))
                self._refusal_logged = True
            else:
                log.failure("authentication backend error for {client_ip}", failure,
                            client_ip=self.client_ip)
            self.factory.metrics.auth("smtp", "tempfail")
            return replies.AUTH_TEMP_FAILURE

        return d.addCallbacks(ok, failed)

    def _auth_failed(self, user: str, why: str, delay: float | None = None) -> defer.Deferred:
        """Answer a failed AUTH after `delay` seconds; None means a failure the directory never
        saw (refused before asking it), which we count in its throttle ourselves."""
        self._auth_failures += 1
        self.factory.metrics.auth("smtp", "failure")
        log.warn("authentication failed for {user!r} from {client_ip} ({why}; failure {n} on this "
                 "connection)", user=user[:100], client_ip=self.client_ip, why=why,
                 n=self._auth_failures)
        if delay is None:  # counted by every instance (docs/design/limits.md, "Login throttle")
            counted = self.factory.directory.throttle.count_failure(self.client_ip,
                                                                    user.lower()[:320])
            return counted.addCallback(self._auth_failed_after)
        return self._auth_failed_after(delay)

    def _auth_failed_after(self, delay: float) -> defer.Deferred:
        # The delay slows down password guessing without blocking anyone else.
        d: defer.Deferred = defer.Deferred()
        call = self.clock.callLater(delay, d.callback, None)

        def answer(_: None) -> Reply | None:
            if self._closed:
                return None
            if self._auth_failures >= self.limits.max_auth_failures:
                self._send(replies.AUTH_FAILED)
                self._send(replies.AUTH_TOO_MANY_FAILURES)
                self._close(linger=0.5)
                return None
            return replies.AUTH_FAILED

        d.addCallback(answer)
        self._delayed_calls.append(call)
        return d


def encode_b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def decode_b64(text: str) -> bytes | None:
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None

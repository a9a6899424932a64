"""Who may do what on an SMTP port: the MX policy (port 25) and the submission policy (587/465).

The protocol class (server.py) parses and replies; it asks its policy whether AUTH is offered
and allowed, and whether a sender or a recipient is acceptable. Policies ask the directory and
return Deferreds of replies, never touching SQL themselves (docs/design/smtp.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generator

from twisted.internet import defer
from twisted.python.failure import Failure

from mailsuite.config import Config
from mailsuite.directory.addresses import sender_allowed
from mailsuite.directory.api import DirectoryService, DirectoryUnavailable, Route
from mailsuite.smtp import replies
from mailsuite.smtp.headers import header_addresses
from mailsuite.smtp.replies import Reply
from mailsuite.trust.srs import SRS, SRSError



@dataclass
class Session:
    """What a policy may look at: facts about the connection, reset by STARTTLS (RFC 3207 §4.2)."""

    client_ip: str
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    auth_user: str | None = None
    # The addresses auth_user may send as, read at this transaction's MAIL and reused by the
    # From:/Sender: check of the same message (one directory look-up per message, not two).
    owned: frozenset[str] | None = None


@dataclass
class RecipientDecision:
    reply: Reply
    route: Route | None = None  # when accepted
    problem: str = ""  # an environment fault behind a temporary reply, for the server's log line


class Policy:
    """Base: accept nothing that a subclass does not allow."""

    name = "base"
    add_missing_headers = False  # Message-ID and Date (RFC 6409 §8.2/8.3 allow a MSA to add them)
    accepts_auth = False  # AUTH exists on this port at all (else 502 to any AUTH)
    checks_from_header = False  # From:/Sender: must be the user's ([smtp] check_from_header)

    def __init__(self, directory: DirectoryService, config: Config, srs: SRS | None = None):
        self.directory = directory
        self.config = config
        self.srs = srs  # reverses bounces to the senders we rewrote (mailsuite.trust.srs)

    def auth_offered(self, session: Session) -> bool:
        """Advertise AUTH in this session's EHLO reply."""
        return False

    def auth_refusal(self, session: Session) -> Reply | None:
        """Why AUTH may not be used in this session now (asked after the sequence checks), or
        None."""
        return replies.AUTH_NOT_OFFERED

    def check_sender(self, session: Session, sender: str) -> defer.Deferred:
        return defer.succeed(replies.SENDER_OK)

    def check_recipient(self, session: Session, address: str) -> defer.Deferred:
        return defer.succeed(RecipientDecision(replies.RELAY_DENIED))

    def check_header_senders(self, session: Session, from_values: list[bytes],
                             sender_values: list[bytes]) -> defer.Deferred:
        """A Deferred reply (None: fine) to the raw From:/Sender: values of a message."""
        return defer.succeed(None)

    def route(self, address: str) -> defer.Deferred:
        """The directory's Route; bare "postmaster" (RFC 5321 §4.1.1.3) is postmaster of our
        host name, or the configured admin address when that is not a hosted domain."""
        if address == "postmaster":
            return self._postmaster_route()
        try:
            return self.directory.route(address)
        except Exception:
            return defer.fail()

    @defer.inlineCallbacks
    def _postmaster_route(self) -> Generator[defer.Deferred, Route, Route]:
        directory = self.directory
        route = yield directory.route("postmaster@" + self.config.hostname)
        admin = self.config.server.admin_address
        if not route.exists and admin:
            route = yield directory.route(admin)
            if not route.hosted:
                # Forwarded like an alias to a remote target.
                route = Route("postmaster", hosted=True, remote=(admin,))
        return route


class MXPolicy(Policy):
    """Port 25: mail for our users from anyone, never relaying, never AUTH."""

    name = "mx"

    def check_recipient(self, session: Session, address: str) -> defer.Deferred:
        # Plain callbacks, not inlineCallbacks: this runs for every recipient.
        if self.srs is not None and self.srs.is_srs(address):
            # A bounce (or reply) to a sender we rewrote when forwarding: it goes back to the
            # original sender, but only if we made this address (docs/design/trust.md).
            try:
                original = self.srs.reverse(address)
            except SRSError as e:
                return defer.succeed(RecipientDecision(replies.BAD_SRS_ADDRESS.with_text(
                    f"{replies.BAD_SRS_ADDRESS.text}: {e}")))
            return defer.succeed(RecipientDecision(
                replies.RECIPIENT_OK, Route(address, hosted=True, remote=(original,))))
        return self.route(address).addCallbacks(_mx_decision, _lookup_failed)


def _mx_decision(route: Route) -> RecipientDecision:
    if not route.hosted:
        # MX never offers AUTH, so nobody here may relay.
        return RecipientDecision(replies.RELAY_DENIED)
    if not route.exists:
        return RecipientDecision(replies.UNKNOWN_USER)
    return RecipientDecision(replies.RECIPIENT_OK, route)


class SubmissionPolicy(Policy):
    """Ports 587/465: authenticated users only, sending as themselves, to any domain (RFC 6409)."""

    name = "submission"
    add_missing_headers = True
    accepts_auth = True
    checks_from_header = True

    def auth_offered(self, session: Session) -> bool:
        # Passwords never travel in clear text: AUTH is advertised and accepted only under TLS.
        return session.tls and session.auth_user is None

    def auth_refusal(self, session: Session) -> Reply | None:
        return None if session.tls else replies.AUTH_NEEDS_TLS

    def check_sender(self, session: Session, sender: str) -> defer.Deferred:
        if session.auth_user is None:
            return defer.succeed(replies.AUTH_REQUIRED)
        if sender == "":
            # Bounces come from MTAs on port 25, not from users (RFC 6409 §4.1).
            return defer.succeed(replies.NOT_YOUR_ADDRESS)
        session.owned = None
        return self._owned_check(session, lambda owned: sender_allowed(owned, sender)
                                 ).addCallback(lambda ok: replies.SENDER_OK if ok else
                                               replies.NOT_YOUR_ADDRESS)

    def _owned_check(self, session: Session, allowed: Callable[[frozenset[str]], bool],
                     owned: frozenset[str] | None = None) -> defer.Deferred:
        """Deferred[bool]: whether `allowed` holds for the user's sender addresses (`owned`, or
        the directory's, perhaps remembered: directory.md, "Lookup cache"). A no is asked again
        of the database before it stands, so an address given a moment ago is never refused."""
        user = session.auth_user
        directory = self.directory

        def judge(owned: frozenset[str], fresh: bool) -> Any:
            session.owned = owned
            ok = allowed(owned)
            if ok or fresh:
                return ok
            return directory.sender_addresses(user, fresh=True).addCallback(judge, True)

        if owned is not None:
            return defer.maybeDeferred(judge, owned, False)
        return directory.sender_addresses(user).addCallback(judge, False)

    def check_header_senders(self, session: Session, from_values: list[bytes],
                             sender_values: list[bytes]) -> defer.Deferred:
        """Every address of every From: and Sender: field must be one the user may send as
        (the same set as MAIL FROM); a field we cannot parse is refused, not guessed at."""
        addresses: list[str] = []
        for raw in from_values + sender_values:
            found = header_addresses(raw)
            if found is None:
                return defer.succeed(replies.FROM_NOT_YOURS)
            addresses += found
        if not addresses or session.auth_user is None:
            return defer.succeed(None)  # no From: at all: nothing claims to be anyone

        return self._owned_check(
            session, lambda owned: all(sender_allowed(owned, a) for a in addresses),
            session.owned).addCallback(lambda ok: None if ok else replies.FROM_NOT_YOURS)

    def check_recipient(self, session: Session, address: str) -> defer.Deferred:
        if session.auth_user is None:
            return defer.succeed(RecipientDecision(replies.AUTH_REQUIRED))
        return self.route(address).addCallbacks(_submission_decision, _lookup_failed)


def _submission_decision(route: Route) -> RecipientDecision:
    if route.hosted and not route.exists:
        return RecipientDecision(replies.UNKNOWN_USER)
    # Remote recipients are queued for the courier; the Route (hosted=False) says so.
    return RecipientDecision(replies.RECIPIENT_OK, route)


def _lookup_failed(failure: Failure) -> RecipientDecision | Failure:
    """A directory outage is temporary (451), never a reason to refuse mail for good."""
    if failure.check(DirectoryUnavailable):
        # Logged by the server, in the one line of this refusal.
        return RecipientDecision(replies.TEMP_LOOKUP_FAILURE,
                                 problem=f"directory unavailable: {failure.value}")
    return failure


POLICIES = {"mx": MXPolicy, "submission": SubmissionPolicy}

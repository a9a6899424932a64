"""The policies decide; the protocol only asks (docs/design/smtp.md, "Policy and mechanics").

MXPolicy (port 25): mail for our users from anyone, no relaying, no AUTH.
SubmissionPolicy (587/465): AUTH under TLS only, users send as themselves, to anywhere.
"""
from __future__ import annotations

from twisted.internet import task

from mailsuite.directory.api import DirectoryService, Route
from mailsuite.smtp import replies
from mailsuite.smtp.policy import MXPolicy, Session, SubmissionPolicy
from tests.unit.smtpkit import FakeDirectory, unit_config


def result(d):
    out = []
    d.addBoth(out.append)
    assert out, "the policy did not answer"
    return out[0]


def policies():
    directory = FakeDirectory(task.Clock())
    config = unit_config()
    return directory, MXPolicy(directory, config), SubmissionPolicy(directory, config)


def test_the_fake_directory_is_a_directory_service():
    assert isinstance(FakeDirectory(task.Clock()), DirectoryService)


def test_auth_is_a_policy_decision():
    _, mx, submission = policies()
    clear, tls = Session("192.0.2.1"), Session("192.0.2.1", tls=True)
    assert not mx.accepts_auth and not mx.auth_offered(tls)
    assert mx.auth_refusal(tls) == replies.AUTH_NOT_OFFERED
    assert submission.accepts_auth
    assert not submission.auth_offered(clear) and submission.auth_offered(tls)
    assert submission.auth_refusal(clear) == replies.AUTH_NEEDS_TLS
    assert submission.auth_refusal(tls) is None
    tls.auth_user = "alice@example.org"
    assert not submission.auth_offered(tls)  # already authenticated


def test_mx_recipients():
    _, mx, _ = policies()
    s = Session("192.0.2.1")
    assert result(mx.check_recipient(s, "Alice+x@Example.org")).reply == replies.RECIPIENT_OK
    assert result(mx.check_recipient(s, "nobody@example.org")).reply == replies.UNKNOWN_USER
    assert result(mx.check_recipient(s, "x@elsewhere.example")).reply == replies.RELAY_DENIED
    assert result(mx.check_sender(s, "")) == replies.SENDER_OK


def test_bare_postmaster_goes_to_the_admin_address():
    # RFC 5321 §4.1.1.3; our host name is not a hosted domain, so the admin address is used.
    _, mx, _ = policies()
    decision = result(mx.check_recipient(Session("192.0.2.1"), "postmaster"))
    assert decision.reply == replies.RECIPIENT_OK
    assert decision.route.mailboxes == ("postmaster@example.org",)


def test_directory_outage_is_temporary():
    directory, mx, submission = policies()
    directory.unavailable = True
    user = Session("192.0.2.1", tls=True, auth_user="alice@example.org")
    assert result(mx.check_recipient(Session("192.0.2.1"), "alice@example.org")).reply \
        == replies.TEMP_LOOKUP_FAILURE
    assert result(submission.check_recipient(user, "bob@example.org")).reply \
        == replies.TEMP_LOOKUP_FAILURE


def test_submission_needs_auth_and_own_address():
    _, _, submission = policies()
    anonymous = Session("192.0.2.1", tls=True)
    user = Session("192.0.2.1", tls=True, auth_user="alice@example.org")
    assert result(submission.check_sender(anonymous, "alice@example.org")) \
        == replies.AUTH_REQUIRED
    assert result(submission.check_recipient(anonymous, "bob@example.org")).reply \
        == replies.AUTH_REQUIRED
    assert result(submission.check_sender(user, "alice@example.org")) == replies.SENDER_OK
    assert result(submission.check_sender(user, "Alice+lists@example.org")) == replies.SENDER_OK
    assert result(submission.check_sender(user, "bob@example.org")) == replies.NOT_YOUR_ADDRESS
    assert result(submission.check_sender(user, "")) == replies.NOT_YOUR_ADDRESS
    remote = result(submission.check_recipient(user, "x@elsewhere.example"))
    assert remote.reply == replies.RECIPIENT_OK and remote.route == Route(
        "x@elsewhere.example", hosted=False)
    assert result(submission.check_recipient(user, "nobody@example.org")).reply \
        == replies.UNKNOWN_USER

"""Why a client was refused, in one word (mailsuite/smtp/reasons.py): every refusal leaving the
SMTP server is reported with its reason, including the replies the trust checks build; and what
the SMTP server puts in the queue entry for the message's events (Message-ID, listener)."""
from __future__ import annotations

from twisted.internet import task

from mailsuite.config import GreylistSection, RateLimitSection
from mailsuite.smtp import replies
from mailsuite.smtp.headers import HeaderScan
from mailsuite.smtp.reasons import reason_of
from mailsuite.trust.checks import DMARC_TEMPFAIL, dmarc_reject_reply
from mailsuite.trust.clamd import UNAVAILABLE as CLAMD_UNAVAILABLE
from mailsuite.trust.clamd import interpret
from mailsuite.trust.greylist import Greylist
from mailsuite.trust.ratelimit import RateLimits
from mailsuite.trust.rspamd import SPAM, TRY_LATER
from tests.unit.limitskit import make_directory, result_of
from tests.unit.smtpkit import World


def test_every_refusing_reply_constant_has_a_reason():
    refusing = {name: value for name, value in vars(replies).items()
                if isinstance(value, replies.Reply) and value.code >= 400}
    assert refusing  # the module still has them
    unknown = [name for name, value in refusing.items() if reason_of(value) == "other"]
    assert unknown == []
    assert reason_of(replies.RELAY_DENIED) == "relay_denied"
    assert reason_of(replies.UNKNOWN_USER) == "unknown_user"


def test_the_trust_checks_refusals_name_their_reason(tmp_path, prepared_directory):
    clock = task.Clock()
    clock.advance(1_700_000_000)
    directory = make_directory(tmp_path, clock, prepared_directory(str(tmp_path / "directory.db")))
    try:
        limits = RateLimits(directory, RateLimitSection(
            mx_connections_per_minute=1, mx_recipients_per_minute=1,
            submission_messages_per_hour=1, submission_recipients_per_hour=1), clock)
        refused = []
        for hit in (lambda: limits.connection("198.51.100.7"),
                    lambda: limits.recipient("198.51.100.7"),
                    lambda: limits.submission_message("alice@example.org"),
                    lambda: limits.submission_recipient("alice@example.org")):
            assert result_of(hit()) is None
            refused.append(result_of(hit()))
        assert [reason_of(r) for r in refused] == ["rate_limit"] * 4
        greylist = Greylist(directory, GreylistSection(enabled=True), clock, [])
        reply = result_of(greylist.check("198.51.100.7", "a@b.example", "c@d.example"))
        assert reason_of(reply) == "greylisted"
    finally:
        directory.close()
    assert reason_of(interpret("stream: Eicar-Test-Signature FOUND").reply) == "virus"
    assert reason_of(dmarc_reject_reply("b.example", "fail", "none")) == "dmarc"
    assert reason_of(DMARC_TEMPFAIL) == "dmarc"
    assert reason_of(SPAM) == "spam" and reason_of(TRY_LATER) == "spam"
    assert reason_of(CLAMD_UNAVAILABLE) == "scanner_unavailable"
    assert reason_of(replies.Reply(550, "5.0.0", "something new")) == "other"


def test_a_reply_that_names_its_reason_is_taken_at_its_word():
    assert reason_of(replies.Reply(550, "5.7.1", "Relay access denied", "custom")) == "custom"


def test_the_server_reports_each_refusal_with_its_listener_and_reason():
    world = World()
    c = world.connect("mx")
    c.ehlo()
    c.send(b"MAIL FROM:<x@remote.example>\r\n")
    assert c.code() == 250
    c.send(b"RCPT TO:<nobody@example.org>\r\n")
    assert c.code() == 550
    c.send(b"RCPT TO:<someone@elsewhere.example>\r\n")
    assert c.code() == 554
    c.send(b"RCPT TO:<alice@example.org>\r\n")
    assert c.code() == 250  # accepted: nothing reported
    s = world.connect("submission")
    s.ehlo()
    s.send(b"MAIL FROM:<alice@example.org>\r\n")
    assert s.code() == 530
    assert world.refusals == [("mx", "unknown_user"), ("mx", "relay_denied"),
                              ("submission", "auth_required")]


def test_the_first_message_id_is_kept_unfolded():
    scan = HeaderScan()
    for line in (b"Subject: x", b"Message-ID:", b"  <a.b@example.org>", b"Message-ID: <2@x>",
                 b""):
        scan.line(line)
    assert scan.message_id == "<a.b@example.org>"
    assert scan.has_message_id


def test_the_queue_entry_names_the_listener_and_message_id():
    world = World()
    c = world.connect("mx")
    c.ehlo()
    c.send(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert [c.code() for _ in range(3)] == [250, 250, 354]
    c.send(b"Message-ID: <id-1@remote.example>\r\nSubject: hi\r\n\r\nbody\r\n.\r\n")
    assert c.code() == 250
    (queued,) = world.queue.messages
    assert queued.meta["listener"] == "mx"
    assert queued.meta["message_id"] == "<id-1@remote.example>"
    assert queued.meta["tls"] == ""

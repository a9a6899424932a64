"""What a message may contain: NUL and bare CR/LF ([smtp] bad_line_endings), too many Received:
fields (a loop, refused at DATA), and on submission the From:/Sender: fields of the
authenticated user only ([smtp] check_from_header)."""
from __future__ import annotations

import base64

import pytest

from mailsuite.config import ConfigError
from mailsuite.dotstuff import dot_stuff
from tests.unit.smtpkit import World

ALICE_PLAIN = base64.b64encode(b"\0alice@example.org\0secret-pw-1")


def transaction(c, body: bytes, sender=b"x@remote.example", rcpt=b"alice@example.org"):
    c.send(b"MAIL FROM:<" + sender + b">\r\nRCPT TO:<" + rcpt + b">\r\nDATA\r\n")
    codes = [c.code() for _ in range(3)]
    assert codes == [250, 250, 354], codes
    c.send(body + b".\r\n")
    return c.reply()[0]


def mx(**smtp):
    world = World(smtp=smtp)
    c = world.connect("mx")
    c.ehlo()
    return world, c


def submission(check=True):
    world = World(smtp={"check_from_header": check})
    c = world.connect("submissions")
    c.ehlo()
    c.send(b"AUTH PLAIN " + ALICE_PLAIN + b"\r\n")
    assert c.code() == 235
    return world, c


def submit(c, headers: bytes, sender=b"alice@example.org"):
    return transaction(c, headers + b"\r\nbody\r\n", sender=sender, rcpt=b"bob@example.org")


# -- NUL and bare line ends --------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["reject", "normalise"])
@pytest.mark.parametrize("body", [b"Subject: a\0b\r\n\r\nx\r\n", b"Subject: a\r\n\r\n\0\r\n",
                                  b"Subject: a\r\n\r\n" + b"x" * 500 + b"\0\r\n"])
def test_nul_is_refused_in_both_modes(mode, body):
    world, c = mx(bad_line_endings=mode)
    assert transaction(c, body).startswith(b"550 5.6.0")
    assert world.queue.messages == [] and world.queue.staged() == []
    # The session goes on.
    assert transaction(c, b"Subject: ok\r\n\r\nfine\r\n").startswith(b"250")


@pytest.mark.parametrize("body", [b"Subject: a\r\n\r\none\ntwo\r\n",
                                  b"Subject: a\r\n\r\none\rtwo\r\n",
                                  b"Subject: a\r\n\r\nend\r\r\n", b"Subject: a\n\r\nx\r\n"])
def test_bare_line_ends_are_refused_by_default(body):
    world, c = mx()
    assert transaction(c, body).startswith(b"550 5.6.0")
    assert world.queue.messages == []


def test_bare_line_ends_are_stored_as_crlf_when_normalising():
    world, c = mx(bad_line_endings="normalise")
    body = b"Subject: a\nX-Other: b\r\n\r\none\ntwo\rthree\r\r\n\n.\nMAIL FROM:<evil@x>\n.\r\n"
    assert transaction(c, body).startswith(b"250")
    data = world.queue.messages[0].data
    stored = data.split(b"\r\n", 3)[3]  # after our 3-line Received:
    assert stored == (b"Subject: a\r\nX-Other: b\r\n\r\none\r\ntwo\r\nthree\r\n\r\n\r\n.\r\n"
                      b"MAIL FROM:<evil@x>\r\n.\r\n")
    assert b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"")
    # What the courier relays is what the spool holds, dot-stuffed: the smuggled "." lines
    # cannot end the next hop's DATA early.
    wire = dot_stuff(data)
    assert wire.count(b"\r\n.\r\n") == 1 and wire.endswith(b"\r\n.\r\n")


def test_normalised_header_fields_are_seen_by_the_header_checks():
    world, c = mx(bad_line_endings="normalise")
    wire_line = b"\n".join(b"Received: from hop%d" % i for i in range(10))
    fields = b"\r\n".join([wire_line] * 6)  # 60 fields, 10 per wire line
    assert transaction(c, fields + b"\r\n\r\nbody\r\n").startswith(b"554 5.4.6")


def test_unknown_bad_line_endings_value_stops_start_up():
    with pytest.raises(ConfigError, match="bad_line_endings"):
        World(smtp={"bad_line_endings": "fix"})


# -- Received: loop ------------------------------------------------------------------------------
def received(n: int) -> bytes:
    return b"".join(b"Received: from hop%d.example by x; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % i
                    for i in range(n))


def test_too_many_received_fields_are_refused_at_data():
    world, c = mx()
    limit = world.config.queue.max_received_headers
    assert transaction(c, received(limit) + b"Subject: loop\r\n\r\nx\r\n").startswith(
        b"554 5.4.6")
    assert world.queue.messages == [] and world.queue.staged() == []
    # One less: with ours it is exactly the limit, which the queue still delivers.
    assert transaction(c, received(limit - 1) + b"Subject: ok\r\n\r\nx\r\n").startswith(b"250")
    assert world.queue.messages[0].data.count(b"Received: ") == limit


def test_received_in_the_body_does_not_count():
    world, c = mx()
    body = b"Subject: quoting\r\n\r\n" + received(200)
    assert transaction(c, body).startswith(b"250")


def test_folded_received_fields_count_once_each():
    world, c = mx()
    folded = b"".join(b"Received: from a\r\n\tby b\r\n\tfor c;\r\n" for _ in range(10))
    assert transaction(c, folded + b"\r\nx\r\n").startswith(b"250")


# -- From: on submission -----------------------------------------------------------------------
@pytest.mark.parametrize("headers", [
    b"From: alice@example.org\r\n",
    b"From: Alice <alice@example.org>\r\n",
    b"From: =?utf-8?q?Al=C3=AFce?= <alice@example.org>\r\n",
    b"From: alice@example.org (Alice Liddell)\r\n",
    b"From: \"Alice, the one\" <ALICE@Example.org>\r\n",
    b"From: alice+lists@example.org\r\n",
    b"From: Team: alice@example.org;\r\n",
    b"From: Alice\r\n <alice@example.org>\r\n",
    b"From: alice@example.org\r\nSender: alice@example.org\r\n",
    b"Subject: no from at all\r\n",
])
def test_own_from_header_is_accepted(headers):
    world, c = submission()
    assert submit(c, headers).startswith(b"250")


@pytest.mark.parametrize("headers", [
    b"From: bob@example.org\r\n",
    b"From: Alice <bob@example.org>\r\n",
    b"From: \"alice@example.org\" <bob@example.org>\r\n",
    b"From: alice@example.org, bob@example.org\r\n",
    b"From: alice@example.org\r\nFrom: bob@example.org\r\n",
    b"From: alice@example.org\r\nSender: bob@example.org\r\n",
    b"From: Team: alice@example.org, ceo@example.org;\r\n",
    b"From: alice@example.org\r\n <bob@example.org>\r\n",
    b"From: not an address\r\n",
    b"From: <>\r\n",
    b"From: undisclosed-recipients:;\r\n",
    b"From: \xff\xfe@example.org\r\n",
    b"From: ((((((((((((((((((((((((((((\r\n",
    b"From: alice@example.org <bob@evil>\r\n",
    b"From: " + b"(" * 900 + b"\r\n",
    b"From: alice@example.org\r\n" + b" x\r\n" * 5000,
], ids=lambda h: h[:40].decode("latin-1"))
def test_someone_elses_or_unreadable_from_header_is_553(headers):
    world, c = submission()
    assert submit(c, headers).startswith(b"553 5.7.1")
    assert world.queue.messages == [] and world.queue.staged() == []
    assert submit(c, b"From: alice@example.org\r\n").startswith(b"250")  # the session goes on


def test_from_check_uses_the_directorys_sender_addresses():
    world, c = submission()
    original = world.directory.sender_addresses

    def shared(user, **kw):
        d = original(user)
        return d.addCallback(lambda owned: owned | {"team@example.org"})

    world.directory.sender_addresses = shared
    assert submit(c, b"From: Team <team@example.org>\r\n",
                  sender=b"team@example.org").startswith(b"250")


def test_a_shared_domain_right_covers_mail_from_and_from_header():
    """`mailsuite user sender add alice@example.org @shared.example`: the directory answers
    "@shared.example", and any address of that domain may be used, in MAIL FROM and From:."""
    world, c = submission()
    original = world.directory.sender_addresses
    world.directory.sender_addresses = (
        lambda user, **kw: original(user).addCallback(lambda owned: owned | {"@shared.example"}))
    assert submit(c, b"From: Desk <desk@shared.example>\r\n",
                  sender=b"desk@shared.example").startswith(b"250")
    assert submit(c, b"From: mallory@elsewhere.example\r\n").startswith(b"553 5.7.1")


def test_from_check_reuses_the_sender_addresses_read_at_mail_from():
    """One directory look-up per message: MAIL FROM reads the user's addresses, the From: check
    of the same transaction uses them; the next transaction reads them again (a change by the
    admin applies to the next message). A refusal asks once more, from the database itself
    (the first answer may have come from the lookup cache)."""
    world, c = submission()
    looked_up = []
    original = world.directory.sender_addresses

    def counting(user, fresh=False):
        looked_up.append((user, fresh))
        return original(user)

    world.directory.sender_addresses = counting
    assert submit(c, b"From: alice@example.org\r\n").startswith(b"250")
    assert looked_up == [("alice@example.org", False)]
    assert submit(c, b"From: bob@example.org\r\n").startswith(b"553 5.7.1")
    assert looked_up[1:] == [("alice@example.org", False), ("alice@example.org", True)]


def test_from_check_can_be_switched_off():
    world, c = submission(check=False)
    assert submit(c, b"From: bob@example.org\r\n").startswith(b"250")


def test_mx_does_not_check_from():
    world, c = mx()
    assert transaction(c, b"From: bob@example.org\r\n\r\nx\r\n").startswith(b"250")


def test_from_check_during_a_directory_outage_is_temporary():
    """The From: check uses the addresses read at MAIL FROM; when that look-up fails the
    transaction never starts (451), so no message is judged without them."""
    world, c = submission()
    from mailsuite.directory.api import DirectoryUnavailable
    from twisted.internet import defer

    working = world.directory.sender_addresses
    world.directory.sender_addresses = lambda user, **kw: defer.fail(DirectoryUnavailable("down"))
    c.send(b"MAIL FROM:<alice@example.org>\r\n")
    assert c.reply()[0].startswith(b"451 4.3.0")
    world.directory.sender_addresses = working
    c.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    assert [c.code() for _ in range(3)] == [250, 250, 354]
    world.directory.sender_addresses = lambda user, **kw: defer.fail(DirectoryUnavailable("down"))
    c.send(b"From: alice@example.org\r\n\r\nx\r\n.\r\n")
    assert c.reply()[0].startswith(b"250")  # judged with the addresses read at MAIL FROM
    assert world.queue.staged() == []

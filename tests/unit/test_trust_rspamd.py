"""RspamdScanner in memory: treq's StubTreq over a twisted.web Resource playing rspamd, a
task.Clock for the deadline, InlinePool for file reads (docs/design/trust-engines.md)."""
from __future__ import annotations

import json

import pytest
from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.internet.error import ConnectionRefusedError
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mailsuite.config import RspamdSection
from mailsuite.pools import InlinePool
from mailsuite.trust import ACCEPT, JUNK, REJECT, TEMPFAIL, ContentScanner, Envelope, Verdict
from mailsuite.trust.rspamd import RspamdScanner

MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nHello\r\n"
ENVELOPE = Envelope(client_ip="192.0.2.7", helo="mx.example.com", mail_from="a@example.org",
                    recipients=("b@example.net", "c@example.net"), queue_id="Q123")


class FakeRspamd(Resource):
    """Answers /checkv2 with `code` and `body` (or never, when `hang`), recording requests."""

    isLeaf = True

    def __init__(self, code=200, body=b"{}", hang=False):
        super().__init__()
        self.code, self.body, self.hang = code, body, hang
        self.requests = []

    def render_POST(self, request):
        self.requests.append((request.path, request.requestHeaders, request.content.read()))
        if self.hang:
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        return self.body


def answer(action, score=1.5, required=15.0, **extra):
    return json.dumps(dict(action=action, score=score, required_score=required,
                           **extra)).encode()


@pytest.fixture
def message(tmp_path):
    path = tmp_path / "msg"
    path.write_bytes(MESSAGE)
    return str(path)


def make(resource=None, http=None, clock=None, **settings):
    config = RspamdSection(url="http://rspamd.test:11333", **settings)
    stub = http if http is not None else StubTreq(resource)
    return RspamdScanner(config, clock or task.Clock(), "mx.ours.test", InlinePool(),
                         http=stub), stub


def outcome(d):
    """What `d` has fired with, or [] when it has not (yet)."""
    results = []
    d.addBoth(lambda r: results.append(r) or r)
    return results


def scan(scanner, stub, path, size=len(MESSAGE), envelope=ENVELOPE):
    d = scanner.scan(envelope, path, size)
    if hasattr(stub, "flush"):
        stub.flush()
    results = outcome(d)
    assert results, "the scan did not finish"
    verdict = results[0]
    assert isinstance(verdict, Verdict), verdict  # scan never errbacks
    for header in verdict.headers:
        assert "\r" not in header and "\n" not in header
    return verdict


def test_is_a_content_scanner():
    scanner, _ = make(FakeRspamd())
    assert isinstance(scanner, ContentScanner)
    assert scanner.name == "rspamd"


def test_wanted_mx_always_submission_by_config():
    scanner, _ = make(FakeRspamd())
    sub = Envelope("192.0.2.7", "h", "a@b", ("c@d",), auth_user="u", listener="submission")
    assert scanner.wanted(ENVELOPE)
    assert not scanner.wanted(sub)
    scanner2, _ = make(FakeRspamd(), scan_submission=True)
    assert scanner2.wanted(sub)
    off = RspamdScanner(RspamdSection(url=""), task.Clock(), "h", InlinePool(),
                        http=StubTreq(FakeRspamd()))
    assert not off.wanted(ENVELOPE)


def test_request_carries_message_and_envelope(message):
    fake = FakeRspamd(body=answer("no action"))
    scanner, stub = make(fake, password="s3cret")
    env = Envelope("192.0.2.7", "mx.example.com", "a@example.org",
                   ("b@example.net", "c@example.net"), auth_user="alice", queue_id="Q1")
    scan(scanner, stub, message, envelope=env)
    (path, headers, body), = fake.requests
    assert path == b"/checkv2"
    assert body == MESSAGE
    raw = headers.getRawHeaders
    assert raw(b"IP") == [b"192.0.2.7"]
    assert raw(b"Helo") == [b"mx.example.com"]
    assert raw(b"From") == [b"a@example.org"]
    assert raw(b"Rcpt") == [b"b@example.net", b"c@example.net"]
    assert raw(b"User") == [b"alice"]
    assert raw(b"Queue-Id") == [b"Q1"]
    assert raw(b"MTA-Name") == [b"mx.ours.test"]
    assert raw(b"Password") == [b"s3cret"]
    # Hostname is the client's verified name in rspamd's protocol; we never claim one.
    assert raw(b"Hostname") is None


def test_no_user_or_password_when_none_and_null_sender(message):
    fake = FakeRspamd(body=answer("no action"))
    scanner, stub = make(fake)
    env = Envelope("192.0.2.7", "h", "", ("b@example.net",))
    scan(scanner, stub, message, envelope=env)
    _, headers, _ = fake.requests[0]
    assert headers.getRawHeaders(b"User") is None
    assert headers.getRawHeaders(b"Password") is None
    assert headers.getRawHeaders(b"From") == [b"<>"]


def test_envelope_values_cannot_split_request_headers(message):
    fake = FakeRspamd(body=answer("no action"))
    scanner, stub = make(fake)
    env = Envelope("192.0.2.7", "evil\r\nX-Injected: 1", "a@b", ("c@d",))
    scan(scanner, stub, message, envelope=env)
    _, headers, _ = fake.requests[0]
    assert headers.getRawHeaders(b"X-Injected") is None
    assert headers.getRawHeaders(b"Helo") == [b"evilX-Injected: 1"]


def test_no_action_accepts_with_score_headers(message):
    scanner, stub = make(FakeRspamd(body=answer("no action", score=0.9)))
    v = scan(scanner, stub, message)
    assert v.disposition == ACCEPT and v.reply is None
    assert v.headers == ["X-Spam-Status: No, score=0.90 required=15.00", "X-Spam-Score: 0.90"]
    assert "no action" in v.log


@pytest.mark.parametrize("action", ["add header", "rewrite subject"])
def test_add_header_junks_by_default(message, action):
    scanner, stub = make(FakeRspamd(body=answer(action, score=7.2)))
    v = scan(scanner, stub, message)
    assert v.disposition == JUNK
    assert v.headers == ["X-Spam-Status: Yes, score=7.20 required=15.00", "X-Spam-Score: 7.20"]


def test_add_header_only_headers_when_configured(message):
    scanner, stub = make(FakeRspamd(body=answer("add header", score=7.2)),
                         add_header_action="header")
    v = scan(scanner, stub, message)
    assert v.disposition == ACCEPT
    assert "X-Spam-Status: Yes, score=7.20 required=15.00" in v.headers


@pytest.mark.parametrize("action", ["greylist", "soft reject"])
def test_greylist_and_soft_reject_tempfail(message, action):
    scanner, stub = make(FakeRspamd(body=answer(action)))
    v = scan(scanner, stub, message)
    assert v.disposition == TEMPFAIL
    assert (v.reply.code, v.reply.enhanced, v.reply.text) == (451, "4.7.1", "try again later")


def test_soft_reject_text_from_rspamd_is_sanitised(message):
    body = answer("soft reject", messages={"smtp_message": "Rate\r\nlimit\x00 exceeded \u00e9!"})
    scanner, stub = make(FakeRspamd(body=body))
    v = scan(scanner, stub, message)
    assert v.reply.code == 451 and v.reply.enhanced == "4.7.1"
    assert v.reply.text == "Rate limit exceeded !"
    assert all(" " <= c <= "~" for c in v.reply.text)


def test_reject_refuses(message):
    scanner, stub = make(FakeRspamd(body=answer("reject", score=15.0,
                                                messages={"smtp_message": "Gtube pattern"})))
    v = scan(scanner, stub, message)
    assert v.disposition == REJECT
    assert (v.reply.code, v.reply.enhanced, v.reply.text) == (550, "5.7.1",
                                                              "message refused as spam")


def test_reject_junks_when_configured(message):
    scanner, stub = make(FakeRspamd(body=answer("reject", score=15.0)), reject_action="junk")
    v = scan(scanner, stub, message)
    assert v.disposition == JUNK and v.reply is None
    assert "X-Spam-Score: 15.00" in v.headers


def test_milter_headers_in_answer_are_ignored(message):
    body = answer("no action", milter={"add_headers": {"X-Evil": {"value": "a\r\nb"}}})
    scanner, stub = make(FakeRspamd(body=body))
    v = scan(scanner, stub, message)
    assert v.disposition == ACCEPT and not any("X-Evil" in h for h in v.headers)


# -- failures ---------------------------------------------------------------------------------
class Refusing:
    def post(self, *args, **kwargs):
        return defer.fail(ConnectionRefusedError())


FAILURES = {
    "refused": dict(http=Refusing()),
    "status": dict(resource=FakeRspamd(code=500, body=b"oops")),
    "not json": dict(resource=FakeRspamd(body=b"<html>not json")),
    "not an object": dict(resource=FakeRspamd(body=b"[1, 2]")),
    "no action": dict(resource=FakeRspamd(body=b'{"score": 1}')),
    "bad score": dict(resource=FakeRspamd(body=b'{"action": "no action", "score": "x"}')),
    "unknown action": dict(resource=FakeRspamd(body=answer("explode"))),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_failures_tempfail_by_default(message, case):
    scanner, stub = make(**FAILURES[case])
    v = scan(scanner, stub, message)
    assert v.disposition == TEMPFAIL
    assert (v.reply.code, v.reply.enhanced, v.reply.text) == (
        451, "4.7.1", "content scanner unavailable, try again later")
    assert v.log.startswith("rspamd: unavailable")


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_failures_accept_with_header_when_configured(message, case):
    scanner, stub = make(on_failure="accept", **FAILURES[case])
    v = scan(scanner, stub, message)
    assert v.disposition == ACCEPT and v.reply is None
    assert v.headers == ["X-Spam-Status: Unknown, scanner unavailable"]


def test_failure_logs_one_line(message):
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        scanner, stub = make(http=Refusing())
        scan(scanner, stub, message)
    finally:
        globalLogPublisher.removeObserver(events.append)
    mine = [e for e in events if e.get("log_namespace") == "mailsuite.trust.rspamd"]
    assert len(mine) == 1


def test_timeout_covers_whole_request(message):
    clock = task.Clock()
    fake = FakeRspamd(hang=True)
    scanner, stub = make(fake, clock=clock, timeout=20.0)
    d = scanner.scan(ENVELOPE, message, len(MESSAGE))
    stub.flush()
    results = outcome(d)
    assert fake.requests and not results
    clock.advance(19.9)
    assert not results
    clock.advance(0.2)
    v, = results
    assert v.disposition == TEMPFAIL and "timeout" in v.log
    assert not clock.getDelayedCalls()


def test_missing_message_file_is_a_failure(tmp_path):
    scanner, stub = make(FakeRspamd(body=answer("no action")))
    v = scan(scanner, stub, str(tmp_path / "gone"), size=10)
    assert v.disposition == TEMPFAIL


def test_too_large_is_not_scanned(message):
    fake = FakeRspamd(body=answer("reject"))
    scanner, stub = make(fake, max_size=10)
    v = scan(scanner, stub, message)
    assert v.disposition == ACCEPT
    assert v.headers == ["X-Spam-Status: Unknown, message too large to scan"]
    assert fake.requests == []


def test_file_read_happens_in_the_pool(message):
    calls = []

    class RecordingPool(InlinePool):
        def run(self, fn, *args, **kwargs):
            calls.append(fn.__name__)
            return super().run(fn, *args, **kwargs)

    config = RspamdSection(url="http://rspamd.test:11333")
    stub = StubTreq(FakeRspamd(body=answer("no action")))
    scanner = RspamdScanner(config, task.Clock(), "h", RecordingPool(), http=stub)
    scan(scanner, stub, message)
    assert calls == ["read_message"]

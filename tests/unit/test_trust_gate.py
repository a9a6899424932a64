"""The trust gate inside the SMTP server, in memory (docs/design/trust.md, "The gate"): limits,
DNSBL and engines are fakes with fixed answers; what is checked is where each answer lands in
the dialogue, what is queued and with which headers and meta."""
from __future__ import annotations

import base64
from typing import Any

from twisted.internet import defer, task

from mailsuite.pools import InlinePool
from mailsuite.smtp.replies import Reply
from mailsuite.trust import ACCEPT, JUNK, REJECT, TEMPFAIL, Verdict
from mailsuite.trust.gate import Gate
from mailsuite.trust.srs import SRS
from tests.unit.smtpkit import World

MESSAGE = b"From: a@sender.example\r\nSubject: hi\r\n\r\nbody\r\n"


class Limits:
    """RateLimits' interface with scripted answers; remembers what it was asked."""

    def __init__(self, **replies: Reply | None):
        self.replies = replies
        self.asked: list[tuple[str, str]] = []

    def _answer(self, name: str, key: str) -> defer.Deferred:
        self.asked.append((name, key))
        return defer.succeed(self.replies.get(name))

    def connection(self, ip): return self._answer("connection", ip)
    def recipient(self, ip): return self._answer("recipient", ip)
    def submission_message(self, user): return self._answer("submission_message", user)
    def submission_recipient(self, user): return self._answer("submission_recipient", user)


class Listed:
    def __init__(self, reply: Reply | None):
        self.reply = reply
        self.checked: list[str] = []

    def check(self, ip):
        self.checked.append(ip)
        return defer.succeed(type("Outcome", (), {"reply": self.reply})())


class Scanner:
    name = "fake"

    def __init__(self, verdict: Verdict | Exception, submission: bool = False):
        self.verdict = verdict
        self.submission = submission
        self.scanned: list[bytes] = []

    def wanted(self, envelope):
        return envelope.listener == "mx" or self.submission

    def scan(self, envelope, path, size):
        with open(path, "rb") as f:
            self.scanned.append(f.read())
        if isinstance(self.verdict, Exception):
            return defer.fail(self.verdict)
        return defer.succeed(self.verdict)


def world(listener: str = "mx", **parts: Any) -> World:
    def make(config):
        return Gate(config, listener, reactor=task.Clock(), work=InlinePool(), **parts)

    return World(gates={listener: make})


def logged_in(w: World):
    """A submission session (implicit TLS) of alice, authenticated."""
    c = w.connect("submissions")
    c.ehlo()
    c.send(b"AUTH PLAIN " + base64.b64encode(b"\0alice@example.org\0secret-pw-1") + b"\r\n")
    assert c.code() == 235
    return c


def deliver(w: World, port: str = "mx", rcpt: str = "alice@example.org") -> list[bytes]:
    c = w.connect(port)
    c.ehlo()
    c.send(b"MAIL FROM:<a@sender.example>\r\n")
    assert c.code() == 250
    c.send(f"RCPT TO:<{rcpt}>\r\n".encode())
    assert c.code() == 250
    c.send(b"DATA\r\n")
    assert c.code() == 354
    c.send(MESSAGE + b".\r\n")
    return c.reply()


def test_connection_rate_refusal_replaces_the_greeting():
    limits = Limits(connection=Reply(421, "4.7.0", "too many connections from 127.0.0.1"))
    c = world(ratelimits=limits).connect()
    assert c.reply() == [b"421 4.7.0 too many connections from 127.0.0.1"]
    c.wait(1)
    assert c.closed()


def test_listed_client_refused_at_rcpt_but_postmaster_passes():
    dnsbl = Listed(Reply(554, "5.7.1", "bl.example lists 192.0.2.7"))
    w = world(dnsbl=dnsbl)
    w.config.dnsbl.exempt_networks = []
    c = w.connect(ip="192.0.2.7")
    c.ehlo()
    c.send(b"MAIL FROM:<a@sender.example>\r\n")
    assert c.code() == 250
    c.send(b"RCPT TO:<alice@example.org>\r\n")
    assert c.reply() == [b"554 5.7.1 bl.example lists 192.0.2.7"]
    c.send(b"RCPT TO:<postmaster@example.org>\r\n")
    assert c.code() == 250
    assert dnsbl.checked == ["192.0.2.7"]  # once per connection, at connect


def test_exempt_clients_are_not_looked_up():
    dnsbl = Listed(Reply(554, "5.7.1", "bl.example lists 127.0.0.1"))
    w = world(dnsbl=dnsbl)
    assert deliver(w)[0].startswith(b"250 ")
    assert dnsbl.checked == []


def test_submission_counts_the_users_messages_and_recipients():
    limits = Limits(submission_message=None, submission_recipient=Reply(450, "4.7.1", "slow"))
    w = world("submission", ratelimits=limits)
    c = logged_in(w)
    c.send(b"MAIL FROM:<alice@example.org>\r\n")
    assert c.code() == 250
    c.send(b"RCPT TO:<someone@remote.example>\r\n")
    assert c.reply() == [b"450 4.7.1 slow"]
    assert ("submission_message", "alice@example.org") in limits.asked
    assert ("submission_recipient", "alice@example.org") in limits.asked


def test_engine_reject_refuses_after_data_and_queues_nothing():
    w = world(scanners=[Scanner(Verdict(REJECT, Reply(554, "5.7.0", "message refused: Eicar")))])
    assert deliver(w) == [b"554 5.7.0 message refused: Eicar"]
    assert w.queue.messages == []
    assert w.queue.staged() == []  # the staged file is gone too


def test_the_most_severe_verdict_wins_and_headers_are_added_on_top():
    scanners = [Scanner(Verdict(JUNK, None, ["X-Spam-Status: Yes, score=9"])),
                Scanner(Verdict(ACCEPT, None, ["X-Virus-Scanned: clamav"]))]
    w = world(scanners=scanners)
    assert deliver(w)[0].startswith(b"250 ")
    [queued] = w.queue.messages
    assert queued.meta["folder"] == "Junk" and queued.meta["flags"] == ["$Junk"]
    assert queued.data.startswith(b"X-Spam-Status: Yes, score=9\r\nX-Virus-Scanned: clamav\r\n"
                                  b"Received: ")
    assert queued.data.endswith(MESSAGE)
    assert scanners[0].scanned[0].startswith(b"Received: ")  # engines see what we received


def test_a_failing_check_is_a_tempfail_not_a_silent_accept():
    w = world(scanners=[Scanner(RuntimeError("bug"))])
    reply = deliver(w)
    assert reply[0].startswith(b"451 4.7.1"), reply
    assert w.queue.messages == []


def test_a_tempfail_verdict_keeps_nothing():
    w = world(scanners=[Scanner(Verdict(TEMPFAIL, Reply(451, "4.7.1", "scanner unavailable")))])
    assert deliver(w) == [b"451 4.7.1 scanner unavailable"]
    assert w.queue.messages == [] and w.queue.staged() == []


def test_header_values_cannot_add_fields():
    w = world(scanners=[Scanner(Verdict(ACCEPT, None, ["X-Spam-Status: No\r\nBcc: evil"]))])
    assert deliver(w)[0].startswith(b"250 ")
    [queued] = w.queue.messages
    assert queued.data.startswith(b"X-Spam-Status: No\r\n Bcc: evil\r\nReceived: ")


def test_junk_on_submission_is_only_headers():
    scanner = Scanner(Verdict(JUNK, None, ["X-Spam-Status: Yes"]), submission=True)
    w = world("submission", scanners=[scanner])
    c = logged_in(w)
    c.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    assert [c.code(), c.code(), c.code()] == [250, 250, 354]
    c.send(b"From: alice@example.org\r\n\r\nhi\r\n.\r\n")
    assert c.reply()[0].startswith(b"250 ")
    [queued] = w.queue.messages
    assert "folder" not in queued.meta
    assert queued.data.startswith(b"X-Spam-Status: Yes\r\n")


def test_forwarded_recipients_mark_the_entry_and_local_ones_do_not():
    w = world()
    w.directory.forwards["fwd@example.org"] = ("bob@elsewhere.example",)
    assert deliver(w, rcpt="fwd@example.org")[0].startswith(b"250 ")
    assert deliver(w, rcpt="alice@example.org")[0].startswith(b"250 ")
    forwarded, local = w.queue.messages
    assert forwarded.meta["forwarded"] is True
    assert "forwarded" not in local.meta


def test_srs_addresses_of_ours_route_back_and_forged_ones_are_refused():
    srs = SRS(b"s" * 64, "mx.unit.example")
    w = World(srs=srs)
    bounce_to = srs.forward("carol@remote.example")
    c = w.connect()
    c.ehlo()
    c.send(b"MAIL FROM:<>\r\n")
    assert c.code() == 250
    c.send(f"RCPT TO:<{bounce_to}>\r\n".encode())
    assert c.code() == 250
    forged = bounce_to.replace(bounce_to.split("=")[1], "zzzzzz")
    c.send(f"RCPT TO:<{forged}>\r\n".encode())
    [line] = c.reply()
    assert line.startswith(b"550 5.7.1 Invalid SRS address"), line
    c.send(b"DATA\r\n")
    assert c.code() == 354
    c.send(MESSAGE + b".\r\n")
    assert c.code() == 250
    [queued] = w.queue.messages
    [(_, route)] = queued.recipients
    assert route.remote == ("carol@remote.example",)


def test_rewrite_streams_the_body_and_strips_only_our_results(tmp_path):
    from mailsuite.trust.gate import COPY_CHUNK, _rewrite

    head = (b"Received: from x\r\nAuthentication-Results: MX.unit.example;\r\n\tspf=pass\r\n"
            b"Authentication-Results: other.example; spf=fail\r\nSubject: big\r\n\r\n")
    body = (b"Authentication-Results: mx.unit.example; in the body stays\r\n"
            + b"x" * (3 * COPY_CHUNK + 17) + b"\r\n")
    src = tmp_path / "staged"
    src.write_bytes(head + body)
    new_path, size = _rewrite(str(src), ["Authentication-Results: mx.unit.example; spf=none"],
                              "mx.unit.example")
    data = open(new_path, "rb").read()
    assert size == len(data)
    assert not src.exists()
    assert data == (b"Authentication-Results: mx.unit.example; spf=none\r\nReceived: from x\r\n"
                    b"Authentication-Results: other.example; spf=fail\r\nSubject: big\r\n\r\n"
                    + body)


def test_nothing_to_add_leaves_the_staged_file_alone(monkeypatch):
    """Submission without engines: no header to add, so no copy of the message is made."""
    import mailsuite.trust.gate as gate_module

    def no_rewrite(*args):
        raise AssertionError("the message was copied")

    monkeypatch.setattr(gate_module, "_rewrite", no_rewrite)
    w = world("submission")
    c = logged_in(w)
    c.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    assert [c.code(), c.code(), c.code()] == [250, 250, 354]
    c.send(b"From: alice@example.org\r\n\r\nhi\r\n.\r\n")
    assert c.reply()[0].startswith(b"250 ")
    [queued] = w.queue.messages
    assert queued.data.startswith(b"Received: ")
    assert w.queue.staged() == []


def _jobs_at_the_final_dot(io, gate_parts: dict[str, Any]) -> list[str]:
    from tests.unit.test_smtp_streaming import job_name

    w = World(io=io, gates={"mx": lambda config: Gate(config, "mx", reactor=task.Clock(),
                                                      work=InlinePool(), **gate_parts)})
    c = w.connect("mx")
    c.ehlo()
    c.send(b"MAIL FROM:<a@sender.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert [c.code(), c.code(), c.code()] == [250, 250, 354]
    c.send(MESSAGE + b".\r\n")
    names = []
    while io.jobs:
        names.append(job_name(io.jobs[0]))
        io.step()
    assert c.reply()[0].startswith(b"250 ") and len(w.queue.messages) == 1
    return names


def test_a_gate_that_reads_no_message_lets_the_queue_take_it_in_one_job():
    """No sender authentication, no engine: nothing reads the staged file, so the job that
    completes it hands it to the queue (docs/design/smtp.md, "DATA on disk")."""
    from tests.unit.manualpool import ManualPool

    assert _jobs_at_the_final_dot(ManualPool(), {}) == ["_create+then"]


def test_an_engine_still_scans_the_complete_file_before_the_queue_takes_it():
    from tests.unit.manualpool import ManualPool

    scanner = Scanner(Verdict(ACCEPT))
    assert _jobs_at_the_final_dot(ManualPool(), {"scanners": [scanner]}) == ["_create"]
    assert scanner.scanned and scanner.scanned[0].endswith(MESSAGE)


def test_a_message_nothing_checks_is_accepted_at_once_without_a_trust_line():
    """Without sender authentication and without an engine that wants the message, inspect
    has nothing to judge: accept, the staged path as it is, no "trust ... -> accept" line."""
    from twisted.logger import globalLogPublisher

    from mailsuite.config import Config
    from mailsuite.trust import Envelope

    envelope = Envelope("192.0.2.1", "mx.b.test", "bob@b.test", ("a@a.test",))
    gate = Gate(Config(), "mx", reactor=task.Clock(), work=InlinePool(),
                scanners=[Scanner(Verdict(REJECT), submission=False)])
    gate.scanners[0].wanted = lambda envelope: False
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        d = gate.session("192.0.2.1").inspect(envelope, "/staged/file", 10, forwards=True)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    results: list[Any] = []
    d.addCallback(results.append)
    [inspection] = results  # fired already: no generator, no log line
    assert inspection.verdict.disposition == ACCEPT and inspection.verdict.results == []
    assert (inspection.path, inspection.size, inspection.meta) == ("/staged/file", 10,
                                                                   {"forwarded": True})
    assert [e for e in seen if e.get("log_namespace") == "mailsuite.trust.gate"] == []

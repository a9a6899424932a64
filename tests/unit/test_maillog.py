"""The mail log's one line shape: `queue_id=<id> key=value ...`, quoted where needed."""
from __future__ import annotations

from mailsuite import maillog
from mailsuite.queue.spool import DeliveryResult, QueueEntry, Recipient
from tests.unit.queuekit import MailLog


def test_values_are_quoted_only_when_needed_and_escaped():
    line = maillog.line("0123abcd", relay="mx.far.example[192.0.2.1]:25", tls_info="TLSv1.3 X",
                        detail='say "hi"\r\n\\ bye', skipped=None)
    assert line == ('queue_id=0123abcd relay=mx.far.example[192.0.2.1]:25 tls_info="TLSv1.3 X" '
                    'detail="say \\"hi\\"\\r\\n\\\\ bye"')
    assert maillog.line("0123abcd", detail="ok") == 'queue_id=0123abcd detail="ok"'


def test_an_attempt_is_one_line_starting_with_the_queue_id():
    log = MailLog().install()
    try:
        rcpt = Recipient("alice@example.org", "Alice+x@example.org", True, attempts=2)
        entry = QueueEntry("0123abcd", "", [rcpt], 100.0)
        maillog.attempt(entry, rcpt, "deferred",
                        DeliveryResult(rcpt.address, "deferred", "451 4.3.0 busy"), 112.34,
                        "local")
    finally:
        log.remove()
    assert log.lines == ['queue_id=0123abcd from=<> to=<alice@example.org> status=deferred '
                         'delay=12.3s relay=local attempts=2 detail="451 4.3.0 busy" '
                         'orig_to=<Alice+x@example.org>']

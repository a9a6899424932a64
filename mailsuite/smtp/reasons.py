"""Why the SMTP server refused a client, in one word: the label of the `rejected` statistics
(docs/design/events.md). `reason_of(reply)` is asked at the one place every reply leaves the
server (`SMTPServer._send`), so no check needs to report its refusals itself.

A reply that names its reason (a `reason` attribute) is taken at its word. The others are known
by their value: the constants of `replies`, and the texts the trust checks build (rate limits,
greylisting, DNSBL, DMARC, rspamd, clamd), which tests/unit/test_events_reasons.py pins.
"""
from __future__ import annotations

import re
from typing import Any

from mailsuite.smtp import replies

# The constants of replies.py that refuse something, by name.
_NAMED = {
    "TOO_MANY_CONNECTIONS": "too_many_connections", "TOO_MANY_FROM_IP": "too_many_connections",
    "IDLE_TIMEOUT": "timeout", "AUTH_TIMEOUT": "timeout", "LINE_FLOOD": "line_too_long",
    "TOO_MANY_ERRORS": "too_many_errors", "SHUTTING_DOWN": "shutdown",
    "COMMAND_FLOOD": "command_rate", "BAD_SRS_ADDRESS": "bad_srs",
    "UNKNOWN_COMMAND": "syntax", "LINE_TOO_LONG": "line_too_long", "BAD_CHARACTERS": "syntax",
    "NOT_IMPLEMENTED": "not_implemented", "SYNTAX_ERROR": "syntax",
    "BAD_SEQUENCE": "bad_sequence", "NEED_HELO": "bad_sequence", "LOCAL_ERROR": "local_error",
    "NESTED_MAIL": "bad_sequence", "NEED_MAIL": "bad_sequence", "BAD_ADDRESS": "syntax",
    "BAD_SENDER_ADDRESS": "syntax", "NON_ASCII_ADDRESS": "syntax",
    "UNKNOWN_PARAMETER": "syntax", "BAD_PARAMETER": "syntax", "TOO_MANY_PARAMETERS": "syntax",
    "MESSAGE_TOO_BIG": "message_too_big", "UNKNOWN_USER": "unknown_user",
    "RELAY_DENIED": "relay_denied", "NOT_YOUR_ADDRESS": "sender_not_owned",
    "AUTH_REQUIRED": "auth_required", "TOO_MANY_RECIPIENTS": "too_many_recipients",
    "TEMP_LOOKUP_FAILURE": "lookup_failed", "FROM_NOT_YOURS": "sender_not_owned",
    "NO_VALID_RECIPIENTS": "bad_sequence", "NEED_RCPT": "bad_sequence",
    "BARE_LINE_ENDING": "bad_message", "DATA_LINE_TOO_LONG": "bad_message",
    "NUL_IN_MESSAGE": "bad_message", "MAIL_LOOP": "mail_loop", "QUEUE_FAILED": "local_error",
    "QUEUE_FULL": "storage_full", "TLS_ALREADY": "bad_sequence",
    "TLS_NOT_AVAILABLE": "tls_unavailable", "AUTH_FAILED": "auth_failed",
    "AUTH_NEEDS_TLS": "auth_needs_tls", "AUTH_NOT_OFFERED": "not_implemented",
    "AUTH_ALREADY": "bad_sequence", "AUTH_IN_TRANSACTION": "bad_sequence",
    "AUTH_UNKNOWN_MECHANISM": "syntax", "AUTH_CANCELLED": "auth_cancelled",
    "AUTH_BAD_ENCODING": "syntax", "AUTH_TEMP_FAILURE": "auth_tempfail",
    "AUTH_TOO_MANY_FAILURES": "auth_failed",
}
_KNOWN = {(r.code, r.enhanced, r.text): reason
          for r, reason in ((getattr(replies, name), reason) for name, reason in _NAMED.items())}

# Replies built with a variable text (mailsuite/trust), known by the words we put in them.
_PATTERNS = [
    (re.compile(r"^too many (connections|recipients) from |sent (to )?too many "), "rate_limit"),
    (re.compile(r"^greylisted"), "greylisted"),
    (re.compile(r"DMARC policy of |checking sender authentication"), "dmarc"),
    (re.compile(r"^message refused as spam$|^try again later$"), "spam"),
    (re.compile(r"^(content|virus) scanner unavailable"), "scanner_unavailable"),
    (re.compile(r"^message checks failed"), "local_error"),
    (re.compile(r"^Invalid SRS address"), "bad_srs"),
    (re.compile(r"^\S+ lists \S+$"), "dnsbl"),
    (re.compile(r"^message refused: "), "virus"),  # clamd's "message refused: <signature>"
    (re.compile(r"closing connection$"), "evicted"),  # listeners.py made room for another
]


def reason_of(reply: Any) -> str:
    """The reason a refusal (code >= 400) was given, "other" when it is none we know."""
    given = getattr(reply, "reason", "")
    if given:
        return str(given)
    known = _KNOWN.get((reply.code, reply.enhanced, reply.text))
    if known:
        return known
    for pattern, reason in _PATTERNS:
        if pattern.search(reply.text):
            return reason
    return "other"

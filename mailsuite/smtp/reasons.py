"""Why the SMTP server refused a client, in one word: the label of the `rejected` statistics
(docs/design/events.md) and of the metrics' `mailsuite_smtp_replies_total` (metrics.md).
`reason_of(reply)` is asked at the one place every reply leaves the server (`SMTPServer._send`).

Every refusing reply names its reason where it is built (`Reply.reason`: the constants of
replies.py, the replies the trust checks build); tests/unit/test_events_reasons.py checks that
none is left without one.
"""
from __future__ import annotations

from typing import Any


def reason_of(reply: Any) -> str:
    """The reason a refusal (code >= 400) was given, "other" when it names none."""
    return str(getattr(reply, "reason", "") or "other")

"""POP3 (RFC 1939) with STLS, SASL PLAIN and RESP-CODES over the mailbox store's INBOX."""
from __future__ import annotations

from typing import Any


def server_factory(suite: Any, implicit_tls: bool = False, **kwargs: Any) -> Any:
    """The protocol factory for the pop3 (STLS) and pop3s (implicit TLS, wrapped by
    service.py) listeners."""
    from mailsuite.pop3.server import POP3Factory

    return POP3Factory(suite, implicit_tls=implicit_tls)

"""What the courier does to mail an alias forwards to another domain (docs/design/trust.md,
"Forwarding"): the envelope sender becomes an SRS address of ours, and the message gets an ARC
set (RFC 8617) sealing the Authentication-Results we wrote on arrival, so the next hop can see
that SPF/DKIM passed here even though our forwarding broke SPF alignment for it.

The queue entry says whether it is forwarded mail (`meta["forwarded"]`, set by the SMTP gate for
MX mail with remote alias targets); mail our users submit is sent as it is.
"""
from __future__ import annotations

from typing import Any, Mapping

from twisted.logger import Logger

from mailsuite.courier.dkim import load_keys
from mailsuite.trust.srs import SRS

log = Logger()


class Forwarder:
    def __init__(self, srs: SRS, dkim_dir: str, authserv_id: str):
        self.srs = srs
        self.dkim_dir = dkim_dir
        self.authserv_id = authserv_id

    @staticmethod
    def applies(meta: Mapping[str, Any]) -> bool:
        return meta.get("forwarded") is True

    def sender(self, sender: str, meta: Mapping[str, Any]) -> str:
        """MAIL FROM for a copy of this entry."""
        return self.srs.forward(sender) if self.applies(meta) else sender

    def seal(self, message: bytes, meta: Mapping[str, Any]) -> bytes:
        """The message with an ARC set on top (blocking: call it in a worker thread). Sealed
        with an RSA key (RFC 8617 §7.2 requires rsa-sha256) of the SRS domain or of a parent
        domain of it (`mailsuite dkim generate`); without one the message goes unsealed."""
        if not self.applies(meta):
            return message
        key = self._key()
        if key is None:
            return message
        selector, domain, private = key
        from mailsuite.trust.dkimcheck import arc_seal

        try:
            return arc_seal(message, selector, domain, private, self.authserv_id) + message
        except Exception as e:  # a message dkimpy cannot seal still goes out, unsealed
            log.warn("ARC sealing failed ({error}); forwarding without an ARC set", error=e)
            return message

    def _key(self) -> tuple[str, str, bytes] | None:
        labels = self.srs.domain.split(".")
        for i in range(len(labels) - 1):
            domain = ".".join(labels[i:])
            for key, private in load_keys(self.dkim_dir, domain):
                if key.algorithm == "rsa":
                    return key.selector, domain, private
        return None

"""Enhanced status codes (RFC 3463) and texts the courier reports for failures it detects itself.

Failures reported by a remote server keep the remote reply; these are for the cases where there
is no reply to quote (DNS, connection, TLS), so DSNs and `queue list` say something precise.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Failure:
    status: str  # x.y.z
    text: str

    @property
    def permanent(self) -> bool:
        return self.status.startswith("5")


# DNS (RFC 5321 §5.1, RFC 7505)
NULL_MX = Failure("5.1.10", "domain does not accept mail (null MX, RFC 7505)")
NO_SUCH_DOMAIN = Failure("5.1.2", "domain does not exist (NXDOMAIN)")
NO_MAIL_HOST = Failure("5.1.2", "domain has no MX and no address record")
DNS_TEMPORARY = Failure("4.4.3", "temporary DNS failure")
MX_HOST_UNRESOLVED = Failure("4.4.3", "no address for any mail exchanger")

# Connection and protocol
CONNECT_FAILED = Failure("4.4.1", "no answer from host")
CONNECTION_LOST = Failure("4.4.2", "connection lost")
TIMEOUT = Failure("4.4.2", "timeout")
PROTOCOL_ERROR = Failure("4.5.0", "SMTP protocol error")
TLS_REQUIRED = Failure("4.7.5", "TLS required for this domain but not available or not verified")
AUTH_FAILED = Failure("4.7.0", "authentication at the relay failed")
MESSAGE_UNREADABLE = Failure("4.3.0", "queued message file could not be read")
NO_SMTPUTF8 = Failure("5.6.7", "receiver does not support internationalized addresses")
MESSAGE_TOO_BIG = Failure("5.3.4", "message larger than the receiver's SIZE limit")
SHUTTING_DOWN = Failure("4.3.2", "mail system shutting down")

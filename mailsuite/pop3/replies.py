"""Every POP3 reply text in one place (RFC 1939; response codes RFC 2449 §8, RFC 3206).

Codes in brackets are the RESP-CODES extension: [IN-USE], [LOGIN-DELAY], [SYS/TEMP],
[SYS/PERM] (RFC 3206) and [AUTH] (RFC 3206 §4: a problem with the credentials)."""
from __future__ import annotations


def ok(text: str = "") -> bytes:
    return b"+OK" + (b" " + _clean(text) if text else b"") + b"\r\n"


def err(text: str) -> bytes:
    return b"-ERR " + _clean(text) + b"\r\n"


def _clean(text: str) -> bytes:
    # Never let client-supplied text break the line framing or the ASCII reply.
    return text.replace("\r", " ").replace("\n", " ").encode("ascii", "replace")


def greeting(hostname: str) -> bytes:
    return ok(f"{hostname} POP3 mailsuite ready")


SIGNING_OFF = "mailsuite POP3 server signing off"
BEGIN_TLS = ok("Begin TLS negotiation")
CAPA_FOLLOWS = ok("Capability list follows")

# -- refusals --------------------------------------------------------------------------------
TOO_MANY_CONNECTIONS = err("[SYS/TEMP] too many connections, try again later")
UNKNOWN_COMMAND = err("Unknown command")
BAD_SYNTAX = err("Syntax error")
LINE_TOO_LONG = err("Line too long")
LINE_TOO_LONG_CLOSING = err("Line too long, closing connection")
INPUT_OVERFLOW = err("[SYS/TEMP] Too much input ahead of the replies, closing connection")
TOO_FAST = err("[SYS/TEMP] Too many commands before login, closing connection")
LOGIN_TIMEOUT = err("[SYS/TEMP] Login took too long, closing connection")
TOO_MANY_ERRORS = err("Too many errors, closing connection")
TIMEOUT = err("Idle timeout, closing connection")
NOT_IN_THIS_STATE = err("Command not valid in this state")
TLS_REQUIRED = err("[AUTH] Plaintext authentication is disabled; use STLS first")
TLS_ACTIVE = err("TLS is already active")
TLS_UNAVAILABLE = err("[SYS/PERM] TLS is not available")
USER_FIRST = err("USER first")
AUTH_FAILED = err("[AUTH] Authentication failed")
TOO_MANY_FAILURES = err("[AUTH] Too many authentication failures, closing connection")
DIRECTORY_DOWN = err("[SYS/TEMP] Authentication service unavailable, try again later")
MAILDROP_LOCKED = err("[IN-USE] Maildrop is already in use by another session")
# RFC 2449 §8.1.1: the folder's dotlock (or index) stayed locked for [mailbox] lock_wait.
MAILDROP_BUSY = err("[IN-USE] Maildrop is locked by another process, try again later")
MAILDROP_ERROR = err("[SYS/TEMP] Cannot open the maildrop, try again later")
INTERNAL_ERROR = err("[SYS/TEMP] Internal error")
UNSUPPORTED_MECHANISM = err("Unsupported authentication mechanism")
AUTH_CANCELLED = err("Authentication cancelled")
BAD_BASE64 = err("[AUTH] Invalid base64 data")
NO_SUCH_MESSAGE = err("No such message")
MESSAGE_DELETED = err("Message is deleted")
MESSAGE_GONE = err("[SYS/TEMP] Message was removed by another session")
READ_ERROR = err("[SYS/TEMP] Cannot read the message")
UPDATE_FAILED = err("[SYS/TEMP] Some deleted messages could not be removed")

"""Every reply the SMTP server sends: code, enhanced status code (RFC 3463) and text, in one place.

The protocol and the policies refer to these names only, so a reply code is changed here once and
tests can grep for the reason a client was refused.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str  # "" for replies that carry no enhanced code (greeting, 354, EHLO lines)
    text: str
    # Why a client was refused, in one word from a fixed set: the `reason` label of
    # mailsuite_smtp_replies_total (docs/design/metrics.md). "" for replies that refuse nothing.
    reason: str = field(default="", compare=False)

    def with_text(self, text: str) -> "Reply":
        return replace(self, text=text)

    def lines(self) -> bytes:
        """The reply as CRLF-terminated bytes; multi-line text uses the `NNN-` continuation form.
        Made once per Reply (they are immutable, most of them shared constants)."""
        made = self.__dict__.get("_lines")
        if made is None:
            made = self._render()
            object.__setattr__(self, "_lines", made)  # a cache, not a field: eq/repr ignore it
        return made

    def _render(self) -> bytes:
        parts = self.text.split("\n")
        out = []
        for i, part in enumerate(parts):
            sep = " " if i == len(parts) - 1 else "-"
            prefix = f"{self.enhanced} " if self.enhanced else ""
            # Never let a CR/LF or a non-ASCII byte from client input break the reply framing.
            clean = (prefix + part).replace("\r", " ").encode("ascii", "replace")
            out.append(b"%d%s%s\r\n" % (self.code, sep.encode(), clean))
        return b"".join(out)

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def success(self) -> bool:
        return self.code < 400


# -- connection --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)  # one per host name: made once, not per connection
def greeting(hostname: str) -> Reply:
    return Reply(220, "", f"{hostname} ESMTP mailsuite")


@functools.lru_cache(maxsize=16)
def closing(hostname: str) -> Reply:
    return Reply(221, "2.0.0", f"{hostname} closing connection")


TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later",
                             "too_many_connections")
TOO_MANY_FROM_IP = Reply(421, "4.7.0", "Too many connections from your address, try again later",
                         "too_many_connections")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection", "timeout")
LINE_FLOOD = Reply(421, "4.7.0", "Line too long without end, closing connection", "line_too_long")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection", "too_many_errors")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down", "shutdown")
COMMAND_FLOOD = Reply(421, "4.7.0", "Too many commands, closing connection", "command_rate")
AUTH_TIMEOUT = Reply(421, "4.7.0", "Authentication timeout, closing connection", "timeout")

# -- trust (mailsuite/trust) ---------------------------------------------------------------------
BAD_SRS_ADDRESS = Reply(550, "5.7.1", "Invalid SRS address", "bad_srs")

# -- generic -----------------------------------------------------------------------------------
OK = Reply(250, "2.0.0", "Ok")
NOOP_OK = Reply(250, "2.0.0", "Ok")
RESET_OK = Reply(250, "2.0.0", "Ok, transaction reset")
VRFY_CANNOT = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT STARTTLS "
                           "AUTH\nSee RFC 5321")
UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command not recognized", "syntax")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long", "line_too_long")
BAD_CHARACTERS = Reply(500, "5.5.2", "Invalid characters in command", "syntax")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented", "not_implemented")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments", "syntax")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands", "bad_sequence")
NEED_HELO = Reply(503, "5.5.1", "Send EHLO or HELO first", "bad_sequence")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later", "local_error")

# -- MAIL / RCPT -------------------------------------------------------------------------------
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already given", "bad_sequence")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first", "bad_sequence")
BAD_ADDRESS = Reply(501, "5.1.3", "Bad address syntax", "syntax")
BAD_SENDER_ADDRESS = Reply(501, "5.1.7", "Bad sender address syntax", "syntax")
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8", "syntax")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter", "syntax")
BAD_PARAMETER = Reply(501, "5.5.4", "Invalid parameter value", "syntax")
TOO_MANY_PARAMETERS = Reply(501, "5.5.4", "Too many or too long parameters", "syntax")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit", "message_too_big")
UNKNOWN_USER = Reply(550, "5.1.1", "No such user here", "unknown_user")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied", "relay_denied")
NOT_YOUR_ADDRESS = Reply(553, "5.7.1", "Sender address not owned by the authenticated user",
                         "sender_not_owned")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required", "auth_required")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients", "too_many_recipients")
TEMP_LOOKUP_FAILURE = Reply(451, "4.3.0", "Temporary lookup failure, try again later",
                            "lookup_failed")
FROM_NOT_YOURS = Reply(553, "5.7.1", "From: or Sender: header not owned by the authenticated user",
                       "sender_not_owned")

# -- DATA --------------------------------------------------------------------------------------
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients", "bad_sequence")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT before DATA", "bad_sequence")
BARE_LINE_ENDING = Reply(550, "5.6.0", "Bare CR or LF in message; lines must end with CRLF",
                         "bad_message")
DATA_LINE_TOO_LONG = Reply(500, "5.5.2", "Message line too long (RFC 5321 limit 1000 octets)",
                           "bad_message")
NUL_IN_MESSAGE = Reply(550, "5.6.0", "NUL character in message", "bad_message")
MAIL_LOOP = Reply(554, "5.4.6", "Too many Received headers: mail loop detected", "mail_loop")
QUEUE_FAILED = Reply(451, "4.3.0", "Could not queue the message, try again later", "local_error")
QUEUE_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later", "storage_full")


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


# -- STARTTLS / AUTH ---------------------------------------------------------------------------
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
TLS_ALREADY = Reply(503, "5.5.1", "TLS already active", "bad_sequence")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available", "tls_unavailable")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid", "auth_failed")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism",
                       "auth_needs_tls")
AUTH_NOT_OFFERED = Reply(502, "5.5.1", "AUTH not available on this port", "not_implemented")
AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated", "bad_sequence")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not allowed during a mail transaction",
                            "bad_sequence")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism", "syntax")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled", "auth_cancelled")
AUTH_BAD_ENCODING = Reply(501, "5.5.2", "Cannot decode authentication response", "syntax")
AUTH_TEMP_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure", "auth_tempfail")
AUTH_TOO_MANY_FAILURES = Reply(421, "4.7.0", "Too many authentication failures, closing connection",
                               "auth_failed")


def auth_challenge(b64: str) -> Reply:
    # RFC 4954 §4: a server challenge is "334 " followed by base64, no enhanced code.
    return Reply(334, "", b64)

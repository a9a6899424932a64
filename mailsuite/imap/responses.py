"""IMAP response conditions and codes (RFC 3501 §7.1, RFC 5530, RFC 4315, RFC 4469)."""
from __future__ import annotations

OK = b"OK"
NO = b"NO"
BAD = b"BAD"
BYE = b"BYE"

# Response codes, written inside [ ] after the condition.
ALERT = b"ALERT"
AUTHENTICATIONFAILED = b"AUTHENTICATIONFAILED"  # RFC 5530
PRIVACYREQUIRED = b"PRIVACYREQUIRED"  # RFC 5530: LOGIN before STARTTLS
TRYCREATE = b"TRYCREATE"  # RFC 3501 §7.1: APPEND/COPY target missing
TOOBIG = b"TOOBIG"  # RFC 4469/7889: APPEND over the size limit
LIMIT = b"LIMIT"  # RFC 5530
EXPUNGEISSUED = b"EXPUNGEISSUED"  # RFC 5530: a message was expunged by another session
NONEXISTENT = b"NONEXISTENT"  # RFC 5530
ALREADYEXISTS = b"ALREADYEXISTS"  # RFC 5530
CANNOT = b"CANNOT"  # RFC 5530: the name is not acceptable
HASCHILDREN = b"HASCHILDREN"  # RFC 9051 §7.1: DELETE of a \\Noselect name with children
BADCHARSET = b"BADCHARSET"
SERVERBUG = b"SERVERBUG"  # RFC 5530
UNAVAILABLE = b"UNAVAILABLE"  # RFC 5530: temporary failure (directory down, I/O error)
OVERQUOTA = b"OVERQUOTA"  # RFC 5530: no space (ENOSPC, EDQUOT)
INUSE = b"INUSE"  # RFC 5530: the mailbox is locked by another session or process
READ_ONLY = b"READ-ONLY"
READ_WRITE = b"READ-WRITE"
CLIENTBUG = b"CLIENTBUG"


def code(name: bytes, *args: bytes) -> bytes:
    return b"[" + b" ".join((name,) + args) + b"] "


def completed(command: bytes, vanished: bool = False) -> bytes:
    """The OK text of SEARCH, SORT or THREAD. `vanished` (RFC 5530 §3): a message this session
    still shows was expunged elsewhere and could not be judged; a NOOP will tell of it."""
    text = command + b" completed"
    return code(EXPUNGEISSUED) + text if vanished else text


class CommandError(Exception):
    """Refuse the current command: `tag <condition> [code] text`."""

    def __init__(self, condition: bytes, text: str, code: bytes = b""):
        super().__init__(text)
        self.condition = condition
        self.text = text
        self.code = code


def no(text: str, code: bytes = b"") -> CommandError:
    return CommandError(NO, text, code)


def no_for(error: Exception, default: str, code: bytes = b"") -> Exception:
    """What to raise for a mail store refusal: NO with the store's reason, except for an
    environment fault (an OSError, such as the store's StoreUnavailable), which is passed on
    as is so that the dispatcher answers NO [UNAVAILABLE] or [OVERQUOTA] with one log line."""
    if isinstance(error, OSError):
        return error
    return no(str(error) or default, code)


def bad(text: str) -> CommandError:
    return CommandError(BAD, text)

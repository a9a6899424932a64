"""What the mailbox store refuses with: one class per reason, and StoreUnavailable for faults
of the environment underneath (docs/design/maildir.md)."""
from __future__ import annotations

import errno
import functools


class MailboxError(Exception):
    """Base class of the store's refusals; str(e) is a reason fit for a client."""


class NoSuchFolder(MailboxError):
    pass


class FolderExists(MailboxError):
    pass


class InvalidMailboxName(MailboxError):
    pass


class NoSuchMessage(MailboxError):
    pass


class UnsafePath(MailboxError):
    """A Maildir path that resolves (through a symlink) outside mail_dir: nothing is written
    (docs/design/maildir.md, "Paths")."""


class StoreUnavailable(MailboxError, OSError):
    """An environment fault under the store (disk full, I/O error, too many open files, a
    Dovecot lock held too long): temporary, worth a retry. Both a MailboxError (protocols
    answer it: IMAP `NO [UNAVAILABLE]`, POP3 `-ERR [SYS/TEMP]`) and an OSError with the
    original errno and strerror (the delivery agent defers on it)."""

    def __init__(self, errno_: int | None, strerror: str | None):
        OSError.__init__(self, errno_, strerror)

    def __str__(self) -> str:  # fit for a client: no path, no errno number
        return f"mail storage temporarily unavailable: {self.strerror or 'I/O error'}"


class LockBusy(StoreUnavailable):
    """A folder lock (Dovecot's dotlock, or a folder's in-process lock) is held by another
    session or process right now. Raised at once instead of waiting in a pool thread; callers
    wait on the reactor and try again (waits.py), then answer IMAP `NO [INUSE]`, POP3
    `-ERR [IN-USE]`; the delivery agent defers (docs/design/maildir.md, "The dotlock")."""

    def __init__(self, lock: str, owner: str = ""):
        StoreUnavailable.__init__(self, errno.EAGAIN, "mailbox in use")
        self.lock = lock  # what is locked: waiters of the same lock wait together
        self.owner = owner

    def __str__(self) -> str:
        return "mailbox is in use by another session, try again later"


def _environment_faults(fn):
    """Re-raise an OSError of a store operation as StoreUnavailable."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MailboxError:
            raise
        except OSError as e:
            raise StoreUnavailable(e.errno, e.strerror or str(e)) from e
    return wrapper


def translate_faults(*skip: str):
    """Class decorator: every public method and property raises StoreUnavailable, never a
    bare OSError (those in `skip` are memory-only hot paths)."""
    def decorate(cls):
        for name, value in list(vars(cls).items()):
            if name.startswith("_") or name in skip:
                continue
            if isinstance(value, property):
                setattr(cls, name, property(_environment_faults(value.fget)))
            elif callable(value):
                setattr(cls, name, _environment_faults(value))
        return cls
    return decorate

"""The Maildir++ mailbox store that IMAP and POP3 read and the delivery agent writes.

`MailStoreAPI` is the seam: the one implementation is `mailsuite.mailbox.store.MailStore`; unit
tests of the protocols may use it on a temporary directory.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from mailsuite.mailbox.store import Account


@runtime_checkable
class MailStoreAPI(Protocol):
    """All users' mailboxes. Methods block (file system): call them in the io pool."""

    def account(self, address: str) -> "Account":
        """The account of a canonical address; raises InvalidMailboxName for an unsafe one."""
        ...

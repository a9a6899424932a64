"""What the command groups use of their connection.

`server.IMAPServer` implements this and mixes in one class per command group (selection.py,
folders.py, messages.py, fetch.py, idle.py); each group's methods reach the connection only
through the names declared here. See docs/design/imap.md, "Module map".
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime, ITransport

from mailsuite.config import Config
from mailsuite.imap.parser import Token
from mailsuite.mailbox.store import Account, Folder
from mailsuite.pools import WorkPool

if TYPE_CHECKING:
    from mailsuite.imap.selection import Selection

MAX_LINE = 64 * 1024  # after login; long UID sets are legal, Dovecot allows 64k lines too


class Session:
    """The state of one connection that every command handler may read or change."""

    config: Config
    clock: IReactorTime
    pool: WorkPool
    transport: Optional[ITransport]
    state: str  # "notauth", "auth" or "selected": the keys of server.COMMANDS
    user: Optional[str]
    account: Optional[Account]
    sel: Optional["Selection"]
    peer: str
    closed: bool
    tls: bool
    # ENABLE IMAP4rev2 (RFC 9051 §6.3.1): the one switch every rev2 difference consults
    # (docs/design/imap.md, "IMAP4rev2").
    rev2: bool = False

    def io(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        """Run blocking store work in the io pool; never on the reactor thread."""
        return self.pool.run(fn, *args, **kwargs)

    if TYPE_CHECKING:
        def send(self, line: bytes) -> None: ...

        def hangup(self) -> None: ...

        def refresh(self, shared: bool = False) -> defer.Deferred: ...

        def report_expunged(self, removed: Iterable[int]) -> None: ...

        def refresh_args(self) -> Optional[tuple[Folder, object]]: ...

        def refreshed(self, sel: Optional["Selection"], st: Any) -> Optional[defer.Deferred]: ...

        # condstore.py (RFC 7162)
        condstore: bool
        qresync: bool

        def select_params(self, args: list[Token]) -> Any: ...

        def announce_closed(self) -> None: ...

        def announce_modseqs(self, sel: "Selection", highest: int, uidvalidity: int,
                             uidnext: int, params: Any) -> defer.Deferred: ...

        def report_vanished(self, removed: Iterable[int]) -> bool: ...

        def modseq_item(self, info: Any) -> bytes: ...

        def enable_condstore(self) -> defer.Deferred: ...

        def refresh_own_modseqs(self, uids: list[int]) -> defer.Deferred: ...

        def condstore_fetch(self, cmd: Any, mods: Any, set_tok: Token) -> defer.Deferred: ...

        def condstore_store(self, uids: list[int], flags: list[str], mode: bytes, silent: bool,
                            uid: bool, unchangedsince: Optional[int]) -> defer.Deferred: ...

        def resolve(self, args_set: Token, uid: bool) -> list[int]: ...

        def announce_keywords(self, sel: "Selection", flags: Iterable[str]) -> None: ...

        def shared_state_token(self, folder: Folder) -> defer.Deferred: ...

        def pauseProducing(self) -> None: ...

        def resumeProducing(self) -> None: ...

        def resetTimeout(self) -> None: ...

        def setTimeout(self, period: Optional[float]) -> Optional[float]: ...

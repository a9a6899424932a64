"""IDLE (RFC 2177; authenticated and selected states): wait for DONE, and meanwhile tell the
client about new mail: at once when a change notification names the selected folder
(mailsuite/notify.py: a delivery or another session's change, in this process or, through
PostgreSQL, in another instance), and by polling the folder's state token every [imap]
idle_poll seconds on the session's clock whatever happens. Also which folders a command
changed, for the notifications. See docs/design/imap.md, "IDLE".
"""
from __future__ import annotations

from typing import Callable, Optional

from twisted.internet import defer

from mailsuite.imap.names import decode_name
from mailsuite.imap.parser import ParseError, Token, astring
from mailsuite.imap.responses import CommandError, bad
from mailsuite.imap.session import Session
from mailsuite.mailbox.errors import LockBusy
from mailsuite.mailbox.store import Folder
from mailsuite.notify import ChangeHub

IDLE_POLL = 0.5  # default [imap] idle_poll: seconds between checks of the folder's state token
MIN_POLL = 0.05  # a smaller setting would keep the folder busy for nothing


class IdleCommand(Session):
    """The IDLE handler. `lineReceived` hands the client's next line to `idling`."""

    idling: Optional[defer.Deferred] = None
    idle_wake: Optional[defer.Deferred] = None
    idle_line: Optional[bytes] = None
    idle_again = False  # woken while refreshing: look again before waiting
    changes: Optional[ChangeHub] = None

    @defer.inlineCallbacks
    def do_IDLE(self, tag: bytes, args: list[Token]):
        self.send(b"+ idling")
        self.setTimeout(max(self.config.limits.imap_timeout, 1800))
        self.idle_line = None
        self.idling = defer.Deferred()  # lineReceived fires it with the client's line
        self.idling.addCallback(self._idle_line_received)
        self.resumeProducing()  # read DONE while the command runs
        unwatch: Callable[[], None] = lambda: None
        if self.sel is not None and self.changes is not None and self.user:
            unwatch = self.changes.watch_folder(self.user, self.sel.folder.name,
                                                self._folder_changed)
        try:
            while self.idle_line is None:
                self.idle_again = False
                if self.sel is not None:
                    try:
                        yield self.refresh(shared=True)
                    except LockBusy:
                        pass  # locked by another process past lock_wait: look again next poll
                if self.idle_line is not None or self.closed:
                    break
                if self.idle_again:
                    continue  # a change was announced while we looked: look again
                # Poll the store's cheap state token as well: a change nobody announced (a
                # process on SQLite, the NOTIFY connection down) shows up within idle_poll s.
                self.idle_wake = defer.Deferred()
                call = self.clock.callLater(idle_poll(self), self.idle_wakeup)
                try:
                    yield self.idle_wake
                finally:
                    if call.active():
                        call.cancel()
        finally:
            unwatch()
            self.idling = None
            self.idle_wake = None
        if self.closed:
            return None
        self.pauseProducing()
        self.setTimeout(self.config.limits.imap_timeout)
        if self.idle_line is None or self.idle_line.strip().upper() != b"DONE":
            # RFC 2177 §3: only DONE ends IDLE.
            raise bad("expected DONE")
        yield self.refresh()
        return b"IDLE terminated"

    def _idle_line_received(self, line: bytes) -> None:
        self.idle_line = line
        self.idle_wakeup()

    def idle_wakeup(self) -> None:
        d, self.idle_wake = self.idle_wake, None
        if d is not None and not d.called:
            d.callback(None)
        else:
            self.idle_again = True

    def _folder_changed(self) -> None:
        """A notification names the folder this session idles on: refresh now, past the
        shared token another session may have taken a moment before the change."""
        if self.sel is not None:
            SHARED_TOKENS.forget(self.sel.folder.path)
        self.idle_wakeup()

    def changed_folders(self, name: bytes, args: list[Token]) -> list[str]:
        """The folders a command changes when it succeeds (told to the other sessions and
        instances, docs/design/imap.md "IDLE"); taken before it runs (CLOSE unselects)."""
        sel = self.sel
        selected = [sel.folder.name] if sel is not None and not sel.readonly else []
        try:
            if name == b"APPEND" and args:
                return [decode_name(astring(args[0]), self.rev2)]
            if name in (b"COPY", b"MOVE") and len(args) == 2:
                return [decode_name(astring(args[1]), self.rev2)] + (
                    selected if name == b"MOVE" else [])
        except (CommandError, ParseError, ValueError, TypeError):
            return []
        if name in (b"STORE", b"EXPUNGE", b"CLOSE"):
            return selected
        return []

    def tell_changed(self, result: object, folders: list[str]) -> object:
        if isinstance(result, bytes) and self.changes is not None and self.user:
            for folder in folders:
                self.changes.mailbox_changed(self.user, folder)
        return result

    def shared_state_token(self, folder: Folder) -> defer.Deferred:
        return SHARED_TOKENS.token(folder, self)


def idle_poll(session: Session) -> float:
    return max(MIN_POLL, float(session.config.imap.idle_poll))


class SharedStateTokens:
    """folder.state_token(), computed at most once per 0.8 poll interval per folder path, so
    200 sessions idling on one folder cost one stat round per poll, not 200."""

    def __init__(self) -> None:
        self._checks: dict[str, tuple[float, defer.Deferred, list[object]]] = {}

    def forget(self, path: str) -> None:
        """The folder changed: the next token() looks at the disk again."""
        self._checks.pop(path, None)

    def token(self, folder: Folder, session: Session) -> defer.Deferred:
        now = session.clock.seconds()
        entry = self._checks.get(folder.path)
        if entry is None or now - entry[0] > idle_poll(session) * 0.8 or now < entry[0]:
            entry = self._check(folder, session, now)
        _, d, holder = entry
        if holder:
            # The generation part is per process, so a token computed a moment ago is still valid.
            return defer.succeed(holder[0])
        result: defer.Deferred = defer.Deferred()

        def share(token: object) -> object:
            result.callback(token)
            return token

        def fail(f: object) -> None:
            result.errback(f)
        d.addCallbacks(share, fail)
        return result

    def _check(self, folder: Folder, session: Session,
               now: float) -> tuple[float, defer.Deferred, list[object]]:
        d = session.io(folder.state_token)
        holder: list[object] = []

        def keep(token: object) -> object:
            holder.append(token)
            return token
        d.addCallback(keep)
        entry = (now, d, holder)
        self._checks[folder.path] = entry
        if len(self._checks) > 10000:  # forget folders nobody idles on any more
            for k in [k for k, v in self._checks.items() if now - v[0] > 60]:
                del self._checks[k]
        return entry


SHARED_TOKENS = SharedStateTokens()  # one per process, like the store's folder index

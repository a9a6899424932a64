"""IDLE (RFC 2177; authenticated and selected states): wait for DONE, and meanwhile tell the
client about new mail by polling the selected folder's state token every IDLE_POLL seconds on
the session's clock. See docs/design/imap.md, "IDLE".
"""
from __future__ import annotations

from typing import Optional

from twisted.internet import defer

from mailsuite.imap.parser import Token
from mailsuite.imap.responses import bad
from mailsuite.imap.session import Session
from mailsuite.mailbox.errors import LockBusy
from mailsuite.mailbox.store import Folder

IDLE_POLL = 0.5  # seconds between checks of the folder's state token while idling


class IdleCommand(Session):
    """The IDLE handler. `lineReceived` hands the client's next line to `idling`."""

    idling: Optional[defer.Deferred] = None
    idle_wake: Optional[defer.Deferred] = None
    idle_line: Optional[bytes] = None

    @defer.inlineCallbacks
    def do_IDLE(self, tag: bytes, args: list[Token]):
        self.send(b"+ idling")
        self.setTimeout(max(self.config.limits.imap_timeout, 1800))
        self.idle_line = None
        self.idling = defer.Deferred()  # lineReceived fires it with the client's line
        self.idling.addCallback(self._idle_line_received)
        self.resumeProducing()  # read DONE while the command runs
        try:
            while self.idle_line is None:
                if self.sel is not None:
                    try:
                        yield self.refresh(shared=True)
                    except LockBusy:
                        pass  # locked by another process past lock_wait: look again next poll
                if self.idle_line is not None or self.closed:
                    break
                # Poll the store's cheap state token: a delivery by the queue (another thread,
                # or another process) shows up as EXISTS within IDLE_POLL seconds.
                self.idle_wake = defer.Deferred()
                call = self.clock.callLater(IDLE_POLL, self.idle_wakeup)
                try:
                    yield self.idle_wake
                finally:
                    if call.active():
                        call.cancel()
        finally:
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

    def shared_state_token(self, folder: Folder) -> defer.Deferred:
        return SHARED_TOKENS.token(folder, self)


class SharedStateTokens:
    """folder.state_token(), computed at most once per IDLE_POLL*0.8 s per folder path, so 200
    sessions idling on one folder cost one stat round per poll, not 200."""

    def __init__(self) -> None:
        self._checks: dict[str, tuple[float, defer.Deferred, list[object]]] = {}

    def token(self, folder: Folder, session: Session) -> defer.Deferred:
        now = session.clock.seconds()
        entry = self._checks.get(folder.path)
        if entry is None or now - entry[0] > IDLE_POLL * 0.8 or now < entry[0]:
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

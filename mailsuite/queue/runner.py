"""The queue runner: delivers every recipient of every spooled message, with retries and bounces.

Life of an entry: `submit()` spools it (fsynced; then the SMTP server says 250) and attempts it at
once. Each attempt claims the entry (flock, so several processes on one spool never work on it at
the same time), hands the due local recipients to the `local` DeliveryAgent and saves their
outcome, hands the due remote ones to the `remote` DeliveryAgent, records each outcome in the
envelope, and removes the entry once every recipient is sent or bounced. Deferred recipients wait
for `retry_schedule`; past `max_age` they bounce. The `notifier` builds the DSNs (bounce, delay
warning) and this runner submits them. Details: docs/design/queue.md.

Waking up: a timer for the next due entry, a full rescan every `scan_interval` (entries of other
processes, a restart), and a poll of `<queue_dir>/.kick` every KICK_POLL seconds, which
`mailsuite queue retry|release` touches so a running server acts within about a second.
"""
from __future__ import annotations

import errno
import functools
import heapq
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsuite import maillog
from mailsuite.config import QueueSection
from mailsuite.pools import WorkPool
from mailsuite.queue.agents import (BounceNotifier, DeliveryAgent, LocalCopy, Notification,
                                    StagedFile)
from mailsuite.queue.attempts import Work, apply_result, entry_due, expand_recipients
from mailsuite.queue.commit import GroupCommit
from mailsuite.queue.spool import (DeliveryResult, QueueEntry, Recipient, Sidecar, Spool,
                                   SpoolError, Stamp, head_of, new_queue_id,
                                   read_head)

log = Logger(namespace="mailsuite.queue")

KICK_POLL = 0.5  # seconds between looks at the .kick file
PEER_POLL = 1.0  # seconds between looks at the other instances' liveness locks
BUSY_RETRY = 5.0  # seconds before looking again at an entry another process has claimed
NO_REMOTE = "451 4.3.2 no remote delivery configured"
NULL_SENDER = "no bounce for the null sender <>"
_RECEIVED = re.compile(rb"^received:", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class _Skip:
    """What the first io job of an attempt says when there is nothing to do now."""

    due: float | None  # next attempt (inf: held or damaged), None: the entry is gone
    damage: str = ""  # reported once, on the reactor thread


class QueueRunner(Service):
    """The twisted Service that owns the spool of one process."""

    name = "queue"
    # Entries worked on at the same time by this process. Remote attempts can take minutes
    # (timeouts), so this is generous; the courier has its own per-domain connection caps.
    max_parallel = 64

    def __init__(self, spool: Spool, settings: QueueSection, io: WorkPool, clock: IReactorTime,
                 local: DeliveryAgent, remote: DeliveryAgent | None, notifier: BounceNotifier,
                 group: GroupCommit | None = None):
        self.spool = spool
        self.config = settings
        self.io = io
        self.clock = clock
        self.local = local
        self.remote = remote
        self.notifier = notifier
        # Directory fsyncs of submit_file, shared by the messages that arrive together.
        self.group = group if group is not None else GroupCommit(io)
        self._due: dict[str, float] = {}  # id -> when it next needs an attempt (inf: never)
        # (due, id) min-heap over _due; entries whose due no longer matches _due are stale and
        # skipped, so updates are O(log n) and a big backlog does not make _pump quadratic.
        self._heap: list[tuple[float, str]] = []
        # id -> ((inode, mtime_ns), due), used by the io thread of _scan only. Every envelope
        # rewrite is a rename to a new inode, so the key changes even if the clock is coarse.
        self._envelope_cache: dict[str, tuple[tuple[int, int], float]] = {}
        self._damaged: set[str] = set()  # entries without message file, already reported
        self._forced: set[str] = set()  # kick(): attempt every pending recipient now
        # id -> the stamp of the envelope this process last wrote, recording every local
        # delivery it made (submitted here, or last attempted here to a clean end). An entry
        # whose envelope has another stamp (left by a crash, touched by another process, which
        # marks it before writing copies, or after an attempt that failed half-way) is
        # delivered with `after_crash`, so copies already written are found, not written twice
        # (docs/design/queue.md, "Exactly once").
        self._settled: dict[str, Stamp] = {}
        self._unlink_later: list[Sidecar] = []  # spool-time envelopes whose lines are written
        self._inflight: dict[str, defer.Deferred] = {}
        self._timer: IDelayedCall | None = None
        self._wake_call: IDelayedCall | None = None
        self._loops: list[task.LoopingCall] = []
        self._kick_seen: int | None = None
        self._scanning = False
        # Ids whose due time was set while a scan's listing ran: the listing may predate them.
        self._set_in_scan: set[str] = set()
        self._stopping = False

    # -- public API ----------------------------------------------------------------------------
    def submit(self, sender: str, recipients: Sequence[tuple[str, Any]], data: bytes,
               meta: Mapping[str, Any] | None = None) -> defer.Deferred:
        """Spool a message; fires with its queue id once message and envelope are fsynced."""
        entry = self._new_entry(sender, recipients, meta)
        if not entry.recipients:
            return defer.fail(ValueError("a queue entry needs at least one recipient"))
        d = self.io.run(self._store_blocking, entry, data)
        return d.addCallback(self._stored, entry, len(data))

    def _store_blocking(self, entry: QueueEntry, data: bytes) -> Stamp | None:
        self.spool.store(entry, data)
        return self.spool.stamp(entry.id)

    @property
    def incoming_dir(self) -> str:
        """Where receivers stage messages for `submit_file` (created on first use)."""
        return self.spool.incoming_dir

    def submit_file(self, sender: str, recipients: Sequence[tuple[str, Any]],
                    path: str | StagedFile, size: int, meta: Mapping[str, Any] | None = None
                    ) -> defer.Deferred:
        """Spool a message staged in `incoming_dir`, taking the file over; fires with its queue
        id once message and envelope are fsynced, or once every local copy is (an entry of
        local recipients only is delivered in the same io job and never spooled: "Delivery at
        spool time" in docs/design/queue.md). On failure the file is at `path` or gone. A
        StagedFile is taken over in the io job that writes its last bytes (one job, not two)."""
        entry = self._new_entry(sender, recipients, meta)
        if not entry.recipients:
            return defer.fail(ValueError("a queue entry needs at least one recipient"))
        take_over = functools.partial(self._store_file_blocking, entry)
        if isinstance(path, str):
            d = self.io.run(take_over, path)
        else:  # a small message may still be all in memory: no staged file then
            d = path.finish(take_over, functools.partial(self._store_data_blocking, entry))
        d.addCallback(self._commit, entry)
        return d.addCallback(self._accepted, entry, size)

    def _store_data_blocking(self, entry: QueueEntry, data: bytes) -> _Stored:
        """io job: as `_store_file_blocking`, for a message that is all in memory: the local
        copies are written from `data`, and a staged file is made only to spool the entry."""
        return self._store_file_blocking(entry, None, data)

    def _store_file_blocking(self, entry: QueueEntry, path: str | None,
                             data: bytes | None = None) -> _Stored:
        """io job: deliver the local copies now if every recipient is local (no directory
        fsync: the group commit does those), else (or for what failed) spool the entry.
        The message is the file at `path`, or `data` (path None)."""
        deliver_now = getattr(self.local, "deliver_now", None)
        if (deliver_now is None or not all(r.local for r in entry.recipients)
                or self._is_loop_text(read_head(path) if data is None else head_of(data))):
            self._spool_blocking(entry, path, data)
            return _Stored({self.spool.directory}, [], True, self.spool.stamp(entry.id))
        # Until the log lines of the copies are written, this envelope tells the others which
        # copies a kill -9 may have left without one ("The mail log" in docs/design/queue.md).
        sidecar = self.spool.write_sidecar(entry)
        try:
            copies: list[LocalCopy] = (deliver_now(entry, path) if data is None
                                       else deliver_now(entry, None, data))
        except BaseException:
            self.spool.clear_sidecars([sidecar])
            raise
        sent = [(r, c) for r, c in zip(entry.recipients, copies)
                if c.result.status == "sent" and c.path is not None]
        directories = {os.path.dirname(c.path) for _, c in sent if c.path is not None}
        for rcpt, copy in sent:
            apply_result(entry, rcpt, copy.result, self.clock.seconds(),
                         list(self.config.retry_schedule), float(self.config.max_age))
        if len(sent) == len(entry.recipients):
            if path is not None:
                try:
                    os.unlink(path)  # every copy is written: the staged file has done its job
                except FileNotFoundError:
                    pass
            return _Stored(directories, sent, False, sidecar=sidecar)
        # Some copy failed (a full or broken Maildir): the envelope records the copies made
        # and the rest stay pending for the runner's attempt, which logs why.
        stored = _Stored(directories | {self.spool.directory}, sent, True, sidecar=sidecar)
        try:
            self._spool_blocking(entry, path, data)
            stored.stamp = self.spool.stamp(entry.id)
        except BaseException:
            stored.spooled = False  # nothing in the spool; the client is told to send again
            self._unstore_blocking(entry, stored)
            raise
        return stored

    def _spool_blocking(self, entry: QueueEntry, path: str | None, data: bytes | None) -> None:
        """io thread: the entry into the spool, without the directory fsync (group commit);
        from the staged file at `path` (left there on failure) or from `data`."""
        if data is None:
            assert path is not None
            self.spool.store_file(entry, path, sync_dir=False)
        else:
            self.spool.store(entry, data, sync_dir=False)

    def _commit(self, stored: _Stored, entry: QueueEntry) -> defer.Deferred:
        """Wait for the group commit of the directories the io job renamed into; if that
        fsync fails, take everything back (the client gets a 451) and fail."""
        def failed(f: Failure) -> defer.Deferred:
            undo = self.io.run(self._unstore_blocking, entry, stored)
            return undo.addBoth(lambda _: f)

        return self.group.sync(stored.directories).addCallbacks(lambda _: stored, failed)

    def _unstore_blocking(self, entry: QueueEntry, stored: _Stored) -> None:
        if stored.spooled:
            self.spool.unstore(entry.id)
        for path in [c.path for _, c in stored.copies]:
            if path is not None:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        if stored.sidecar is not None:
            self.spool.clear_sidecars([stored.sidecar])

    def _accepted(self, stored: _Stored, entry: QueueEntry, size: int) -> str:
        if stored.spooled:
            self._stored(stored.stamp, entry, size)
        else:
            maillog.received(entry, size)
            now = self.clock.seconds()
            for rcpt, copy in stored.copies:
                maillog.attempt(entry, rcpt, "sent", copy.result, now, "local")
            maillog.removed(entry.id)
        if stored.sidecar is not None:
            # It goes once its copies' lines (emitted above) are handed to the OS.
            self._forget_sidecar(stored.sidecar)
        return entry.id

    def _forget_sidecar(self, sidecar: Sidecar) -> None:
        """Clear spool-time envelopes in batches: one log flush and one io job for all the
        messages accepted in this reactor turn."""
        self._unlink_later.append(sidecar)
        if len(self._unlink_later) == 1:
            self.clock.callLater(0, self._sync_then_unlink)

    def _sync_then_unlink(self) -> None:
        batch, self._unlink_later = self._unlink_later, []
        maillog.sync().addCallback(lambda _: self._unlink_batch(batch))

    def _unlink_batch(self, batch: list[Sidecar]) -> None:
        self.io.run(self.spool.clear_sidecars, batch).addErrback(
            lambda f: log.warn("cannot clear a spool-time envelope: {error}",
                               error=_os_error(f.value)))

    def _is_loop_text(self, headers: bytes) -> bool:
        return len(_RECEIVED.findall(headers)) > self.config.max_received_headers

    def _new_entry(self, sender: str, recipients: Sequence[tuple[str, Any]],
                   meta: Mapping[str, Any] | None) -> QueueEntry:
        now = self.clock.seconds()
        return QueueEntry(id=new_queue_id(now), sender=sender,
                          recipients=expand_recipients(recipients), created=now,
                          meta=dict(meta or {}))

    def _stored(self, stamp: Stamp | None, entry: QueueEntry, size: int) -> str:
        if stamp is not None:  # this process wrote it: no crash leftover to look for
            self._settled[entry.id] = stamp
        maillog.received(entry, size)
        for rcpt in entry.recipients:  # copies delivered at spool time
            if rcpt.state == "sent":
                maillog.attempt(entry, rcpt, "sent", DeliveryResult(
                    rcpt.address, "sent", "250 2.0.0 delivered to maildir at spool time",
                    enhanced="2.0.0"), self.clock.seconds(), "local")
        if self.running and not self._stopping:
            self._set_due(entry.id, 0.0)
            self._wake()
        return entry.id

    def backlog(self) -> tuple[int, float | None]:
        """Entries in the spool as this process last saw it, and when the oldest was created
        (queue ids begin with it: spool.new_queue_id); for the metrics, so no directory scan."""
        if not self._due:
            return 0, None
        return len(self._due), float(int(min(self._due)[:8], 16))

    def kick(self, entry_id: str | None = None) -> defer.Deferred:
        """Attempt one entry (or all, with None) now, ignoring its retry time.

        Fires when the attempt(s) this call started have finished.
        """
        if entry_id is None:
            d = self._scan()
            d.addCallback(lambda _: defer.gatherResults(
                [self.kick(i) for i in list(self._due)], consumeErrors=True))
            return d.addCallback(lambda _: None)
        self._forced.add(entry_id)
        if entry_id in self._inflight:
            # Attempt again right after the one in progress.
            return self._inflight[entry_id].addCallback(lambda _: self.kick(entry_id))
        self._set_due(entry_id, 0.0)
        return self._start(entry_id)

    # -- service -------------------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self._stopping = False
        try:
            # Before anything is received: from now on our staged files have a live owner.
            self.spool.instances.register()
        except OSError as e:
            log.warn("queue: cannot take the liveness lock {path}: {error}",
                     path=self.spool.instances.lock_path(self.spool.instances.name),
                     error=_os_error(e))
        self._start_up()

    def _start_up(self) -> None:
        if self._stopping or not self.running:
            return

        def failed(f: Failure) -> None:
            if not f.check(OSError):
                log.failure("queue start-up failed", f)
                return
            # An environment fault (EMFILE, EIO, ...): one line, and try again later.
            log.warn("queue start-up failed: {error}; retrying in {delay:g}s",
                     error=_os_error(f.value), delay=self.config.scan_interval)
            self.clock.callLater(max(self.config.scan_interval, 0.1), self._start_up)

        d = self.io.run(self._startup_blocking)
        d.addCallback(self._started)
        d.addErrback(failed)

    def _startup_blocking(self) -> tuple[int, _Takeover]:
        self.spool.ensure()
        return self.spool.kick_mtime(), self._takeover_blocking()

    def _started(self, result: tuple[int, "_Takeover"]) -> None:
        kick_mtime, takeover = result
        self._taken_over(takeover)
        if self._stopping:
            return
        self._kick_seen = kick_mtime
        scan = task.LoopingCall(self._scan)
        scan.clock = self.clock
        kick = task.LoopingCall(self._check_kick)
        kick.clock = self.clock
        peers = task.LoopingCall(self._check_peers)
        peers.clock = self.clock
        self._loops = [scan, kick, peers]
        # The first scan delivers whatever a previous run (or a crash) left in the spool.
        scan.start(max(self.config.scan_interval, 0.1), now=True).addErrback(
            lambda f: log.failure("queue scan loop died", f))
        kick.start(KICK_POLL, now=False).addErrback(
            lambda f: log.failure("queue kick loop died", f))
        peers.start(PEER_POLL, now=False).addErrback(
            lambda f: log.failure("queue instance check loop died", f))

    def stopService(self) -> None:
        # Attempts in progress are abandoned where they stand: what was delivered is already in
        # the envelope (saved right after the local agent returned), the rest stays pending.
        # We must not start new io jobs: the pools stop right after us.
        super().stopService()
        self._stopping = True
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        for call in (self._timer, self._wake_call):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._wake_call = None
        self.spool.close_sidecars()
        self.spool.instances.unregister()

    # -- scheduling ----------------------------------------------------------------------------
    def _scan(self) -> defer.Deferred:
        """Re-read every envelope on disk (other processes, the admin CLI, a restart)."""
        if self._scanning or self._stopping:
            return defer.succeed(None)
        self._scanning = True
        self._set_in_scan = set()

        def scanned(result: tuple[dict[str, float], list[tuple[str, str]]]) -> None:
            found, damaged = result
            self._scanning = False
            for queue_id, error in damaged:
                maillog.damaged(queue_id, error)
            due = {i: d for i, d in found.items() if i not in self._inflight}
            # What was set meanwhile is newer than the listing (an entry submitted after it,
            # an attempt that ended): kept, or it would wait for the next scan.
            recent = self._set_in_scan | self._inflight.keys()
            due.update({i: d for i, d in self._due.items() if i in recent})
            self._set_in_scan = set()
            self._due = due
            # Forget ids that left the spool some other way (the admin CLI, another process).
            keep = found.keys() | recent
            self._settled = {i: v for i, v in self._settled.items() if i in keep}
            self._heap = [(d, i) for i, d in due.items() if i not in self._inflight]
            heapq.heapify(self._heap)
            self._pump()

        def failed(f: Failure) -> None:
            self._scanning = False
            if f.check(OSError):  # EMFILE, ENFILE, EIO: the next scan tries again
                log.warn("queue scan failed: {error}; next scan in {delay:g}s",
                         error=_os_error(f.value), delay=self.config.scan_interval)
            else:
                log.failure("queue scan failed", f)

        return self.io.run(self._scan_blocking).addCallbacks(scanned, failed)

    def _scan_blocking(self) -> tuple[dict[str, float], list[tuple[str, str]]]:
        """io thread: id -> due of every entry, and the envelopes newly found unreadable; only
        changed envelopes are parsed again."""
        self.spool.cleanup()
        cache = self._envelope_cache
        found: dict[str, float] = {}
        damaged: list[tuple[str, str]] = []
        for queue_id in self.spool.ids():
            try:
                st = os.stat(self.spool.envelope_path(queue_id))
                key = (st.st_ino, st.st_mtime_ns)
                cached = cache.get(queue_id)
                if cached is None or cached[0] != key:
                    try:
                        due = entry_due(self.spool.load(queue_id))
                    except SpoolError as e:
                        # Reported once per version of the file, then left for the admin.
                        damaged.append((queue_id, str(e)))
                        due = float("inf")
                    cached = cache[queue_id] = (key, due)
            except OSError:
                continue  # delivered and removed meanwhile
            found[queue_id] = cached[1]
        for queue_id in set(cache) - set(found):
            del cache[queue_id]
        return found, damaged

    def _check_kick(self) -> defer.Deferred | None:
        if self._stopping:
            return None

        def seen(mtime: int) -> None:
            if mtime != self._kick_seen:
                self._kick_seen = mtime
                log.info("queue: retry requested by the admin, rescanning")
                self._scan()

        def failed(f: Failure) -> None:
            if f.check(OSError):
                log.warn("queue kick check failed: {error}", error=_os_error(f.value))
            else:
                log.failure("queue kick check failed", f)

        return self.io.run(self.spool.kick_mtime).addCallbacks(seen, failed)

    def _check_peers(self) -> defer.Deferred | None:
        """Another process on the spool died (its liveness lock is free): take its files over
        and rescan at once, not at the next `scan_interval` (docs/design/queue.md,
        "Instances")."""
        if self._stopping:
            return None

        def checked(dead: list[str]) -> defer.Deferred | None:
            if not dead or self._stopping:
                return None
            for name in dead:
                maillog.instance_gone(name)
            d = self.io.run(self._takeover_blocking)
            d.addCallback(self._taken_over)
            return d.addCallback(lambda _: self._scan())

        def failed(f: Failure) -> None:
            if f.check(OSError):
                log.warn("queue instance check failed: {error}", error=_os_error(f.value))
            else:
                log.failure("queue instance check failed", f)

        return self.io.run(self.spool.instances.reap).addCallback(checked).addErrback(failed)

    def _takeover_blocking(self) -> "_Takeover":
        """io thread: remove what dead writers left; find the copies of their deliveries at
        spool time, whose log lines they may not have written."""
        removed, unlogged = self.spool.takeover()
        find = getattr(self.local, "find_copies", None)
        found = [(entry, find(entry)) for entry in unlogged] if find is not None else []
        return _Takeover(removed, found)

    def _taken_over(self, takeover: "_Takeover") -> None:
        for name in takeover.removed:
            maillog.leftover(name)
        now = self.clock.seconds()
        for entry, copies in takeover.found:
            for rcpt, result in copies:
                rcpt.attempts = max(rcpt.attempts, 1)
                maillog.attempt(entry, rcpt, "sent", result, now, "local")

    def _wake(self) -> None:
        """Run _pump soon, once, from a clean stack (coalesces many wake-ups into one)."""
        if self._stopping or not self.running:
            return
        if self._wake_call is None or not self._wake_call.active():
            self._wake_call = self.clock.callLater(0, self._pump)

    def _pump(self) -> None:
        """Start attempts for due entries, then sleep until the next one is due."""
        if self._stopping or not self.running:
            return
        now = self.clock.seconds()
        heap = self._heap
        while heap and len(self._inflight) < self.max_parallel:
            due, queue_id = heap[0]
            if self._due.get(queue_id) != due or queue_id in self._inflight:
                heapq.heappop(heap)  # stale
                continue
            if due > now:
                break
            heapq.heappop(heap)
            self._start(queue_id)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if heap and len(self._inflight) < self.max_parallel and heap[0][0] != float("inf"):
            delay = min(heap[0][0] - now, self.config.scan_interval)
            self._timer = self.clock.callLater(max(delay, 0.01), self._pump)

    def _set_due(self, queue_id: str, due: float) -> None:
        self._due[queue_id] = due
        if self._scanning:
            self._set_in_scan.add(queue_id)
        if due != float("inf"):
            heapq.heappush(self._heap, (due, queue_id))

    def _start(self, queue_id: str) -> defer.Deferred:
        if self._stopping or queue_id in self._inflight:
            return defer.succeed(None)
        # Registered before the attempt runs: with an inline pool it may finish at once.
        d = self._inflight[queue_id] = defer.Deferred()
        force = queue_id in self._forced
        self._forced.discard(queue_id)

        def done(result: Any) -> Any:
            self._inflight.pop(queue_id, None)
            if isinstance(result, Failure):
                # Local copies may be written but not recorded: look for them next time.
                self._settled.pop(queue_id, None)
                if result.check(OSError):  # EMFILE, ENOSPC on the envelope, EIO: one line
                    maillog.environment_fault(queue_id, "attempt failed",
                                              _os_error(result.value))
                else:
                    maillog.internal_error(queue_id, "attempt failed", result)
                self._set_due(queue_id, self.clock.seconds() + self.config.scan_interval)
                result = None
            elif result is None:
                self._due.pop(queue_id, None)
                self._settled.pop(queue_id, None)
            else:
                self._set_due(queue_id, result)
            self._wake()
            return None

        d.addBoth(done)
        self._attempt(queue_id, force=force).chainDeferred(d)
        return d

    # -- one attempt ---------------------------------------------------------------------------
    @defer.inlineCallbacks
    def _attempt(self, queue_id: str, force: bool = False) -> Any:
        """Work on one entry; returns its next due time, or None once it is gone."""
        work = yield self.io.run(self._claim_blocking, queue_id, force,
                                 self._settled.get(queue_id))
        if isinstance(work, _Skip):
            if work.damage:
                maillog.damaged(queue_id, work.damage)
            return work.due  # claimed elsewhere (retry later), held (inf), or gone (None)
        try:
            work.flush_logs()  # a mail loop is recorded in the claim job
            if work.local:
                results = yield self._deliver(self.local, work, work.local,
                                              after_crash=work.after_crash)
                work.now = self.clock.seconds()
                work.record(work.local, results, relay="local")
                work.flush_logs()
            if work.changed or work.can_finish_now(self.config):
                # The lines first: a kill -9 after the save must not take them along.
                yield maillog.sync()
                # Saved before anything else happens, even while stopping: a crash or stop
                # while remote delivery runs must not deliver these local copies again.
                yield self.io.run(self._save_local_blocking, work)
                if work.stamp is not None:
                    self._settled[queue_id] = work.stamp
            if work.finished:
                maillog.removed(queue_id)
                return None
            if self._stopping:
                return None
            yield self._attempt_remote(work)
            if self._stopping:
                return None
            yield self._notify(work)
            if self._stopping:
                return None
            yield maillog.sync()  # every delivery's line before the envelope records it
            due = yield self.io.run(self._finish_blocking, work)
            work.claim = None  # released by _finish_blocking
            if due is None:
                maillog.removed(queue_id)
            elif work.stamp is not None:
                self._settled[queue_id] = work.stamp  # the envelope we saved says all we did
            return due
        finally:
            if work.claim is not None:
                work.claim.release()

    def _claim_blocking(self, queue_id: str, force: bool,
                        settled: Stamp | None = None) -> "Work | _Skip":
        """io thread: claim, read the envelope, check for loops, sort the due recipients.
        `settled`: the stamp of the envelope as this process last wrote it, if it did."""
        claim = self.spool.claim(queue_id)
        if claim is None:
            if not os.path.exists(self.spool.envelope_path(queue_id)):
                return _Skip(None)  # delivered and removed (by us or another process), deleted
            if not os.path.exists(self.spool.message_path(queue_id)):
                if queue_id in self._damaged:
                    return _Skip(float("inf"))
                self._damaged.add(queue_id)  # io thread only; reported once per entry
                return _Skip(float("inf"), "envelope without message file; remove it with "
                                           f"`mailsuite queue delete {queue_id}`")
            return _Skip(self.clock.seconds() + BUSY_RETRY)  # another process works on it
        try:
            entry = self.spool.load(queue_id)
        except Exception:
            claim.release()
            raise
        if entry.held:
            claim.release()
            return _Skip(float("inf"))
        now = self.clock.seconds()
        work = Work(claim=claim, entry=entry, now=now,
                     message_path=self.spool.message_path(queue_id),
                     retry_schedule=list(self.config.retry_schedule),
                     max_age=float(self.config.max_age))
        pending = [r for r in entry.recipients if r.state == "pending"]
        due = [r for r in pending if force or r.next_attempt <= now]
        work.retry_bounce = bool(entry.bounce_pending) and (force or entry.bounce_at <= now)
        if due and self._is_loop(queue_id):
            # RFC 5321 §6.3: a message with too many trace headers is looping; bounce it,
            # local recipients included, with RFC 3463 5.4.6 (routing loop detected).
            limit = self.config.max_received_headers
            detail = f"554 5.4.6 mail loop: more than {limit} Received headers"
            work.record(due, [DeliveryResult(r.address, "bounced", detail, enhanced="5.4.6")
                              for r in due], relay="local")
            due = []
        work.local = [r for r in due if r.local]
        work.remote = [r for r in due if not r.local]
        stamp = self.spool.stamp(queue_id)
        work.stamp = stamp
        work.after_crash = settled is None or settled != stamp
        if work.local and work.after_crash:
            # Not as we left it (or never ours): tell the process that last saved it that
            # someone else may write copies now, before writing any.
            try:
                self.spool.mark(queue_id)
                work.stamp = self.spool.stamp(queue_id)
            except BaseException:
                claim.release()
                raise
        return work

    def _save_local_blocking(self, work: Work) -> None:
        """io thread: after local delivery, remove the entry if that was all, else save it."""
        if work.can_finish_now(self.config):
            # The common case, all local and all delivered: remove at once, no extra save.
            self.spool.remove(work.entry.id)
            work.claim.release()
            work.claim = None
            work.finished = True
            return
        work.stamp = self.spool.save(work.entry)
        work.changed = False

    def _is_loop(self, queue_id: str) -> bool:
        return self._is_loop_text(self.spool.read_headers(queue_id))

    @defer.inlineCallbacks
    def _deliver(self, agent: DeliveryAgent, work: Work, recipients: list[Recipient],
                 after_crash: bool = False) -> Any:
        """Call one agent; a crash in it defers these recipients, never loses the entry.
        `after_crash` (local agent only) asks it to look for copies it may already have
        written (docs/design/queue.md, "Exactly once")."""
        extra = {"after_crash": True} if after_crash else {}
        try:
            results = yield defer.maybeDeferred(agent.deliver, work.entry, list(recipients),
                                                work.message_path, **extra)
        except Exception as e:
            what = "local delivery" if agent is self.local else "remote delivery"
            maillog.internal_error(work.entry.id, f"{what} crashed", Failure())
            text = "internal error" if agent is self.local else "remote delivery error"
            results = [DeliveryResult(r.address, "deferred", f"451 4.3.0 {text}: {e}")
                       for r in recipients]
        return list(results or [])

    @defer.inlineCallbacks
    def _attempt_remote(self, work: Work) -> Any:
        if not work.remote:
            return
        if self.remote is None:
            results = [DeliveryResult(r.address, "deferred", NO_REMOTE) for r in work.remote]
        else:
            results = yield self._deliver(self.remote, work, work.remote)
        work.now = self.clock.seconds()
        work.record(work.remote, results, relay=None)
        work.flush_logs()

    @defer.inlineCallbacks
    def _notify(self, work: Work) -> Any:
        """Delay warning (once) and bounces: the notifier builds them, we queue them."""
        entry = work.entry
        work.now = self.clock.seconds()
        if work.needs_warning(self.config):
            entry.warned = True
            work.changed = True
            pending = [r for r in entry.recipients if r.state == "pending"]
            yield self._send_notification("delayed", self.notifier.delay, work, pending)
        bounced = list(work.bounced)
        if work.retry_bounce:  # a bounce an environment fault held back last time
            bounced += [entry.recipients[i] for i in entry.bounce_pending
                        if 0 <= i < len(entry.recipients)
                        and entry.recipients[i] not in bounced]
        if not bounced:
            return
        if not entry.sender:
            # RFC 3464 §4 / RFC 5321 §6.1: never bounce a bounce.
            maillog.dsn_skipped(entry, "failed", NULL_SENDER)
            return
        sent = yield self._send_notification("failed", self.notifier.bounce, work, bounced)
        if sent is False and work.now - entry.created < 2 * self.config.max_age:
            # The database is down or the disk full: the sender must still hear of it, so
            # the entry stays for another try (given up after twice max_age).
            index = {id(r): i for i, r in enumerate(entry.recipients)}
            entry.bounce_pending = sorted({index[id(r)] for r in bounced})
            step = self.config.retry_schedule[0] if self.config.retry_schedule else 300
            entry.bounce_at = work.now + step
            work.changed = True
        elif entry.bounce_pending:
            entry.bounce_pending = []
            entry.bounce_at = 0.0
            work.changed = True

    @defer.inlineCallbacks
    def _send_notification(self, action: str, build: Callable[..., defer.Deferred],
                           work: Work, recipients: list[Recipient]) -> Any:
        """Fires with True (queued, or nothing to send), False after an environment fault
        (worth another try), None after any other failure (logged with its traceback)."""
        entry = work.entry
        try:
            notification: Notification | None = yield defer.maybeDeferred(
                build, entry, recipients, work.message_path)
            if notification is None:
                return True
            dsn_id = yield self.submit("", notification.recipients, notification.data,
                                       notification.meta)
        except Exception as e:
            if _environment_fault(e):
                maillog.dsn_failed(entry, action, error=_os_error(e))
                return False
            maillog.dsn_failed(entry, action, Failure())
            return None
        maillog.dsn_queued(entry, action, dsn_id, len(recipients))
        return True

    def _finish_blocking(self, work: Work) -> float | None:
        """io thread: remove the finished entry or save it, then release the claim."""
        try:
            entry = work.entry
            if all(r.state != "pending" for r in entry.recipients) and not entry.bounce_pending:
                self.spool.remove(entry.id)
                return None
            if work.changed:
                work.stamp = self.spool.save(entry)
            return entry_due(entry)
        finally:
            work.claim.release()


@dataclass
class _Stored:
    """What the io job of `submit_file` did: the directories to fsync before the 250, the
    copies it delivered (with their recipients), and whether the entry is in the spool."""

    directories: set[str]
    copies: list[tuple[Recipient, LocalCopy]]
    spooled: bool
    stamp: Stamp | None = None  # of the envelope, when spooled
    sidecar: Sidecar | None = None  # the spool-time envelope, until the log lines are written


@dataclass
class _Takeover:
    """What the leftovers of dead processes were: files removed, and the copies found of
    their deliveries at spool time (to be logged)."""

    removed: list[str]
    found: list[tuple[QueueEntry, list[tuple[Recipient, DeliveryResult]]]]


def _environment_fault(e: BaseException) -> bool:
    """A fault of the environment, not of our code: the disk, the file table, the database.
    (Recognised by name: the runner imports no directory code.)"""
    return isinstance(e, OSError) or any(c.__name__ == "DirectoryUnavailable"
                                         for c in type(e).__mro__)


def _os_error(e: BaseException) -> str:
    """An OSError in a few words for a log line (no traceback: an environment fault)."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} ({errno.errorcode.get(e.errno, e.errno)})" if e.errno else e.strerror
    return str(e)

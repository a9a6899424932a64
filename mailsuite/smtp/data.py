"""The DATA phase of the SMTP server: each line of the message checked (line length, NUL, bare
CR/LF, size) and streamed to a staged file through a bounded buffer, the header checks at the end
(Received loop, the submission From: check), and the hand-over to the queue before the 250
(docs/design/smtp.md, "DATA"). A mixin of `SMTPServer`.
"""
from __future__ import annotations

import email.utils
import errno
import os
import re
import time
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsuite import unique
from mailsuite.directory.api import DirectoryUnavailable, Route
from mailsuite.smtp import replies
from mailsuite.smtp.address import PathArgument
from mailsuite.smtp.headers import HeaderScan
from mailsuite.smtp.replies import Reply
from mailsuite.smtp.staging import StagedMessage
from mailsuite.tls import describe_tls
from mailsuite.trust import Envelope, Verdict

log = Logger(namespace="mailsuite.smtp.server")

# Message bytes collected before they are handed to the staged file (one io job).
DATA_FLUSH = 64 * 1024
_BARE_LINE_END = re.compile(rb"\r|\n")


class DataTransfer:
    """The DATA half of `SMTPServer`."""

    def _process_data(self) -> bool:
        """Consume body lines; True when the terminator was seen (mode changed)."""
        buf = self._buffer
        limit = self.limits.max_line_length
        pos = 0
        block_tried = False  # once per read: if the block needs the line rules, so be it
        while True:
            if (not block_tried and not self._continuation and self._data_error is None
                    and not self._scan.in_header):
                block_tried = True
                pos = self._body_block(buf, pos)
            idx = buf.find(b"\r\n", pos)
            if idx < 0:
                break
            line = bytes(buf[pos:idx])
            pos = idx + 2
            continuation, self._continuation = self._continuation, False
            if line == b"." and not continuation:
                del buf[:pos]
                self.resetTimeout()
                self._end_of_data()
                self._progress()
                return True
            self._data_line(line, continuation)
        if pos:
            # Complete message lines are progress too: a long DATA is not an idle client.
            self.resetTimeout()
            self._progress()
        del buf[:pos]
        if len(buf) > limit:
            # A line longer than allowed and still no CRLF: keep memory flat, remember that
            # what comes next is the rest of this line (it can't be the "." terminator).
            self._note_data_error(replies.DATA_LINE_TOO_LONG)
            keep = 1 if buf.endswith(b"\r") else 0
            self._size += len(buf) - keep
            del buf[: len(buf) - keep]
            self._continuation = True
        self._flush_out(DATA_FLUSH)
        return False

    def _body_block(self, buf: bytearray, pos: int) -> int:
        """The common case of the body in one step: every complete line from `pos` up to the
        terminator, when none of them needs the line-by-line rules (no NUL, no bare CR or LF,
        none too long, within the size limit). Dots are unstuffed (RFC 5321 §4.5.2). Returns
        the new position; `pos` itself when the lines must go one by one.

        One split into lines does most of it: the terminator is a line that is only ".", the
        longest line is the longest piece, and a CR or LF left in the pieces is a bare one (the
        single-octet tests are memchr; counting two-octet patterns over the block cost more
        than the split)."""
        end = buf.rfind(b"\r\n", pos)
        if end < 0 or buf.startswith(b".\r\n", pos):
            return pos
        with memoryview(buf) as view:
            block = bytes(view[pos:end])  # complete lines, without the last CRLF
        lines = block.split(b"\r\n")
        if b"." in lines:
            # The terminator (not the first line: checked above) goes through the line-by-line
            # path, with whatever follows it.
            lines = lines[:lines.index(b".")]
            block = b"\r\n".join(lines)
        rest = b"".join(lines)
        if (b"\0" in rest or b"\r" in rest or b"\n" in rest
                or max(map(len, lines)) + 2 > self.limits.max_line_length):
            return pos
        body = block.replace(b"\r\n.", b"\r\n")
        if body.startswith(b"."):
            body = body[1:]
        if self._size + len(body) + 2 > self.limits.max_message_size:
            return pos
        self._size += len(body) + 2
        self._out += body
        self._out += b"\r\n"
        self._flush_out(DATA_FLUSH)
        return pos + len(block) + 2

    def _data_line(self, line: bytes, continuation: bool) -> None:
        if len(line) + 2 > self.limits.max_line_length:
            self._note_data_error(replies.DATA_LINE_TOO_LONG)
        if b"\0" in line:
            # NUL has no place in a message (RFC 5322 §3.5) and truncates strings elsewhere;
            # refused whatever bad_line_endings says.
            self._note_data_error(replies.NUL_IN_MESSAGE)
        if line.startswith(b".") and not continuation:
            line = line[1:]  # RFC 5321 §4.5.2 transparency
        self._size += len(line) + 2
        if self._size > self.limits.max_message_size:
            self._note_data_error(replies.MESSAGE_TOO_BIG)
        if b"\r" in line or b"\n" in line:
            if self.smtp.bad_line_endings != "normalise":
                self._note_data_error(replies.BARE_LINE_ENDING)
            else:
                # Each bare CR or LF becomes CRLF: stored (and relayed) lines are the ones a
                # reader that splits on any line end would see.
                line = _BARE_LINE_END.sub(b"\r\n", line)
        if self._data_error is not None:
            return
        if self._scan.in_header:
            for piece in line.split(b"\r\n"):
                if self._scan.line(piece):
                    self._out += self._added_headers()
                self._out += piece + b"\r\n"
        else:
            self._out += line + b"\r\n"
        self._flush_out(DATA_FLUSH)

    def _flush_out(self, at_least: int = 0) -> None:
        staged = self._staged
        if staged is not None and self._out and len(self._out) >= at_least:
            if at_least and staged.hold(len(self._out)):
                return  # kept in memory to the final dot (docs/design/smtp.md)
            staged.write(bytes(self._out))
            self._out.clear()

    def _added_headers(self) -> bytes:
        """Message-ID and Date where the submitted header section lacks them (RFC 6409 §8)."""
        if not self.policy.add_missing_headers:
            return b""
        headers = b""
        if not self._scan.has_message_id:
            message_id = "<%s.%s@%s>" % (self._txid, unique.token_hex(8), self.hostname)
            self._scan.message_id = message_id
            headers += b"Message-ID: %s\r\n" % message_id.encode()
        if not self._scan.has_date:
            headers += b"Date: %s\r\n" % message_date(time.time()).encode()
        return headers

    def _note_data_error(self, reply: Reply) -> None:
        if self._data_error is None:
            self._data_error = reply
            self._discard_staged()  # nothing of this message will be stored

    def _discard_staged(self) -> None:
        staged, self._staged = self._staged, None
        self._out.clear()
        if staged is not None:
            staged.discard()
        self._hold("disk", False)

    def _end_of_data(self) -> None:
        self._mode = "command"
        self._command = "DATA (end)"
        error, size = self._data_error, self._size
        mail = self._mail
        if error is None and self._scan.received >= self.config.queue.max_received_headers:
            # With ours it would be over the limit: a loop (RFC 5321 §6.3). Refused now rather
            # than accepted and bounced to a sender that may be forged.
            error = replies.MAIL_LOOP
        if error is not None:
            log.info("refused message from=<{sender}> client={client_ip} size={size}: {text}",
                     sender=mail.address if mail else "", client_ip=self.client_ip, size=size,
                     text=error.text)
            self._refusal_logged = True
            self._reset_transaction()
            self._respond(error)
            return
        if self._scan.in_header:
            self._out += self._added_headers()  # a message that is all header
        try:
            self._respond(self._queue_message())
        except Exception:
            log.failure("internal error building the message from {client_ip}",
                        client_ip=self.client_ip)
            self._reset_transaction()
            self._respond(replies.LOCAL_ERROR)

    def _queue_message(self) -> Reply | defer.Deferred | None:
        """The end of DATA: check the headers, finish the staged file, queue it, answer."""
        mail, rcpts, txid, scan = self._mail, list(self._rcpts), self._txid, self._scan
        staged = self._staged
        assert mail is not None and staged is not None
        staged.write_last(bytes(self._out))  # written by the job that finishes the file
        self._out.clear()
        self._staged = None  # ours now: _reset_transaction must not discard it
        self._reset_transaction()
        meta = {"client_ip": self.client_ip, "helo": self.session.helo or "",
                "auth_user": self.session.auth_user, "protocol": self._protocol_name(),
                # for the message's events (docs/design/events.md)
                "listener": self.policy.name, "message_id": scan.message_id,
                "tls": self._tls_description() if self.session.tls else ""}
        return HandOver(self, mail, rcpts, txid, staged, meta).start(scan)

    def _tls_description(self) -> str:
        """describe_tls of this connection, asked once: the cipher does not change in a
        session (STARTTLS begins a new one and forgets it)."""
        if self._tls_text is None:
            self._tls_text = describe_tls(self.transport)
        return self._tls_text

    def _envelope(self, sender: str, rcpts: list[tuple[str, Route]], txid: str) -> Envelope:
        return Envelope(self.client_ip, self.session.helo or "", sender,
                        tuple(a for a, _ in rcpts), self.session.auth_user, self.session.tls,
                        self.policy.name, txid)

    def _queue_failed(self, sender: str, error: Exception) -> Reply:
        """A local failure (disk, database) is temporary: the client must retry, not bounce.
        An OS error is the environment's fault: one line, no traceback."""
        if isinstance(error, OSError):
            log.warn("queueing failed for message from=<{sender}> client={client_ip}: {error}",
                     sender=sender, client_ip=self.client_ip, error=error)
            self._refusal_logged = True
            return replies.QUEUE_FULL if error.errno in (errno.ENOSPC, errno.EDQUOT) \
                else replies.QUEUE_FAILED
        log.failure("queueing failed for message from=<{sender}> client={client_ip}",
                    Failure(error), sender=sender, client_ip=self.client_ip)
        return replies.QUEUE_FAILED

    def _check_headers(self, scan: HeaderScan) -> Reply | defer.Deferred | None:
        """Submission: From:/Sender: must be the authenticated user's (docs/design/smtp.md).
        None (nothing to check, or fine), a refusal, or a Deferred of either."""
        if not (self.smtp.check_from_header and self.session.auth_user is not None
                and self.policy.checks_from_header):
            return None
        if scan.address_overflow:
            return replies.FROM_NOT_YOURS

        def unavailable(failure: Failure) -> Reply | Failure:
            if not failure.check(DirectoryUnavailable):
                return failure
            log.warn("directory unavailable checking From: for {client_ip}: {error}",
                     client_ip=self.client_ip, error=str(failure.value))
            self._refusal_logged = True
            return replies.TEMP_LOOKUP_FAILURE

        d = defer.maybeDeferred(self.policy.check_header_senders, self.session,
                                scan.values("from"), scan.values("sender"))
        return d.addErrback(unavailable)

    def _received_header(self, txid: str, rcpts: list[tuple[str, Route]]) -> bytes:
        """RFC 5321 §4.4 trace line: from/by/with/id/for, then the date."""
        tcp_info = f"{self.client_name} [{self.client_ip}]" if self.client_name \
            else f"[{self.client_ip}]"
        parts = [f"Received: from {self.session.helo} ({tcp_info})",
                 f"\tby {self.hostname} (mailsuite) with {self._protocol_name()} id {txid}"]
        date = message_date(time.time())
        if len(rcpts) == 1:
            # Naming the recipient only for single-recipient mail avoids leaking Bcc lists.
            parts.append(f"\tfor <{rcpts[0][0]}>; {date}")
        else:
            parts[-1] += ";"
            parts.append(f"\t{date}")
        return ("\r\n".join(parts) + "\r\n").encode("utf-8")

    def _protocol_name(self) -> str:
        # RFC 3848 "with" keywords.
        name = "ESMTP" if self.session.esmtp else "SMTP"
        if self.session.tls:
            name += "S"
        if self.session.auth_user:
            name += "A"
        return name

    def _reset_transaction(self) -> None:
        self._mail: PathArgument | None = None
        self._rcpts: list[tuple[str, Route]] = []
        self._smtputf8 = False
        self._size = 0
        self._data_error: Reply | None = None
        self._continuation = False
        if getattr(self, "_staged", None) is not None:
            self._discard_staged()


class HandOver:
    """The end of DATA for one message: the From: check, the trust gate's verdict, the queue's
    fsync, then the 250 (docs/design/smtp.md, "DATA on disk"). Each step is a callback of the
    one before rather than a generator (inlineCallbacks costs more than the rest of these
    steps together); a step that has its answer at once takes the next one at once."""

    def __init__(self, server: "DataTransfer", mail: PathArgument,
                 rcpts: list[tuple[str, Route]], txid: str, staged: StagedMessage,
                 meta: dict):
        self.server: Any = server
        self.mail = mail
        self.rcpts = rcpts
        self.txid = txid
        self.staged = staged
        self.meta = meta
        self.queued = False
        self.rewritten: str | None = None  # the trust gate's copy of the staged file

    def start(self, scan: HeaderScan) -> Reply | defer.Deferred | None:
        try:
            refusal = self.server._check_headers(scan)  # reads the scan, not the file
            if isinstance(refusal, defer.Deferred):
                result = refusal.addCallback(self._headers_checked)
            else:
                result = self._headers_checked(refusal)
        except BaseException:
            self._cleanup(None)
            raise
        if isinstance(result, defer.Deferred):
            return result.addBoth(self._cleanup)
        return self._cleanup(result)

    def _headers_checked(self, refusal: Reply | None) -> Reply | defer.Deferred | None:
        server, mail = self.server, self.mail
        if refusal is not None:
            log.info("refused message from=<{sender}> client={client_ip} auth={auth_user}: "
                     "{text}", sender=mail.address, client_ip=server.client_ip,
                     auth_user=self.meta["auth_user"], text=refusal.text)
            server._refusal_logged = True
            return refusal
        size = self.staged.size
        trust = server.trust
        if trust is None:
            return self._submit(self.staged, size)
        # Unless a trust check reads the file, the queue takes it over in the job that
        # completes it (docs/design/smtp.md, "DATA on disk").
        envelope = server._envelope(mail.address, self.rcpts, self.txid)
        forwards = any(route is not None and route.remote for _, route in self.rcpts)
        if not trust.reads_message(envelope):
            return self._inspect(envelope, self.staged, size, forwards)
        try:
            d = self.staged.finish()
        except Exception as e:
            return server._queue_failed(mail.address, e)
        return d.addCallbacks(lambda path: self._inspect(envelope, path, size, forwards),
                              self._failed)

    def _inspect(self, envelope: Envelope, path: str | StagedMessage, size: int,
                 forwards: bool) -> Reply | defer.Deferred | None:
        try:
            d = self.server.trust.inspect(envelope, path if isinstance(path, str) else "",
                                          size, forwards=forwards)
        except Exception as e:  # the rewrite's disk I/O; the checks never errback
            return self.server._queue_failed(self.mail.address, e)
        return d.addCallbacks(self._inspected, self._failed, callbackArgs=(path,))

    def _inspected(self, inspection: Any, path: str | StagedMessage
                   ) -> Reply | defer.Deferred | None:
        server = self.server
        verdict = inspection.verdict
        if verdict.reply is not None and not verdict.reply.success:
            log.info("refused message from=<{sender}> client={client_ip} id={txid}: "
                     "{text}", sender=self.mail.address, client_ip=server.client_ip,
                     txid=self.txid, text=verdict.reply.text)
            server._refusal_logged = True
            return verdict.reply
        if inspection.path not in ("", path):
            self.rewritten = path = inspection.path
        self.meta.update(inspection.meta)
        self.meta["verdicts"] = verdict_summary(verdict)
        return self._submit(path, inspection.size)

    def _submit(self, path: str | StagedMessage, size: int) -> defer.Deferred | Reply | None:
        server = self.server
        if server._closed:
            return None  # the client is gone: no 250 can reach it, so nothing is queued
        try:
            d = server.factory.queue.submit_file(self.mail.address, self.rcpts, path, size,
                                                 self.meta)
        except Exception as e:
            return server._queue_failed(self.mail.address, e)
        return d.addCallbacks(self._accepted, self._failed, callbackArgs=(size,))

    def _accepted(self, queue_id: object, size: int) -> Reply:
        self.queued = True
        server, meta = self.server, self.meta
        server._give_back_commands()
        log.info("accepted {queue_id} from=<{sender}> to={rcpts} size={size} "
                 "client={client_ip} helo={helo} auth={auth_user} proto={protocol} id={txid}",
                 queue_id=queue_id, sender=self.mail.address,
                 rcpts=",".join(f"<{a}>" for a, _ in self.rcpts), size=size,
                 client_ip=server.client_ip, helo=meta["helo"], auth_user=meta["auth_user"],
                 protocol=meta["protocol"], txid=self.txid)
        return replies.queued(str(queue_id))

    def _failed(self, failure: Failure) -> Reply | Failure:
        if not isinstance(failure.value, Exception):
            return failure
        return self.server._queue_failed(self.mail.address, failure.value)

    def _cleanup(self, result: object) -> object:
        """Whatever happened, a message not in the queue leaves nothing behind."""
        if not self.queued:
            self.staged.discard()
            if self.rewritten is not None:
                self.server.factory.io.run(_remove, self.rewritten).addErrback(lambda _: None)
        return result


def message_date(when: float) -> str:
    """RFC 5322 §3.3 date-time in local time, as email.utils.formatdate(localtime=True) makes
    it; made once per second (it has no finer field), not for every message."""
    second = int(when // 1)
    cached = _date_cache
    if cached[0] != second:
        cached[:] = [second, email.utils.formatdate(second, localtime=True)]
    return cached[1]


_date_cache: list = [None, ""]


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def verdict_summary(verdict: Verdict) -> dict[str, str]:
    """What the trust checks said, as the queue entry keeps it for the message's events:
    {"spf": "pass", "dkim": "none", "dmarc": "fail", "disposition": "junk", "log": "rspamd:
    ..."}; several results of one method (DKIM signatures) are joined with ","."""
    summary: dict[str, str] = {}
    for result in verdict.results:
        previous = summary.get(result.method)
        summary[result.method] = f"{previous},{result.result}" if previous else result.result
    summary["disposition"] = verdict.disposition
    if verdict.log:
        summary["log"] = verdict.log[:300]
    return summary

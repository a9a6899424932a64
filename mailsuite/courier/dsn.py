"""Delivery status notifications (RFC 3464) for bounced and delayed recipients.

Built as bytes, not with the email package's generator: the original header section is copied
verbatim, including 8-bit bytes in whatever charset the sender used (Twisted's bounce module
crashes on those: docs/design/courier.md), and every line ends in CRLF as the spool requires.
"""
from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import Iterable, Literal

from mailsuite.queue.spool import QueueEntry, Recipient

Action = Literal["failed", "delayed"]
CRLF = b"\r\n"
MAX_HEADER_BYTES = 64 * 1024  # enough for any honest header section; the rest is cut
_REPLY = re.compile(r"^(\d{3})(?:[ -]|$)")
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b")


@dataclass
class DSNRecipient:
    final: str
    original: str
    status: str  # x.y.z
    remote_mta: str
    diagnostic: str  # the remote reply ("550 5.1.1 ..."), or our own text
    smtp_reply: bool  # True: diagnostic is an SMTP reply (Diagnostic-Code: smtp; ...)
    last_attempt: float


def recipient_status(r: Recipient, action: Action) -> DSNRecipient:
    """Status code and diagnostic of one recipient from its last error."""
    text = " ".join(r.last_error.split())  # one line: replies may have been multi-line
    reply = _REPLY.match(text)
    rest = text[reply.end():].lstrip() if reply else text
    enhanced = _ENHANCED.match(rest)
    if enhanced:
        code = enhanced.group(1)
    elif reply:
        code = f"{reply.group(1)[0]}.0.0"
    else:
        code = "5.0.0" if action == "failed" else "4.0.0"
    if action == "delayed" and code.startswith("5"):
        code = "4" + code[1:]
    return DSNRecipient(final=r.address, original=r.original or r.address, status=code,
                        remote_mta=r.remote_mta, diagnostic=text, smtp_reply=bool(reply),
                        last_attempt=time.time())


def build_dsn(entry: QueueEntry, recipients: Iterable[Recipient], action: Action,
              original_headers: bytes, reporting_mta: str, retry_until: float | None = None,
              now: float | None = None) -> bytes:
    """The complete DSN message (CRLF line endings), From MAILER-DAEMON@reporting_mta."""
    now = time.time() if now is None else now
    rcpts = [recipient_status(r, action) for r in recipients]
    for r in rcpts:
        r.last_attempt = now
    boundary = f"{entry.id}.{secrets.token_hex(6)}/{reporting_mta}"
    sender = entry.sender
    if action == "failed":
        subject = "Undelivered Mail Returned to Sender"
    else:
        subject = "Delayed Mail (still being retried)"
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: {_header_address(sender)}",
        f"Subject: {subject}",
        f"Date: {formatdate(now, localtime=False)}",
        f"Message-ID: <{entry.id}.{secrets.token_hex(4)}.dsn@{reporting_mta}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 §5: no auto-replies to this
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
    ]
    human = _human_text(entry, rcpts, action, reporting_mta, retry_until)
    status_fields = [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Mailsuite-Queue-ID: {entry.id}",
    ]
    if entry.sender:
        status_fields.append(f"X-Original-Envelope-From: rfc822; {_ascii(entry.sender)}")
    status_fields.append(f"Arrival-Date: {formatdate(entry.created, localtime=False)}")
    per_recipient = []
    for r in rcpts:
        block = [f"Final-Recipient: rfc822; {_ascii(r.final)}"]
        if r.original and r.original.lower() != r.final.lower():
            block.append(f"Original-Recipient: rfc822; {_ascii(r.original)}")
        block.append(f"Action: {action}")
        block.append(f"Status: {r.status}")
        if r.remote_mta:
            block.append(f"Remote-MTA: dns; {_ascii(r.remote_mta)}")
        if r.diagnostic:
            kind = "smtp" if r.smtp_reply else "X-mailsuite"
            block.append(_fold(f"Diagnostic-Code: {kind}; {_ascii(r.diagnostic)}"))
        block.append(f"Last-Attempt-Date: {formatdate(r.last_attempt, localtime=False)}")
        if action == "delayed" and retry_until:
            block.append(f"Will-Retry-Until: {formatdate(retry_until, localtime=False)}")
        per_recipient.append("\r\n".join(block))
    delivery_status = "\r\n".join(status_fields) + "\r\n\r\n" + "\r\n\r\n".join(per_recipient)
    original = _normalise(original_headers[:MAX_HEADER_BYTES])
    eight_bit = not original.isascii()

    b = boundary.encode()
    parts = [
        "\r\n".join(headers).encode() + CRLF + CRLF,
        b"This is a MIME-encapsulated message (RFC 3464 delivery status notification).\r\n\r\n",
        b"--" + b + CRLF,
        b"Content-Description: Notification\r\n",
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Transfer-Encoding: 8bit\r\n\r\n",
        human.encode("utf-8") + CRLF,
        b"--" + b + CRLF,
        b"Content-Description: Delivery report\r\n",
        b"Content-Type: message/delivery-status\r\n\r\n",
        delivery_status.encode("ascii") + CRLF + CRLF,
        b"--" + b + CRLF,
        b"Content-Description: Undelivered message headers\r\n",
        b"Content-Type: text/rfc822-headers\r\n",
        (b"Content-Transfer-Encoding: 8bit\r\n\r\n" if eight_bit
         else b"Content-Transfer-Encoding: 7bit\r\n\r\n"),
        original + CRLF,  # the CRLF before a boundary belongs to the delimiter (RFC 2046)
        b"--" + b + b"--" + CRLF,
    ]
    return b"".join(parts)


def _human_text(entry: QueueEntry, rcpts: list[DSNRecipient], action: Action,
                reporting_mta: str, retry_until: float | None) -> str:
    lines = [f"This is the mail system at host {reporting_mta}.", ""]
    if action == "failed":
        lines += ["I'm sorry to have to inform you that your message could not be delivered",
                  "to one or more recipients. The reasons are given below.", ""]
    else:
        lines += ["Your message could not be delivered yet to one or more recipients.",
                  "This is only a warning: the mail system keeps trying"
                  + (f" until {formatdate(retry_until, localtime=False)}."
                     if retry_until else "."),
                  "You do not need to send the message again.", ""]
    for r in rcpts:
        where = f" (host {r.remote_mta} said: {r.diagnostic})" if r.remote_mta and r.smtp_reply \
            else f": {r.diagnostic}" if r.diagnostic else ""
        lines.append(f"<{r.final}>{where}")
    lines += ["", f"Queue ID: {entry.id}"]
    return "\r\n".join(lines)


def _normalise(headers: bytes) -> bytes:
    """CRLF line endings; end with exactly one CRLF (the part's content ends there)."""
    text = re.sub(rb"\r\n|\r|\n", b"\r\n", headers).rstrip(b"\r\n")
    # A line "--<something>" in the copied headers cannot match our boundary (it contains the
    # random token and our hostname), so no escaping is needed.
    return text + CRLF if text else b""


def _header_address(address: str) -> str:
    return f"<{address}>" if address else "<>"


def _ascii(text: str) -> str:
    """Fields of message/delivery-status are ASCII (RFC 3464 §2.1.1); keep them so."""
    text = text.replace("\r", " ").replace("\n", " ")
    return text if text.isascii() else text.encode("ascii", "replace").decode("ascii")


def _fold(field: str, width: int = 78) -> str:
    """Fold a long header field at spaces (RFC 5322 §2.2.3)."""
    if len(field) <= width:
        return field
    out, line = [], ""
    for word in field.split(" "):
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = "\t" + word
        else:
            line = f"{line} {word}" if line else word
    out.append(line)
    return "\r\n".join(out)

"""Sender Rewriting Scheme: the envelope sender of mail an alias forwards to another domain
(docs/design/trust.md, "Forwarding").

Forwarding `carol@remote.example`'s message to `bob@elsewhere.example` with her address in MAIL
FROM fails SPF at elsewhere.example (we are not among remote.example's senders). So the copy
goes out from `SRS0=<hash>=<time>=remote.example=carol@<our domain>`: SPF checks our domain,
and a bounce comes back to us, where `reverse` recovers carol's address and the hash proves we
made it (a forged SRS address would turn us into a relay for anyone, so it is refused).
Forwarding an address that is already SRS0 of another forwarder gives the SRS1 form, which
keeps the first forwarder's domain so the bounce retraces the path.

The hash is an HMAC-SHA256 of the lower-cased parts (receivers may change case), in base32 so
that case changes cannot break it; the time is the day number modulo 1024 in two base32
characters, and addresses older than `max_age_days` are refused.
"""
from __future__ import annotations

import base64
import hmac
import os
import secrets
import time
from hashlib import sha256

from mailsuite.safeio import atomic_write

_B32 = "abcdefghijklmnopqrstuvwxyz234567"
HASH_LENGTH = 6  # base32 characters (30 bits)
SECRET_FILE = "srs.key"


class SRSError(ValueError):
    """Not an address we made, or one too old: the bounce is refused (550 5.7.1)."""


def load_or_create_secret(data_dir: str) -> bytes:
    """The secret every process on this data directory shares (created on first start)."""
    path = os.path.join(data_dir, SECRET_FILE)
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except FileNotFoundError:
        secret = b""
    if len(secret) < 32:
        secret = secrets.token_hex(32).encode()
        atomic_write(path, secret + b"\n")
        os.chmod(path, 0o600)
    return secret


class SRS:
    def __init__(self, secret: bytes, domain: str, max_age_days: int = 21,
                 now: "callable[[], float] | None" = None):
        self.secret = secret
        self.domain = domain.lower()
        self.max_age_days = max_age_days
        self._now = now or time.time

    # -- forward --------------------------------------------------------------------------
    def forward(self, sender: str) -> str:
        """The envelope sender for a forwarded copy of mail from `sender`."""
        if not sender or "@" not in sender:
            return sender  # the null sender (bounces) is never rewritten
        local, _, domain = sender.rpartition("@")
        if domain.lower() == self.domain:
            return sender  # already ours (our own SRS address or a local user)
        kind = local[:5].upper()
        if kind == "SRS0=" or kind == "SRS0+" or kind == "SRS0-":
            # Someone else's SRS0: keep their domain, so the bounce goes back through them.
            rest = local[5:]
            h = self._hash(domain, rest)
            return f"SRS1={h}={domain}=={rest}@{self.domain}"
        if kind in ("SRS1=", "SRS1+", "SRS1-"):
            # Re-forwarding an SRS1: the first forwarder stays; only our hash is new.
            first, sep, rest = local[5:].partition("==")
            _, _, first_domain = first.partition("=")
            if sep and first_domain:
                h = self._hash(first_domain, rest)
                return f"SRS1={h}={first_domain}=={rest}@{self.domain}"
        stamp = self._stamp()
        h = self._hash(stamp, domain, local)
        return f"SRS0={h}={stamp}={domain}={local}@{self.domain}"

    # -- reverse --------------------------------------------------------------------------
    def is_srs(self, address: str) -> bool:
        local, _, domain = address.rpartition("@")
        return domain.lower() == self.domain and local[:5].upper() in (
            "SRS0=", "SRS0+", "SRS0-", "SRS1=", "SRS1+", "SRS1-")

    def reverse(self, address: str) -> str:
        """The address to return a bounce to; SRSError if we did not make `address`."""
        local, _, domain = address.rpartition("@")
        if domain.lower() != self.domain:
            raise SRSError("not an SRS address of ours")
        kind, body = local[:4].upper(), local[5:]
        if kind == "SRS0":
            parts = body.split("=", 3)
            if len(parts) != 4 or not all(parts):
                raise SRSError("malformed SRS0 address")
            h, stamp, orig_domain, orig_local = parts
            self._check(h, stamp, orig_domain, orig_local)
            if not self._fresh(stamp):
                raise SRSError("expired SRS address")
            return f"{orig_local}@{orig_domain}"
        if kind == "SRS1":
            head, sep, rest = body.partition("==")
            h, _, first_domain = head.partition("=")
            if not sep or not h or not first_domain or not rest:
                raise SRSError("malformed SRS1 address")
            self._check(h, first_domain, rest)
            return f"SRS0={rest}@{first_domain}"
        raise SRSError("not an SRS address")

    # -- parts ----------------------------------------------------------------------------
    def _hash(self, *parts: str) -> str:
        mac = hmac.new(self.secret, "\0".join(p.lower() for p in parts).encode("utf-8"),
                       sha256).digest()
        return base64.b32encode(mac).decode("ascii").lower()[:HASH_LENGTH]

    def _check(self, h: str, *parts: str) -> None:
        if not hmac.compare_digest(h.lower().encode(), self._hash(*parts).encode()):
            raise SRSError("SRS hash does not match (forged address)")

    def _day(self) -> int:
        return int(self._now() // 86400)

    def _stamp(self) -> str:
        day = self._day() % 1024
        return _B32[day >> 5] + _B32[day & 31]

    def _fresh(self, stamp: str) -> bool:
        stamp = stamp.lower()
        if len(stamp) != 2 or any(c not in _B32 for c in stamp):
            return False
        then = (_B32.index(stamp[0]) << 5) | _B32.index(stamp[1])
        age = (self._day() - then) % 1024
        return age <= self.max_age_days

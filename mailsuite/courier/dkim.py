"""DKIM keys and signing (RFC 6376, Ed25519 per RFC 8463) with dkimpy.

Keys live in <data_dir>/dkim/<domain>/<selector>.private (PEM, mode 0600) with the DNS TXT value
beside them in <selector>.txt. Every key of a domain signs: with `--algorithm both` a message gets
an Ed25519 and an RSA signature (RFC 8463 §4: receivers that do not know Ed25519 ignore that one
and verify the RSA one). Signing is CPU work: callers run `Signer.sign` in a thread pool.
"""
from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Literal

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.logger import Logger

log = Logger()

Algorithm = Literal["ed25519", "rsa", "both"]
# The header fields we sign (RFC 6376 §5.4.1). dkimpy lists absent ones in h= too, which signs
# their absence (§5.4.2): a Cc or Reply-To added in transit then breaks the signature.
SIGNED_HEADERS = [b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to",
                  b"mime-version", b"content-type", b"in-reply-to", b"references"]
_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$")
_SELECTOR = re.compile(r"^[a-z0-9]([a-z0-9-_]*[a-z0-9])?$", re.IGNORECASE)


@dataclass(frozen=True)
class DKIMKey:
    domain: str
    selector: str
    algorithm: str  # "ed25519" | "rsa"
    private_path: str
    txt: str  # the TXT record value: v=DKIM1; k=...; p=...

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def zone_line(self) -> str:
        """The record in zone-file syntax, long values split into 255-octet strings."""
        chunks = [self.txt[i:i + 250] for i in range(0, len(self.txt), 250)]
        return f'{self.record_name}. IN TXT ' + " ".join(f'"{c}"' for c in chunks)


def generate(dkim_dir: str, domain: str, selector: str, algorithm: Algorithm = "both",
             overwrite: bool = False) -> list[DKIMKey]:
    """Create the key(s) and TXT file(s); with "both", selectors <selector>-ed and -rsa."""
    domain = domain.lower().rstrip(".")
    if not _DOMAIN.match(domain):
        raise ValueError(f"not a domain name: {domain}")
    if not _SELECTOR.match(selector):
        raise ValueError(f"not a valid selector: {selector}")
    if algorithm == "both":
        plan = [("ed25519", f"{selector}-ed"), ("rsa", f"{selector}-rsa")]
    elif algorithm in ("ed25519", "rsa"):
        plan = [(algorithm, selector)]
    else:
        raise ValueError(f"unknown algorithm {algorithm}")
    directory = os.path.join(dkim_dir, domain)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for _, sel in plan:
        if not overwrite and os.path.exists(os.path.join(directory, sel + ".private")):
            raise FileExistsError(f"{os.path.join(directory, sel + '.private')} exists "
                                  f"(a published selector must not change its key; pick a new "
                                  f"--selector)")
    keys = []
    for alg, sel in plan:
        if alg == "ed25519":
            key = ed25519.Ed25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                                   serialization.PublicFormat.Raw)
            txt = f"v=DKIM1; k=ed25519; p={base64.b64encode(public).decode()}"
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            # PKCS#1 ("BEGIN RSA PRIVATE KEY"): what dkimpy and OpenDKIM read.
            pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
            public = key.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
            txt = f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"
        private_path = os.path.join(directory, sel + ".private")
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.chmod(private_path, 0o600)
        with open(os.path.join(directory, sel + ".txt"), "w") as f:
            f.write(txt + "\n")
        keys.append(DKIMKey(domain, sel, alg, private_path, txt))
    return keys


def load_keys(dkim_dir: str, domain: str) -> list[tuple[DKIMKey, bytes]]:
    """(key, private key in dkimpy's format) for every selector of a domain; Ed25519 first."""
    directory = os.path.join(dkim_dir, domain.lower())
    try:
        names = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        if not name.endswith(".private") or name.startswith("."):
            continue
        selector = name[:-len(".private")]
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
            txt_path = os.path.join(directory, selector + ".txt")
            txt = open(txt_path).read().strip() if os.path.exists(txt_path) else ""
        except (OSError, ValueError, TypeError) as e:
            log.error("DKIM key {path} unusable: {error}", path=path, error=e)
            continue
        if isinstance(key, ed25519.Ed25519PrivateKey):
            # dkimpy takes the base64 of the 32-octet seed for Ed25519.
            raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
            found.append((DKIMKey(domain, selector, "ed25519", path, txt),
                          base64.b64encode(raw)))
        elif isinstance(key, rsa.RSAPrivateKey):
            pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
            found.append((DKIMKey(domain, selector, "rsa", path, txt), pem))
    found.sort(key=lambda item: (item[0].algorithm != "ed25519", item[0].selector))
    return found


class Signer:
    """Signs outbound messages for domains that have keys (synchronous: run it in a pool)."""

    def __init__(self, dkim_dir: str):
        self.dkim_dir = dkim_dir
        self._cache: dict[str, tuple[float, list]] = {}

    def sign(self, message: bytes, envelope_sender: str) -> bytes:
        """The message with DKIM-Signature header(s) prepended, or unchanged without a key.

        The signing domain is that of the From header (the one DMARC aligns with), else the
        envelope sender's.
        """
        for domain in self._candidate_domains(message, envelope_sender):
            keys = self._keys(domain)
            if not keys:
                continue
            signatures = []
            for key, private in keys:
                try:
                    signatures.append(dkim.sign(
                        message, key.selector.encode(), domain.encode(), private,
                        canonicalize=(b"relaxed", b"relaxed"), include_headers=SIGNED_HEADERS,
                        signature_algorithm=(b"ed25519-sha256" if key.algorithm == "ed25519"
                                             else b"rsa-sha256"),
                        linesep=b"\r\n"))
                except Exception as e:  # a broken key must not stop delivery
                    log.error("DKIM signing with {path} failed: {error}", path=key.private_path,
                              error=e)
            return b"".join(signatures) + message
        return message

    def _keys(self, domain: str) -> list:
        directory = os.path.join(self.dkim_dir, domain)
        try:
            mtime = os.stat(directory).st_mtime
        except OSError:
            return []
        cached = self._cache.get(domain)
        if cached and cached[0] == mtime:
            return cached[1]
        keys = load_keys(self.dkim_dir, domain)
        self._cache[domain] = (mtime, keys)
        return keys

    @staticmethod
    def _candidate_domains(message: bytes, envelope_sender: str) -> list[str]:
        domains = []
        end = message.find(b"\r\n\r\n")
        head = message[:end if end >= 0 else len(message)]
        from_values = re.findall(rb"(?im)^from:[ \t]*((?:.*)(?:\r\n[ \t].*)*)", head)
        if from_values:
            text = from_values[0].decode("utf-8", "replace").replace("\r\n", "")
            for _, addr in getaddresses([text]):
                if "@" in addr:
                    domains.append(addr.rpartition("@")[2].lower().rstrip(">"))
                    break
        if "@" in envelope_sender:
            domains.append(envelope_sender.rpartition("@")[2].lower())
        return [d for d in dict.fromkeys(domains) if _DOMAIN.match(d)]

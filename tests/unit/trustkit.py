"""Shared helpers of the trust unit tests: keys made once, a dict-backed blocking DNS lookup."""
from __future__ import annotations

import base64
from functools import lru_cache

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa


class FakeLookup:
    """What `DnsClient.blocking(reactor)` returns, backed by a dict:
    (name, qtype) -> list of values, or an exception instance to raise."""

    def __init__(self, records=None):
        self.records = {}
        for (name, qtype), value in (records or {}).items():
            self.add(name, qtype, value)
        self.asked: list[tuple[str, str]] = []

    def add(self, name, qtype, value):
        self.records[(name.lower().rstrip("."), qtype)] = value

    def __call__(self, name, qtype, timeout):
        key = (name.lower().rstrip("."), qtype)
        self.asked.append(key)
        value = self.records.get(key, [])
        if isinstance(value, Exception):
            raise value
        return list(value)


@lru_cache(maxsize=None)
def rsa_key(label: str = "a", bits: int = 1024) -> tuple[bytes, bytes]:
    """(PKCS#1 PEM private key, DKIM TXT record) for an RSA key, generated once per label."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


@lru_cache(maxsize=None)
def ed25519_key(label: str = "a") -> tuple[bytes, bytes]:
    """(base64 seed, as dkimpy signs with; DKIM TXT record) for an Ed25519 key (RFC 8463)."""
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)
    return base64.b64encode(seed), b"v=DKIM1; k=ed25519; p=" + base64.b64encode(public)

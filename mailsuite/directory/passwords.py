"""Password hashing: argon2id for new hashes, verification of legacy and Dovecot-style hashes.

Everything here is CPU-bound (100-600 ms per call): callers on the reactor run it in
`suite.pools.hash`, never on the reactor thread.

Stored hashes are either passlib/crypt(3) strings (`$argon2id$...`, `$2y$...`, `$6$...`,
`{SSHA512}...`) or Dovecot `{SCHEME}value` strings as exported by `doveadm pw` or a Dovecot
passwd-file/SQL table (docs/design/directory.md). A successful login with anything but current argon2id
parameters yields a new hash to store (`verify_and_update`), so imported accounts migrate silently.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from passlib.context import CryptContext

# The default comes first; every other scheme is accepted for verification only and rehashed on
# the next successful login.
_SCHEMES = ["argon2", "bcrypt", "sha512_crypt", "sha256_crypt", "ldap_salted_sha512",
            "ldap_salted_sha256", "md5_crypt"]
CONTEXT = CryptContext(schemes=_SCHEMES, default="argon2", deprecated=_SCHEMES[1:],
                       argon2__type="ID")

# Dovecot schemes whose value (after the {PREFIX}) is a passlib/crypt(3) string.
_DOVECOT_CRYPT = {"ARGON2ID", "ARGON2I", "ARGON2", "BLF-CRYPT", "BCRYPT", "SHA512-CRYPT",
                  "SHA256-CRYPT", "MD5-CRYPT", "MD5", "CRYPT", "DES-CRYPT"}
# Dovecot digests checked with hashlib: (hash function, digest length if salted else None,
# default encoding). passlib's ldap_salted_* refuse salts outside 4-16 bytes, Dovecot's don't.
_DOVECOT_DIGEST: dict[str, tuple[str, int | None, str]] = {
    "SSHA512": ("sha512", 64, "b64"), "SSHA256": ("sha256", 32, "b64"),
    "SSHA": ("sha1", 20, "b64"), "SMD5": ("md5", 16, "b64"),
    "SHA512": ("sha512", None, "b64"), "SHA256": ("sha256", None, "b64"),
    "SHA": ("sha1", None, "b64"), "SHA1": ("sha1", None, "b64"),
    "LDAP-MD5": ("md5", None, "b64"), "PLAIN-MD5": ("md5", None, "hex"),
}
_DOVECOT_PLAIN = {"PLAIN", "CLEARTEXT"}


def hash_password(password: str | bytes) -> str:
    """A new argon2id hash."""
    return CONTEXT.hash(password)


def verify_password(password: str | bytes, stored: str) -> tuple[bool, str | None]:
    """(matches, replacement hash to store or None).

    The replacement is set when the password matched but the stored form is legacy: another
    scheme, older argon2 parameters, or a Dovecot `{SCHEME}` prefix.
    """
    if not stored:
        return False, None
    scheme, encoding, value = _dovecot_parts(stored)
    try:
        if scheme is None or scheme in _DOVECOT_CRYPT:
            ok, new_hash = CONTEXT.verify_and_update(password, value)
            if ok and new_hash is None and scheme is not None:
                new_hash = value  # same hash, minus the {PREFIX} only Dovecot needed
            return ok, new_hash if ok else None
        secret = password.encode("utf-8") if isinstance(password, str) else password
        if scheme in _DOVECOT_PLAIN:
            ok = hmac.compare_digest(secret, value.encode("utf-8"))
        elif scheme in _DOVECOT_DIGEST:
            ok = _check_digest(scheme, encoding, value, secret)
        else:
            return False, None  # a scheme we cannot verify: the operator must reset it
    except (ValueError, TypeError):
        # Unidentifiable hash, bcrypt's 72-byte limit, malformed encodings: not a match.
        return False, None
    return ok, (hash_password(password) if ok else None)


def is_known_hash(stored: str) -> bool:
    """Whether verify_password can check this stored form at all (for imports)."""
    scheme, _encoding, value = _dovecot_parts(stored.strip())
    if scheme is None or scheme in _DOVECOT_CRYPT:
        try:
            return CONTEXT.identify(value, required=False) is not None
        except (ValueError, TypeError):
            return False
    return scheme in _DOVECOT_DIGEST or scheme in _DOVECOT_PLAIN


def dummy_verify() -> None:
    """Spend the time of one real verification, so unknown users answer as slowly as known ones."""
    CONTEXT.dummy_verify()


def _dovecot_parts(stored: str) -> tuple[str | None, str | None, str]:
    """("SHA512-CRYPT", None, "$6$...") for "{SHA512-CRYPT}$6$..."; (None, None, stored) otherwise.

    passlib's own `{SSHA512}`-style hashes are also caught here; the hashlib check handles them.
    """
    if not stored.startswith("{") or "}" not in stored:
        return None, None, stored
    prefix, _, value = stored[1:].partition("}")
    scheme, _, encoding = prefix.upper().partition(".")
    if encoding in ("B64", "BASE64"):
        encoding = "b64"
    elif encoding == "HEX":
        encoding = "hex"
    else:
        encoding = None
    return scheme, encoding, value


def _check_digest(scheme: str, encoding: str | None, value: str, secret: bytes) -> bool:
    algorithm, digest_size, default_encoding = _DOVECOT_DIGEST[scheme]
    encoding = encoding or default_encoding
    try:
        raw = bytes.fromhex(value) if encoding == "hex" else base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        return False
    if digest_size is None:
        return hmac.compare_digest(hashlib.new(algorithm, secret).digest(), raw)
    digest, salt = raw[:digest_size], raw[digest_size:]
    if len(digest) != digest_size or not salt:
        return False
    return hmac.compare_digest(hashlib.new(algorithm, secret + salt).digest(), digest)

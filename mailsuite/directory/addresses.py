"""Address syntax as the directory understands it: validation and canonical forms.

Canonical form of an address we host: local part and domain both lower-case (local parts compare
case-insensitively here, as in every mainstream mail server, although RFC 5321 §2.4 lets the
receiving host decide). Domains are stored as IDNA A-labels, so `bücher.example` and
`xn--bcher-kva.example` are one domain.
"""
from __future__ import annotations

import re
import unicodedata

from mailsuite.directory.records import DirectoryError

# RFC 5322 §3.2.3 atext, plus the dot of a dot-atom; non-ASCII is allowed for SMTPUTF8 (RFC 6531).
_ATEXT = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-\u0080-\U0010ffff]+$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
MAX_LOCAL = 64  # octets, RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 253


def normalize_domain(name: str) -> str:
    """Lower-case A-label form of a domain name, or DirectoryError if it is not one."""
    raw = name.strip().rstrip(".") if isinstance(name, str) else ""
    if not raw:
        raise DirectoryError(f"invalid domain {name!r}: empty")
    try:
        # Only non-ASCII names need IDNA; the codec's own errors on ASCII are less clear than ours.
        ascii_name = raw.lower() if raw.isascii() else raw.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise DirectoryError(f"invalid domain {name!r}: not a valid (internationalised) name")
    if len(ascii_name) > MAX_DOMAIN:
        raise DirectoryError(f"invalid domain {name!r}: longer than {MAX_DOMAIN} characters")
    for label in ascii_name.split("."):
        if not _LABEL.match(label):
            raise DirectoryError(f"invalid domain {name!r}: bad label {label!r} (letters, digits "
                                 "and inner hyphens, 1-63 characters)")
    if ascii_name.rsplit(".", 1)[-1].isdigit():
        raise DirectoryError(f"invalid domain {name!r}: looks like an IP address")
    return ascii_name


def validate_local(local: str, address: str) -> None:
    if not local:
        raise DirectoryError(f"invalid address {address!r}: empty local part")
    if _unencodable(local):
        raise DirectoryError(f"invalid address {address!r}: not valid UTF-8")
    if len(local.encode("utf-8")) > MAX_LOCAL:
        raise DirectoryError(f"invalid address {address!r}: local part longer than {MAX_LOCAL} "
                             "octets")
    if not _ATEXT.match(local) or local.startswith(".") or local.endswith(".") or ".." in local:
        raise DirectoryError(f"invalid address {address!r}: characters not allowed in a local "
                             "part (use letters, digits, . - _ + and the like)")


# A user's local part names a directory (<mail_dir>/<domain>/<local>/): besides being a valid
# dot-atom it must not be able to leave that directory or look like a Maildir++ folder
# (docs/design/directory.md, "Addresses that name directories").
_PATH_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f-\x9f]")
# Unicode categories that have no business in a file name: controls, format characters (bidi
# overrides, zero-width), surrogates (undecodable bytes), private use, line/paragraph separators.
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Zl", "Zp"}


def mailbox_local_problem(local: str) -> str | None:
    """Why `local` cannot be a mailbox's directory name (None when it can): a path separator or a
    control character, a leading dot (hidden, Maildir++ folder), or `.`/`..`."""
    if _PATH_UNSAFE.search(local):
        return "a path separator or control character"
    if local.startswith("."):
        return "a leading dot"
    if not local.isascii() and any(unicodedata.category(c) in _UNSAFE_CATEGORIES for c in local):
        return "an invisible, control or undecodable character"
    return None


def mailbox_address(address: str) -> str:
    """The canonical form of an address that may own a Maildir: a valid address whose local part
    and domain are both safe directory names; DirectoryError saying why otherwise. `user add`
    refuses what this refuses (docs/design/directory.md, "Addresses that name directories")."""
    canonical = canonical_address(address)
    local, _, domain = canonical.rpartition("@")
    for part, what in ((local, "local part"), (domain, "domain")):
        problem = mailbox_local_problem(part)
        if problem:
            raise DirectoryError(f"invalid address {address!r}: the {what} contains {problem}, "
                                 "unsafe as a mailbox directory name")
    return canonical


def mailbox_address_problem(address: str) -> str | None:
    """Why a stored user address cannot own a Maildir (None when it can): for accounts that
    reached the database without `user add` (an import)."""
    local, at, domain = address.lower().rpartition("@")
    if not at or not local or not domain:
        return "not an address"
    return mailbox_local_problem(local) or mailbox_local_problem(domain)


def sender_allowed(allowed: "frozenset[str] | set[str]", address: str) -> bool:
    """Whether `address` (a MAIL FROM or From: address) is among `allowed`, the answer of
    `sender_addresses()`: an exact address (case-insensitive), the same address with a +tag
    (RFC 5233), or any address of a domain listed as `@domain` (a shared sender right)."""
    parts = loose_split(address)
    if parts is None or not parts[0]:
        return False
    local, domain = parts
    lowered = {a.lower() for a in allowed}
    base = strip_tag(local)
    return (f"{local}@{domain}" in lowered or "@" + domain in lowered
            or (base is not None and f"{base}@{domain}" in lowered))


def _unencodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 (surrogateescape)
        return True
    return False


def split_address(address: str) -> tuple[str, str]:
    """(local, domain) of a syntactically valid address, without changing case of the local part.

    Exactly one `@`; local part a dot-atom; domain valid labels (lower-cased, A-labels).
    """
    if not isinstance(address, str):
        raise DirectoryError(f"invalid address {address!r}")
    address = address.strip()
    if address.count("@") != 1:
        raise DirectoryError(f"invalid address {address!r}: it needs exactly one @")
    local, domain = address.split("@")
    validate_local(local, address)
    try:
        domain = normalize_domain(domain)
    except DirectoryError as e:
        raise DirectoryError(f"invalid address {address!r}: {str(e).split(': ', 1)[-1]}")
    return local, domain


def canonical_address(address: str) -> str:
    """The canonical (lower-case) form of a valid address; DirectoryError otherwise."""
    local, domain = split_address(address)
    return f"{local.lower()}@{domain}"


def alias_source(source: str) -> tuple[str, str]:
    """(canonical source, domain) of an alias source: a full address or a catch-all `@domain`."""
    if isinstance(source, str) and source.strip().startswith("@"):
        domain = normalize_domain(source.strip()[1:]) if source.strip()[1:] else ""
        if not domain:
            raise DirectoryError(f"invalid alias source {source!r}: catch-all needs a domain")
        return "@" + domain, domain
    canonical = canonical_address(source)
    return canonical, canonical.rpartition("@")[2]


def loose_split(address: str) -> tuple[str, str] | None:
    """Best-effort (lower-case local, domain) for lookups of addresses given by SMTP clients.

    Routing never raises on odd input: something that cannot be one of our addresses simply does
    not match. None when there is no usable domain at all.
    """
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    local, at, domain = address.rpartition("@")
    if not at or not domain:
        return None
    try:
        domain = normalize_domain(domain)
    except DirectoryError:
        return None
    return local.lower(), domain


def strip_tag(local: str) -> str | None:
    """`alice` for `alice+news` (RFC 5233 subaddress); None when there is no tag to strip."""
    base, plus, _tag = local.partition("+")
    if plus and base:
        return base
    return None

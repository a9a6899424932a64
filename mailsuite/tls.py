"""Certificates and TLS contexts for every listener.

With no certificate configured, a self-signed one is created on first start under
<data_dir>/tls/ (and reused afterwards), so the suite runs out of the box. Contexts are built from
`cryptography` objects (pyOpenSSL objects are deprecated: docs/design/twisted.md), TLS 1.2 minimum.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.logger import Logger

from mailsuite.config import Config, ConfigError

log = Logger()


@dataclass
class TLSMaterial:
    cert_path: str
    key_path: str
    generated: bool  # True when this start created the self-signed pair
    _context: ssl.CertificateOptions | None = field(default=None, repr=False, compare=False)

    def server_context(self) -> ssl.CertificateOptions:
        """One context for every listener, built on first use. service.py builds it at start-up,
        while still root: after `twistd --uid` drops privileges a root-only key is unreadable."""
        if self._context is None:
            self._context = server_context(self.cert_path, self.key_path)
        return self._context


def load_or_create(config: Config) -> TLSMaterial:
    """The configured certificate, or the self-signed one in data_dir (created if missing),
    with its context already built: a bad file fails start-up with a clear line, and the key is
    read before `twistd --uid` drops privileges (it may be root-only)."""
    if config.tls.cert or config.tls.key:
        if not (config.tls.cert and config.tls.key):
            raise ConfigError("[tls] needs both cert and key, or neither (for a self-signed one)")
        material = TLSMaterial(config.tls.cert, config.tls.key, generated=False)
    else:
        cert_path = os.path.join(config.tls_dir, "cert.pem")
        key_path = os.path.join(config.tls_dir, "key.pem")
        generated = False
        if not (os.path.exists(cert_path) and os.path.exists(key_path)):
            create_self_signed(config.hostname, cert_path, key_path)
            generated = True
        material = TLSMaterial(cert_path, key_path, generated)
    material.server_context()
    return material


def create_self_signed(hostname: str, cert_path: str, key_path: str) -> None:
    os.makedirs(os.path.dirname(cert_path), mode=0o700, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    names: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost")]
    names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def server_context(cert_path: str, key_path: str) -> ssl.CertificateOptions:
    try:
        with open(cert_path, "rb") as f:
            chain = x509.load_pem_x509_certificates(f.read())
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except OSError as e:
        raise ConfigError(f"cannot read TLS certificate or key: {e.filename}: {e.strerror}")
    except ValueError as e:
        raise ConfigError(f"cannot load TLS certificate {cert_path} / key {key_path}: {e}")
    options = ssl.CertificateOptions(
        privateKey=key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        # Resumption (docs/design/limits.md, "TLS session resumption"): a server-side session
        # cache (TLS 1.2 session ids, TLS 1.3 stateful tickets) and stateless tickets, both
        # tied to this one context, which every listener and STARTTLS share.
        enableSessions=True,
        enableSessionTickets=True,
    )
    # Twisted's own ALPN callback fails the handshake (an "internal error" alert) whenever a
    # client offers ALPN and the listener names no protocol, i.e. on every mail listener.
    # getContext() builds and caches the one context all connections of these options use.
    options.getContext().set_alpn_select_callback(select_alpn)
    return options


# Protocol ids of the web (RFC 7301 registry): a client that offers only these is a browser.
HTTP_ALPN = frozenset({b"http/0.9", b"http/1.0", b"http/1.1", b"spdy/1", b"spdy/2", b"spdy/3",
                       b"spdy/3.1", b"h2", b"h2c", b"h3"})


def select_alpn(conn: Any, offered: list[bytes]) -> Any:
    """The ALPN answer (RFC 7301 section 3.2, docs/design/limits.md "TLS"): the first protocol
    the listener names (the dashboard: http/1.1) that the client offered; none, and the
    handshake goes on without ALPN, when the listener names none of the client's (mail clients
    rarely offer ALPN; Dovecot and Postfix ignore it too); and a refused handshake when a
    client offering only web protocols reaches a mail listener: a browser led there by a
    cross-protocol attack (ALPACA) never gets to speak."""
    factory = getattr(conn.get_app_data().factory, "wrappedFactory", None)
    named = IProtocolNegotiationFactory(factory, None)
    ours = tuple(named.acceptableProtocols()) if named is not None else ()
    for protocol in ours:
        if protocol in offered:
            return protocol
    if not ours and offered and all(p in HTTP_ALPN for p in offered):
        return b""  # OpenSSL fails the handshake
    return SSL.NO_OVERLAPPING_PROTOCOLS


def client_context_opportunistic() -> ssl.CertificateOptions:
    """For MX delivery: encrypt when offered, accept any certificate (RFC 7435)."""
    return ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)


def describe_tls(transport: Any) -> str:
    """'TLSv1.3 TLS_AES_256_GCM_SHA384' of a transport with TLS started (for log lines and
    events), "TLS" when the transport cannot tell."""
    try:
        conn = transport.getHandle()
        return f"{conn.get_protocol_version_name()} {conn.get_cipher_name()}"
    except Exception:
        return "TLS"

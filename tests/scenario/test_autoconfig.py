"""Client autoconfiguration over real HTTP against a real `twistd mailsuite`: Mozilla autoconfig,
Outlook Autodiscover, the Apple profile, the MTA-STS policy and the first-run message."""
from __future__ import annotations

import http.client
import os
import plistlib
import socket
import xml.etree.ElementTree as ET

import pytest

from tests.harness import MailServer, write_toml

ADDRESS = "alice@example.org"
OUTLOOK_NS = "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"


@pytest.fixture(scope="module")
def hosted(tmp_path_factory):
    """A running server that hosts example.org (one user)."""
    server = MailServer(str(tmp_path_factory.mktemp("autoconfig") / "server"))
    server.start()
    try:
        server.add_user(ADDRESS)
        yield server
    finally:
        server.stop()


def request(server: MailServer, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.ports["autoconfig"], timeout=15)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def servers_in(document: bytes) -> tuple[list[tuple], list[tuple], ET.Element]:
    root = ET.fromstring(document)
    assert root.tag == "clientConfig" and root.get("version") == "1.1"
    provider = root.find("emailProvider")

    def entries(tag):
        return [(e.get("type"), e.findtext("hostname"), int(e.findtext("port")),
                 e.findtext("socketType"), e.findtext("authentication"), e.findtext("username"))
                for e in provider.findall(tag)]
    return entries("incomingServer"), entries("outgoingServer"), provider


# -- Mozilla autoconfig ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/mail/config-v1.1.xml",
                                  "/.well-known/autoconfig/mail/config-v1.1.xml"])
def test_mozilla_autoconfig_describes_the_configured_listeners(hosted, path):
    status, headers, body = request(hosted, "GET", f"{path}?emailaddress={ADDRESS}")
    assert status == 200, body
    assert headers["content-type"].startswith("application/xml")
    incoming, outgoing, provider = servers_in(body)
    assert provider.get("id") == "example.org" and provider.findtext("domain") == "example.org"
    h, p = hosted.hostname, hosted.ports
    common = ("password-cleartext", "%EMAILADDRESS%")
    # Implicit TLS first (RFC 8314): Thunderbird takes the first entry of each kind.
    assert incoming == [("imap", h, p["imaps"], "SSL", *common),
                        ("imap", h, p["imap"], "STARTTLS", *common),
                        ("pop3", h, p["pop3s"], "SSL", *common),
                        ("pop3", h, p["pop3"], "STARTTLS", *common)]
    assert outgoing == [("smtp", h, p["submissions"], "SSL", *common),
                        ("smtp", h, p["submission"], "STARTTLS", *common)]
    # The MX port is not for clients, and nothing secret is in the document.
    assert str(p["mx"]) not in body.decode()
    assert b"password" not in body.lower().replace(b"password-cleartext", b"")


def test_mozilla_autoconfig_by_host_name_and_through_a_proxy(hosted):
    # Without emailaddress, the host name autoconfig.<domain> says which domain.
    status, _, body = request(hosted, "GET", "/mail/config-v1.1.xml",
                              headers={"Host": "autoconfig.example.org"})
    assert status == 200 and servers_in(body)[2].get("id") == "example.org"
    # Absolute-form request target, as sent to an HTTP proxy (RFC 9112 §3.2.2).
    with socket.create_connection(("127.0.0.1", hosted.ports["autoconfig"]), timeout=15) as s:
        s.sendall(b"GET http://autoconfig.example.org/mail/config-v1.1.xml?emailaddress="
                  b"alice%40example.org HTTP/1.1\r\nHost: autoconfig.example.org\r\n"
                  b"Connection: close\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert b"<clientConfig" in reply


@pytest.mark.parametrize("query, expected", [
    ("?emailaddress=someone@not-hosted.test", 404),
    ("?emailaddress=ALICE@EXAMPLE.ORG", 200),  # domains are case-insensitive
    ("?emailaddress=not-an-address", 400),
    ("?emailaddress=%3Cscript%3E@example.org", 400),
    ("?emailaddress=a@exa_mple.org", 400),
    ("?emailaddress=%ff%fe@example.org", 400),
    ("", 400),
])
def test_mozilla_autoconfig_refusals(hosted, query, expected):
    status, _, body = request(hosted, "GET", f"/mail/config-v1.1.xml{query}")
    assert status == expected, body
    if expected != 200:
        assert b"<" not in body and b"Traceback" not in body


def test_unknown_paths_and_methods(hosted):
    assert request(hosted, "GET", "/etc/passwd")[0] == 404
    assert request(hosted, "GET", "/mail/config-v1.1.xml/../../x")[0] == 404
    status, headers, _ = request(hosted, "POST", f"/mail/config-v1.1.xml?emailaddress={ADDRESS}",
                                 body=b"x")
    assert status == 405 and headers["allow"] == "GET"
    status, _, body = request(hosted, "HEAD", f"/mail/config-v1.1.xml?emailaddress={ADDRESS}")
    assert status == 200 and body == b""
    status, _, page = request(hosted, "GET", "/")
    assert status == 200 and hosted.hostname.encode() in page


# -- Outlook Autodiscover ---------------------------------------------------------------------

def autodiscover_request(address: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/'
        'requestschema/2006"><Request>'
        f"<EMailAddress>{address}</EMailAddress>"
        "<AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/"
        "responseschema/2006a</AcceptableResponseSchema></Request></Autodiscover>"
    ).encode()


@pytest.mark.parametrize("path", ["/autodiscover/autodiscover.xml",
                                  "/Autodiscover/Autodiscover.xml"])
def test_autodiscover_pox(hosted, path):
    status, headers, body = request(hosted, "POST", path, body=autodiscover_request(ADDRESS),
                                    headers={"Content-Type": "text/xml"})
    assert status == 200, body
    assert headers["content-type"].startswith("application/xml")
    account = ET.fromstring(body).find(f"{OUTLOOK_NS}Response/{OUTLOOK_NS}Account")
    assert account.findtext(f"{OUTLOOK_NS}Action") == "settings"
    protocols = {p.findtext(f"{OUTLOOK_NS}Type"): p
                 for p in account.findall(f"{OUTLOOK_NS}Protocol")}
    assert set(protocols) == {"IMAP", "POP3", "SMTP"}
    expected = {"IMAP": "imaps", "POP3": "pop3s", "SMTP": "submissions"}
    for kind, protocol in protocols.items():
        assert protocol.findtext(f"{OUTLOOK_NS}Server") == hosted.hostname
        assert int(protocol.findtext(f"{OUTLOOK_NS}Port")) == hosted.ports[expected[kind]]
        assert protocol.findtext(f"{OUTLOOK_NS}LoginName") == ADDRESS
        assert protocol.findtext(f"{OUTLOOK_NS}Encryption") == "SSL"
        assert protocol.findtext(f"{OUTLOOK_NS}SSL") == "on"


def test_autodiscover_refusals(hosted):
    path = "/autodiscover/autodiscover.xml"
    assert request(hosted, "POST", path, body=autodiscover_request("x@not-hosted.test"))[0] == 404
    assert request(hosted, "POST", path, body=b"<Autodiscover><Request>")[0] == 400
    assert request(hosted, "POST", path, body=b"")[0] == 400
    assert request(hosted, "POST", path, body=autodiscover_request("no at sign"))[0] == 400
    # Entity expansion is never attempted ("billion laughs", external entities).
    bomb = (b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e "alice@example.org">]>'
            b"<Autodiscover><Request><EMailAddress>&e;</EMailAddress></Request></Autodiscover>")
    assert request(hosted, "POST", path, body=bomb)[0] == 400
    assert request(hosted, "POST", path, body=b"<a>" + b"x" * 200_000 + b"</a>")[0] == 413
    assert request(hosted, "GET", path)[0] == 405


def test_autodiscover_escapes_the_address(hosted):
    # Legal local-part characters that are special in XML come back escaped, not as markup.
    address = "o'hara&co@example.org"
    body = autodiscover_request("o'hara&amp;co@example.org")
    status, _, document = request(hosted, "POST", "/autodiscover/autodiscover.xml", body=body)
    assert status == 200, document
    assert b"o'hara&amp;co@example.org" in document
    logins = {e.text for e in ET.fromstring(document).iter(f"{OUTLOOK_NS}LoginName")}
    assert logins == {address}
    # Markup in the address is refused outright.
    injected = autodiscover_request("a&lt;/LoginName&gt;&lt;x&gt;@example.org")
    assert request(hosted, "POST", "/autodiscover/autodiscover.xml", body=injected)[0] == 400


# -- Apple configuration profile --------------------------------------------------------------

def test_apple_mobileconfig(hosted):
    status, headers, body = request(
        hosted, "GET", "/apple/mailsuite.mobileconfig?emailaddress=o'hara%26co@example.org")
    assert status == 200, body
    assert headers["content-type"] == "application/x-apple-aspen-config"
    assert "attachment" in headers["content-disposition"]
    profile = plistlib.loads(body)
    assert profile["PayloadType"] == "Configuration" and profile["PayloadVersion"] == 1
    (mail,) = profile["PayloadContent"]
    assert mail["PayloadType"] == "com.apple.mail.managed"
    assert mail["EmailAddress"] == mail["IncomingMailServerUsername"] == "o'hara&co@example.org"
    assert mail["EmailAccountType"] == "EmailTypeIMAP"
    assert mail["IncomingMailServerHostName"] == hosted.hostname
    assert mail["OutgoingMailServerHostName"] == hosted.hostname
    assert mail["IncomingMailServerPortNumber"] == hosted.ports["imaps"]
    assert mail["OutgoingMailServerPortNumber"] == hosted.ports["submissions"]
    assert mail["IncomingMailServerUseSSL"] is mail["OutgoingMailServerUseSSL"] is True
    # No password in the profile: the device asks for it.
    assert not [k for k in mail
                if "Password" in k and k != "OutgoingPasswordSameAsIncomingPassword"]
    # Downloading it again gives the same identifiers (the profile replaces itself).
    again = plistlib.loads(request(hosted, "GET", "/apple/mailsuite.mobileconfig?"
                                   "emailaddress=o'hara%26co@example.org")[2])
    assert again["PayloadUUID"] == profile["PayloadUUID"]
    assert request(hosted, "GET", "/apple/mailsuite.mobileconfig?emailaddress=a@b.test")[0] == 404
    assert request(hosted, "GET", "/apple/mailsuite.mobileconfig")[0] == 400


# -- configuration-dependent answers --------------------------------------------------------

def test_disabled_listeners_are_left_out_and_mta_sts_policy(make_server):
    server = make_server(listeners=["mx", "submission", "imaps", "autoconfig"],
                         extra={"dns": {"mta_sts_mode": "enforce"}})
    server.add_user(ADDRESS)
    incoming, outgoing, _ = servers_in(request(
        server, "GET", f"/mail/config-v1.1.xml?emailaddress={ADDRESS}")[2])
    assert [(e[0], e[2], e[3]) for e in incoming] == [("imap", server.ports["imaps"], "SSL")]
    assert [(e[0], e[2], e[3]) for e in outgoing] == [("smtp", server.ports["submission"],
                                                       "STARTTLS")]
    profile = plistlib.loads(request(
        server, "GET", f"/apple/mailsuite.mobileconfig?emailaddress={ADDRESS}")[2])
    assert profile["PayloadContent"][0]["OutgoingMailServerPortNumber"] == \
        server.ports["submission"]
    # RFC 8461 §3.2 policy, only for mta-sts.<hosted domain>.
    status, _, policy = request(server, "GET", "/.well-known/mta-sts.txt",
                                headers={"Host": "mta-sts.example.org"})
    assert status == 200
    assert policy.decode().split("\r\n") == ["version: STSv1", "mode: enforce",
                                             f"mx: {server.hostname}", "max_age: 604800", ""]
    assert request(server, "GET", "/.well-known/mta-sts.txt",
                   headers={"Host": "mta-sts.not-hosted.test"})[0] == 404


def test_no_mta_sts_policy_unless_configured(hosted):
    assert request(hosted, "GET", "/.well-known/mta-sts.txt",
                   headers={"Host": "mta-sts.example.org"})[0] == 404


# -- first-run message --------------------------------------------------------------------------

def test_first_run_message_only_while_there_is_no_domain(make_server):
    server = make_server()
    log = server.log_text()
    assert "mailsuite has no mail domain yet" in log
    assert f"mailsuite --config {server.config_path} domain add" in log
    assert f"mailsuite --config {server.config_path} user add" in log
    assert f"IMAP             server {server.hostname}  port {server.ports['imaps']}" in log
    assert f"port {server.ports['submission']}" in log
    server.add_domain("example.org")
    server.stop()
    offset = len(server.log_text())
    server.start()
    assert "no mail domain yet" not in server.log_text()[offset:]
    assert "listening for autoconfig" in server.log_text()[offset:]


def test_first_run_message_does_not_break_start_up(tmp_path):
    """An unreadable database must not turn the friendly message into a failed start."""
    from mailsuite.autoconfig import first_run_message
    from mailsuite.config import Config

    garbage = tmp_path / "not-a-database.db"
    garbage.write_bytes(b"this is not SQLite\n" * 100)

    config = Config()
    config.database.url = f"sqlite:///{garbage}"
    assert first_run_message(config) is None


def test_wrong_mta_sts_mode_stops_start_up_with_one_line(make_server):
    server = make_server(extra={"dns": {"mta_sts_mode": "enforcing"}}, start=False)
    with pytest.raises(RuntimeError) as failure:
        server.start()
    assert "mailsuite: [dns] mta_sts_mode must be one of testing, enforce, none" in \
        str(failure.value)
    assert "Traceback" not in str(failure.value)


# -- what the documents are built from ---------------------------------------------------------

@pytest.mark.parametrize("description, port", [
    ("tcp:2143:interface=127.0.0.1", 2143),
    ("tcp:port=143", 143),
    ("tcp6:993:interface=\\:\\:1", 993),
    ("ssl:443:privateKey=/k.pem:certKey=/c.pem", 443),
    ("TCP:25", 25),
    ("unix:/run/mailsuite.sock", None),
    ("systemd:domain=INET:index=0", None),
    ("tcp:0", None),
    ("tcp:http", None),
    ("", None),
])
def test_ports_come_from_endpoint_strings(description, port):
    from mailsuite.autoconfig.settings import endpoint_port

    assert endpoint_port(description) == port


@pytest.mark.parametrize("value, parsed", [
    ("Alice@Example.ORG", ("Alice@example.org", "example.org")),
    ("a.b+tag@sub.example.org", ("a.b+tag@sub.example.org", "sub.example.org")),
    ("o'hara&co@example.org", ("o'hara&co@example.org", "example.org")),
    ("anna@bücher.example", ("anna@xn--bcher-kva.example", "xn--bcher-kva.example")),
    ("no-at-sign", None),
    ("a@localhost", None),
    ("a b@example.org", None),
    ("<a>@example.org", None),
    ('"quoted"@example.org', None),
    ("a@-bad-.example.org", None),
    ("a@" + "x" * 250 + ".org", None),
    ("x" * 65 + "@example.org", None),
])
def test_which_addresses_are_answered(value, parsed):
    from mailsuite.autoconfig.settings import parse_address

    assert parse_address(value) == parsed


def test_https_with_an_ssl_endpoint(make_server):
    """Production on 443: `[listen] autoconfig = "ssl:..."` with the mail certificate."""
    import ssl

    from mailsuite.tls import create_self_signed
    from tests.harness import free_port

    server = make_server(start=False)
    key = os.path.join(os.path.dirname(server.cafile), "key.pem")
    create_self_signed(server.hostname, server.cafile, key)
    port = free_port()
    server.ports["autoconfig"] = port
    server.sections["listen"]["autoconfig"] = (
        f"ssl:{port}:privateKey={key}:certKey={server.cafile}:interface=127.0.0.1")
    write_toml(server.config_path, server.sections)
    server.start()
    server.add_user(ADDRESS)
    context = ssl.create_default_context(cafile=server.cafile)
    conn = http.client.HTTPSConnection(server.hostname, port, timeout=15, context=context)
    # Connect to 127.0.0.1 but verify the certificate for the mail host name.
    conn.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=15),
                                    server_hostname=server.hostname)
    try:
        conn.request("GET", f"/mail/config-v1.1.xml?emailaddress={ADDRESS}")
        response = conn.getresponse()
        assert response.status == 200
        assert servers_in(response.read())[2].get("id") == "example.org"
    finally:
        conn.close()

"""The configuration documents mail clients fetch: Mozilla autoconfig, Microsoft Autodiscover
(POX), and an Apple configuration profile.

All of them are built with xml.etree / plistlib from validated values, never by pasting strings,
so an address cannot inject markup. None of them contains a password or anything else secret.
"""
from __future__ import annotations

import plistlib
import uuid
import xml.etree.ElementTree as ET

from mailsuite.autoconfig.settings import ClientServer, preferred

_SCHEMAS = "http://schemas.microsoft.com/exchange/autodiscover/"
AUTODISCOVER_RESPONSE_NS = _SCHEMAS + "responseschema/2006"
OUTLOOK_RESPONSE_NS = _SCHEMAS + "outlook/responseschema/2006a"
MOBILECONFIG_CONTENT_TYPE = b"application/x-apple-aspen-config"


def mozilla_autoconfig(servers: list[ClientServer], domain: str) -> bytes:
    """config-v1.1.xml (https://wiki.mozilla.org/Thunderbird:Autoconfiguration:ConfigFileFormat).

    Thunderbird takes the first incomingServer/outgoingServer it can use, so the preferred
    entries (implicit TLS, RFC 8314) come first. %EMAILADDRESS% is the placeholder Thunderbird
    replaces with what the user typed: our logins are full addresses.
    """
    root = ET.Element("clientConfig", version="1.1")
    provider = ET.SubElement(root, "emailProvider", id=domain)
    ET.SubElement(provider, "domain").text = domain
    ET.SubElement(provider, "displayName").text = f"{domain} mail"
    ET.SubElement(provider, "displayShortName").text = domain
    for entry in servers:
        tag = "outgoingServer" if entry.protocol == "smtp" else "incomingServer"
        element = ET.SubElement(provider, tag, type=entry.protocol)
        ET.SubElement(element, "hostname").text = entry.host
        ET.SubElement(element, "port").text = str(entry.port)
        ET.SubElement(element, "socketType").text = entry.security
        # Cleartext inside TLS: the only SASL mechanism every server part offers (PLAIN/LOGIN).
        ET.SubElement(element, "authentication").text = "password-cleartext"
        ET.SubElement(element, "username").text = "%EMAILADDRESS%"
    return _xml_bytes(root)


def autodiscover_request_address(body: bytes) -> str | None:
    """The EMailAddress of an Outlook POX Autodiscover request, None if the body is not one.

    The request is small; a DOCTYPE is refused outright so no entity expansion ever happens.
    """
    if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
        return None
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    for element in root.iter():
        # Namespace-agnostic: clients differ in how they qualify the request elements.
        if element.tag.rsplit("}", 1)[-1] == "EMailAddress" and element.text:
            return element.text.strip()
    return None


def autodiscover_response(servers: list[ClientServer], address: str) -> bytes:
    """The POX response Outlook expects: one Protocol element per type, preferred entry only."""
    root = ET.Element("Autodiscover", xmlns=AUTODISCOVER_RESPONSE_NS)
    response = ET.SubElement(root, "Response", xmlns=OUTLOOK_RESPONSE_NS)
    account = ET.SubElement(response, "Account")
    ET.SubElement(account, "AccountType").text = "email"
    ET.SubElement(account, "Action").text = "settings"
    for protocol, name in (("imap", "IMAP"), ("pop3", "POP3"), ("smtp", "SMTP")):
        entry = preferred(servers, protocol)
        if entry is None:
            continue
        element = ET.SubElement(account, "Protocol")
        ET.SubElement(element, "Type").text = name
        ET.SubElement(element, "Server").text = entry.host
        ET.SubElement(element, "Port").text = str(entry.port)
        ET.SubElement(element, "DomainRequired").text = "off"
        ET.SubElement(element, "LoginName").text = address
        ET.SubElement(element, "SPA").text = "off"
        # Outlook's vocabulary: Encryption "SSL" is implicit TLS, "TLS" is STARTTLS.
        ET.SubElement(element, "SSL").text = "on"
        ET.SubElement(element, "Encryption").text = "SSL" if entry.security == "SSL" else "TLS"
        ET.SubElement(element, "AuthRequired").text = "on"
        if protocol == "smtp":
            ET.SubElement(element, "UsePOPAuth").text = "on"
            ET.SubElement(element, "SMTPLast").text = "off"
    return _xml_bytes(root)


def apple_mobileconfig(servers: list[ClientServer], address: str, hostname: str) -> bytes | None:
    """An unsigned configuration profile with one com.apple.mail.managed payload, or None when
    there is no incoming or no outgoing server to describe. No password: the device asks for it.
    """
    incoming = preferred(servers, "imap") or preferred(servers, "pop3")
    outgoing = preferred(servers, "smtp")
    if incoming is None or outgoing is None:
        return None
    # Stable identifiers: downloading the profile again replaces the installed one instead of
    # adding a duplicate account.
    reverse_host = ".".join(reversed(hostname.split(".")))
    base = f"{reverse_host}.mailsuite.{address}"
    payload = {
        "PayloadType": "com.apple.mail.managed",
        "PayloadVersion": 1,
        "PayloadIdentifier": base + ".mail",
        "PayloadUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, base + ".mail")).upper(),
        "PayloadDisplayName": address,
        "EmailAccountDescription": address,
        "EmailAccountName": address,
        "EmailAccountType": "EmailTypeIMAP" if incoming.protocol == "imap" else "EmailTypePOP",
        "EmailAddress": address,
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "IncomingMailServerHostName": incoming.host,
        "IncomingMailServerPortNumber": incoming.port,
        # Apple Mail does STARTTLS on a plain port when UseSSL is true; TLS is never optional.
        "IncomingMailServerUseSSL": True,
        "IncomingMailServerUsername": address,
        "OutgoingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingMailServerHostName": outgoing.host,
        "OutgoingMailServerPortNumber": outgoing.port,
        "OutgoingMailServerUseSSL": True,
        "OutgoingMailServerUsername": address,
        "OutgoingPasswordSameAsIncomingPassword": True,
        "PreventMove": False,
        "PreventAppSheet": False,
        "SMIMEEnabled": False,
        "allowMailDrop": False,
    }
    profile = {
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadIdentifier": base,
        "PayloadUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, base)).upper(),
        "PayloadDisplayName": f"Mail for {address}",
        "PayloadDescription": f"Sets up the mail account {address} on {hostname}.",
        "PayloadOrganization": hostname,
        "PayloadRemovalDisallowed": False,
        "PayloadContent": [payload],
    }
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML)


def _xml_bytes(root: ET.Element) -> bytes:
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)

"""IMAP in memory: the not-authenticated state and the commands of any state: CAPABILITY,
STARTTLS, LOGIN, AUTHENTICATE, NAMESPACE, ID, ENABLE, LOGOUT, and the idle timeout."""
from __future__ import annotations

import base64
import re

from tests.unit.imapkit import PASSWORD, World, folder_names, tagged, world  # noqa: F401


def test_capabilities_and_logindisabled_before_tls(world):
    r = world.connect(tls=False, login_as=None)
    caps = r.cmd(b"a CAPABILITY")[0]
    for c in (b"IMAP4rev1", b"LITERAL+", b"IDLE", b"UIDPLUS", b"MOVE", b"SPECIAL-USE", b"NAMESPACE",
              b"ID", b"ENABLE", b"UNSELECT", b"CHILDREN", b"STARTTLS", b"LOGINDISABLED"):
        assert c in caps.split(), c
    assert b"AUTH=PLAIN" not in caps
    assert tagged(r.cmd(b"b LOGIN alice@example.org " + PASSWORD.encode())).startswith(b"b NO")
    assert tagged(r.cmd(b"c AUTHENTICATE PLAIN")).startswith(b"c NO")


def test_starttls_discards_pipelined_plaintext_and_changes_capabilities(world):
    """`a STARTTLS\\r\\nb LOGIN ...` in one packet must not run b inside TLS
    (docs/design/imap.md, "STARTTLS")."""
    r = world.connect(tls=False, login_as=None)
    r.send(b"a STARTTLS\r\nb LOGIN alice@example.org " + PASSWORD.encode() + b"\r\n")
    assert r.line().startswith(b"a OK")
    assert r.transport.tls_context is world.tls.context
    assert r.pending() == b""  # nothing for b: it was discarded
    assert r.cmd(b"c NOOP")[0].startswith(b"c OK")
    assert tagged(r.cmd(b"d SELECT INBOX")).startswith(b"d BAD")  # still not authenticated
    caps = r.cmd(b"e CAPABILITY")[0].split()
    assert b"AUTH=PLAIN" in caps and b"STARTTLS" not in caps and b"LOGINDISABLED" not in caps
    assert tagged(r.cmd(b"f LOGIN alice@example.org " + PASSWORD.encode())).startswith(b"f OK")
    assert b"AUTH=PLAIN" not in r.cmd(b"g CAPABILITY")[0].split()
    assert tagged(r.cmd(b"h STARTTLS")).startswith(b"h BAD")


def test_authenticate_plain_with_continuation_and_sasl_ir(world):
    r = world.connect(login_as=None)
    r.send(b"a AUTHENTICATE PLAIN\r\n")
    assert r.line().startswith(b"+")
    r.send(base64.b64encode(b"\0alice@example.org\0" + PASSWORD.encode()) + b"\r\n")
    assert tagged(r.response(b"a")).startswith(b"a OK")
    r = world.connect(login_as=None)
    ir = base64.b64encode(b"\0bob@example.org\0" + PASSWORD.encode())
    assert tagged(r.cmd(b"a AUTHENTICATE PLAIN " + ir)).startswith(b"a OK")
    r = world.connect(login_as=None)
    r.send(b"a AUTHENTICATE PLAIN\r\n")
    assert r.line().startswith(b"+")
    r.send(b"*\r\n")
    assert r.response(b"a")[-1].startswith(b"a BAD")


def test_plain_authzid_of_another_user_is_refused(world):
    r = world.connect(login_as=None)
    ir = base64.b64encode(b"bob@example.org\0alice@example.org\0" + PASSWORD.encode())
    assert tagged(r.cmd(b"a AUTHENTICATE PLAIN " + ir)).startswith(b"a NO")


def test_failed_logins_are_refused_and_the_last_one_hangs_up(world):
    r = world.connect(login_as=None)
    resp = r.cmd(b"a LOGIN alice@example.org wrong-password")
    assert tagged(resp).startswith(b"a NO [AUTHENTICATIONFAILED]")
    resp = r.cmd(b"b LOGIN nobody@example.org wrong")
    assert tagged(resp).startswith(b"b NO")
    resp = r.cmd(b"c LOGIN nobody@example.org wrong")
    assert tagged(resp).startswith(b"c NO")
    assert r.line().startswith(b"* BYE")  # max_auth_failures reached: the server hangs up
    assert r.disconnected
    # The directory hears the client's address, so that it can throttle it.
    assert [ip for _, ip, _ in world.directory.logins] == ["127.0.0.1"] * 3


def test_first_login_creates_special_folders_with_attributes(world):
    r = world.connect(login_as="carol@example.org")
    data = r.cmd(b'a LIST "" "*"')[:-1]
    lines = {re.search(rb'"([^"]*)"$', d).group(1): d for d in data}
    for name, attr in ((b"Sent", b"\\Sent"), (b"Drafts", b"\\Drafts"), (b"Trash", b"\\Trash"),
                       (b"Junk", b"\\Junk"), (b"Archive", b"\\Archive")):
        assert attr in lines[name], lines[name]
    assert b"INBOX" in lines
    assert "Sent" in folder_names(r)


def test_namespace_id_enable(world):
    r = world.connect()
    assert r.cmd(b"a NAMESPACE")[0] == b'* NAMESPACE (("" "/")) NIL NIL'
    resp = r.cmd(b'b ID ("name" "Thunderbird" "version" "153")')
    assert resp[0].startswith(b"* ID (") and tagged(resp).startswith(b"b OK")
    resp = r.cmd(b"c ENABLE X-UNKNOWN")
    assert resp[0] == b"* ENABLED" and tagged(resp).startswith(b"c OK")
    resp = r.cmd(b"d ENABLE CONDSTORE X-UNKNOWN")
    assert resp[0] == b"* ENABLED CONDSTORE" and tagged(resp).startswith(b"d OK")


def test_logout_says_bye_and_closes(world):
    r = world.connect(login_as=None)
    resp = r.cmd(b"a LOGOUT")
    assert resp[0].startswith(b"* BYE") and tagged(resp).startswith(b"a OK")
    assert r.disconnected


def test_idle_connection_is_logged_out_after_imap_timeout(tmp_path):
    w = World(str(tmp_path), imap_timeout=3)
    r = w.connect()
    w.clock.advance(2.9)
    assert r.pending() == b""
    w.clock.advance(0.2)
    assert r.line().startswith(b"* BYE")
    assert r.disconnected


def test_connection_limit_refuses_with_bye_and_frees_the_slot_on_close(tmp_path):
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from mailsuite.imap import server_factory
    from mailsuite.pools import InlinePool

    w = World(str(tmp_path), max_connections_per_ip=1)
    factory = server_factory(w.config, w.directory, w.store, InlinePool(), w.tls, w.clock,
                             implicit_tls=True)
    addr = IPv4Address("TCP", "127.0.0.1", 50000)
    first, t1 = factory.buildProtocol(addr), StringTransport(peerAddress=addr)
    first.makeConnection(t1)
    assert t1.value().startswith(b"* OK")
    second, t2 = factory.buildProtocol(addr), StringTransport(peerAddress=addr)
    second.makeConnection(t2)
    assert t2.value() == b"* BYE too many connections, try again later\r\n"
    assert t2.disconnecting
    first.connectionLost(None)
    third, t3 = factory.buildProtocol(addr), StringTransport(peerAddress=addr)
    third.makeConnection(t3)
    assert t3.value().startswith(b"* OK")

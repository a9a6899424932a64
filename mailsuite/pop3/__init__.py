"""POP3 (RFC 1939) with STLS, SASL PLAIN and RESP-CODES over the mailbox store's INBOX.

`server_factory(config, directory, mailstore, io, tls, clock, implicit_tls)` is what service.py
calls for the pop3 and pop3s listeners; the protocol is in server.py, RETR/TOP streaming in
retrieval.py, reply texts in replies.py.
"""
from mailsuite.pop3.server import POP3Server, server_factory

__all__ = ["POP3Server", "server_factory"]

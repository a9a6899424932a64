"""mailsuite.smtp: the ESMTP server for the MX port and the submission ports.

`server_factory(suite, policy="mx"|"submission", implicit_tls=False)` is what service.py calls for
each listener. Mechanics live in server.py, who-may-do-what in policy.py, reply codes in replies.py.
"""
from mailsuite.smtp.server import SMTPServer, SMTPServerFactory, server_factory

__all__ = ["SMTPServer", "SMTPServerFactory", "server_factory"]

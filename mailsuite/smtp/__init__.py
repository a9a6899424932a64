"""mailsuite.smtp: the ESMTP server for the MX port and the submission ports.

`server_factory(config, policy, queue, directory, tls, clock, resolver, implicit_tls)` is what
service.py calls for each listener, with an `MXPolicy` or a `SubmissionPolicy`. Mechanics live in
server.py, who-may-do-what in policy.py, reply codes in replies.py.
"""
from mailsuite.smtp.policy import POLICIES, MXPolicy, Policy, SubmissionPolicy
from mailsuite.smtp.server import SMTPServer, SMTPServerFactory, server_factory

__all__ = ["MXPolicy", "POLICIES", "Policy", "SMTPServer", "SMTPServerFactory",
           "SubmissionPolicy", "server_factory"]

"""The `twistd mailsuite` entry point: a thin IServiceMaker; the work is in mailsuite.tap."""
from twisted.application.service import ServiceMaker

mailsuite = ServiceMaker(
    "mailsuite",
    "mailsuite.tap",
    "mailsuite: SMTP (MX and submission), queue, Maildir, IMAP and POP3 in one process",
    "mailsuite",
)

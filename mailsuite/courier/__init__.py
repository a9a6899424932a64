"""Outbound SMTP delivery to other domains: MX routing, TLS, DSN, DKIM (issue 4)."""


def install(suite) -> None:
    """Plug remote delivery and bounce generation into suite.queue (nothing yet)."""

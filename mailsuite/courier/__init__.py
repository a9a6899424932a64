"""Outbound SMTP delivery to other domains: MX routing, TLS, DSN (issue 4)."""

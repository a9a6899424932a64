"""mailsuite: a complete mail server on Twisted."""

__version__ = "0.1.0"

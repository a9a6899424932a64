"""mailsuite.smtp (not built yet)."""


def server_factory(suite, **kwargs):
    """The protocol factory for this listener, or None while the part does not exist yet."""
    return None

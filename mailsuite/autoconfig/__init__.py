"""mailsuite.autoconfig (not built yet)."""


def server_factory(suite, **kwargs):
    """The protocol factory for this listener, or None while the part does not exist yet."""
    return None


def first_run_message(suite):
    """What to do next, logged when the directory is empty (issue 5); None for nothing."""
    return None

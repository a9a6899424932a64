"""Who exists and who may do what: domains, users, aliases (SQLAlchemy), passwords (passlib).

Protocol code uses only the asynchronous `Directory` (every method returns a Deferred and does its
SQL and hashing in mailsuite's own thread pools). The admin CLI uses the synchronous
`DirectoryStore` directly. Routing rules are described in `mailsuite.directory.routing`.
"""
from typing import Any

from mailsuite.directory.records import (AliasInfo, DirectoryError,  # noqa: F401
                                         DirectoryUnavailable, DomainInfo, Route, UserInfo)
from mailsuite.directory.store import DirectoryStore  # noqa: F401
from mailsuite.directory.throttle import LoginThrottle  # noqa: F401


def __getattr__(name: str) -> Any:
    # The asynchronous half (twisted.cred, Deferreds) is imported on first use only: the admin
    # CLI, a short-lived process started for every command, never needs it.
    if name in ("Directory", "DirectoryChecker"):
        from mailsuite.directory import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Who exists and who may do what: domains, users, aliases (SQLAlchemy), passwords (passlib).

Protocol code uses only the asynchronous `Directory` (every method returns a Deferred and does its
SQL and hashing in mailsuite's own thread pools). The admin CLI uses the synchronous
`DirectoryStore` directly.
"""
from mailsuite.directory.api import Directory, DirectoryError, Route  # noqa: F401

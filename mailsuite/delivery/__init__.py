"""Local delivery agent: recipients of our domains into their Maildir, atomically and durably."""

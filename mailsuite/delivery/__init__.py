"""Local delivery agent: recipients of our domains into their INBOX, through the mailbox store."""

"""The Maildir++ mailbox store that IMAP and POP3 read and the delivery agent writes."""

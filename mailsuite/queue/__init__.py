"""The durable spool and the runner that delivers every recipient of every accepted message."""

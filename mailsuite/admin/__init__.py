"""The `mailsuite` admin command line."""

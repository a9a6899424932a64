"""`twistd mailsuite [--config FILE]`: options and the service maker for the twistd plugin."""
from __future__ import annotations

import os
import sys

from twisted.python import usage

from mailsuite import config as config_module


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = ("Run the whole mail suite. With no --config, everything runs from ./mailsuite-data "
                "on 127.0.0.1 at unprivileged ports (MX 2525, submission 2587/2465, IMAP "
                "2143/2993, POP3 2110/2995).")
    optParameters = [["config", "c", None, "TOML configuration file (see etc/mailsuite.toml)"]]


def makeService(options: Options):
    from mailsuite.logwriter import BufferedLogging
    from mailsuite.service import make_service

    try:
        config = config_module.load(options["config"])
        # The log file is written by a thread of its own, never by the reactor thread.
        return BufferedLogging(make_service(config), reformat=_pid_in_lines(config))
    except config_module.ConfigError as e:
        # One clear line, not a traceback: the operator has something to change.
        sys.stderr.write(f"mailsuite: {e}\n")
        sys.stderr.flush()
        raise SystemExit(2)


def _pid_in_lines(config: config_module.Config):
    """With worker processes every log line names the process that wrote it (workers.py)."""
    if config.workers <= 1:
        return None
    from mailsuite.workers import format_with_pid

    # The pid when logging starts: twistd forks to daemonize after makeService.
    return lambda format_event: format_with_pid(format_event, os.getpid())

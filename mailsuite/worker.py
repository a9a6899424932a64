"""`python -m mailsuite.worker`: one worker process, started by the first process when
[server] workers > 1 (mailsuite/workers.py). Not for operators to run by hand.

    python -m mailsuite.worker --parent PID [--config FILE] --listen mx=3 --listen imap=4 ...
        [--counts FD --slot K]

It serves the listening sockets it inherited (`--listen NAME=FD`) with the service the first
process built for itself (service.make_service), counting its connections in row K of the
connection table inherited as FD (mailsuite/conncount.py), writes its log to stdout (the first
process writes it into the one log), and stops when the first process ends: on SIGTERM, on the
parent-death signal, or when its stdin (a pipe from the first process) reaches EOF.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from twisted.internet import abstract, fdesc


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from mailsuite.workers import stop_with_parent

    if not stop_with_parent(args.parent):
        return 0  # the first process ended while we started
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from mailsuite import config as config_module
    from mailsuite.logwriter import BufferedLogging
    from mailsuite.service import make_service

    globalLogBeginner.beginLoggingTo([log_observer(sys.stdout, os.getpid())],
                                     redirectStandardIO=False)
    try:
        config = config_module.load(args.config)
        if args.tls_fds is not None:
            # What the first process read before dropping its privileges (workers.tls_files).
            config.tls.cert, config.tls.key = (f"/proc/self/fd/{fd}" for fd in args.tls_fds)
        top = BufferedLogging(make_service(config, reactor, inherited=args.listen,
                                           counts=args.counts))
    except config_module.ConfigError as e:
        sys.stderr.write(f"mailsuite worker: {e}\n")
        return 2
    top.privilegedStartService()
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    _ParentPipe(reactor).startReading()
    reactor.run()
    return 0


def log_observer(stream: Any, pid: int) -> Any:
    """The worker's log file observer: twistd's text, made by the faster formatter (its time
    made once per second; logwriter.ClassicText), each line naming the process. The faster
    formatter goes in first: BufferedLogging recognises only twisted's own formatter, not
    one already wrapped to add the pid."""
    from twisted.logger import textFileLogObserver

    from mailsuite.logwriter import faster_text
    from mailsuite.workers import format_with_pid

    observer = textFileLogObserver(stream)
    observer.formatEvent = format_with_pid(faster_text(observer.formatEvent), pid)
    return observer


def _parse(argv: list[str] | None) -> Any:
    p = argparse.ArgumentParser(prog="python -m mailsuite.worker")
    p.add_argument("--parent", type=int, required=True, help="the first process's pid")
    p.add_argument("--config", default=None)
    p.add_argument("--listen", action="append", default=[], metavar="NAME=FD",
                   help="a listener's inherited socket")
    p.add_argument("--counts", type=int, default=None, metavar="FD",
                   help="the inherited connection table")
    p.add_argument("--slot", type=int, default=None, metavar="K",
                   help="this worker's row of the connection table")
    p.add_argument("--tls-fds", default=None, metavar="CERT,KEY",
                   help="inherited copies of the configured TLS certificate and key")
    args = p.parse_args(argv)
    if args.tls_fds is not None:
        cert, _, key = args.tls_fds.partition(",")
        if not (cert.isdigit() and key.isdigit()):
            p.error(f"--tls-fds {args.tls_fds!r}: give CERT,KEY descriptors")
        args.tls_fds = (int(cert), int(key))
    if (args.counts is None) != (args.slot is None):
        p.error("--counts and --slot go together")
    args.counts = (args.counts, args.slot) if args.counts is not None else None
    listen = {}
    for item in args.listen:
        name, _, fd = item.partition("=")
        if not fd.isdigit():
            p.error(f"--listen {item!r}: give NAME=FD")
        listen[name] = int(fd)
    args.listen = listen
    return args


class _ParentPipe(abstract.FileDescriptor):
    """Our stdin, a pipe the first process holds open and never writes: EOF means it ended
    (on systems without a parent-death signal too)."""

    def fileno(self) -> int:
        return 0

    def startReading(self) -> None:
        fdesc.setNonBlocking(0)
        super().startReading()

    def doRead(self) -> Any:
        return fdesc.readFromFD(0, lambda data: None)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        if self.reactor.running:
            self.reactor.stop()


if __name__ == "__main__":
    sys.exit(main())

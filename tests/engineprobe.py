"""Run one content scan with the real reactor, in a child process, and return its Verdict.

Interop tests call `probe(...)`: a reactor can run only once per process and the test process
must not depend on one, so each scan is `python -m tests.engineprobe` with its inputs as JSON on
stdin; the child runs the scanner under `task.react` with a real io WorkerPool and prints the
Verdict as JSON. See docs/design/trust-engines.md, "Tests".
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from typing import Any

from tests.harness import REPO_ROOT, subprocess_env


def probe(engine: str, config: dict[str, Any], message_path: str,
          envelope: dict[str, Any] | None = None, size: int | None = None,
          timeout: float = 60.0) -> dict[str, Any]:
    """Scan `message_path` with engine "rspamd" or "clamd" configured by `config` (the fields
    of RspamdSection/ClamdSection); returns the Verdict as a dict (reply as a dict or None)."""
    request = dict(engine=engine, config=config, message_path=message_path,
                   envelope=envelope or {}, size=size)
    done = subprocess.run([sys.executable, "-m", "tests.engineprobe"], input=json.dumps(request),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
                          env=subprocess_env())
    if done.returncode != 0:
        raise AssertionError(f"engine probe failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _main(reactor: Any, request: dict[str, Any]) -> Any:
    import os

    from mailsuite.config import ClamdSection, RspamdSection
    from mailsuite.pools import WorkerPool
    from mailsuite.trust import Envelope

    io = WorkerPool("io", 2, reactor)
    envelope = Envelope(**{"client_ip": "192.0.2.10", "helo": "mail.example.com",
                           "mail_from": "sender@example.com",
                           "recipients": ("rcpt@example.org",), "queue_id": "PROBE1",
                           **request["envelope"]})
    path = request["message_path"]
    size = request["size"] if request["size"] is not None else os.path.getsize(path)
    if request["engine"] == "rspamd":
        from mailsuite.trust.rspamd import RspamdScanner

        scanner = RspamdScanner(RspamdSection(**request["config"]), reactor, "mx.test.invalid",
                                io)
    else:
        from mailsuite.trust.clamd import ClamdScanner

        scanner = ClamdScanner(ClamdSection(**request["config"]), reactor, io)

    def report(verdict: Any) -> Any:
        out = dataclasses.asdict(verdict)
        print(json.dumps(out))
        io.stop()
        if hasattr(scanner, "close"):
            return scanner.close()
        return None

    return scanner.scan(envelope, path, size).addCallback(report)


def main() -> None:
    from twisted.internet import task

    request = json.loads(sys.stdin.read())
    task.react(_main, [request])


if __name__ == "__main__":
    main()

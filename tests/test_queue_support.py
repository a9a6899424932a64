"""Helpers for the queue tests: an in-process queue runner on a real reactor and real files.

(No tests here; the name only keeps it among the queue's test files.)
"""
from __future__ import annotations

import os
import time
from typing import Any

from twisted.internet import defer, reactor, task

from mailsuite.config import Config
from mailsuite.directory.api import Route
from mailsuite.pools import Pools
from mailsuite.queue.runner import QueueRunner
from mailsuite.service import Parts as Suite


def make_config(data_dir: str, **queue: Any) -> Config:
    config = Config()
    config.server.data_dir = data_dir
    config.server.hostname = "mx.test.example"
    for key, value in queue.items():
        setattr(config.queue, key, value)
    return config


def make_suite(data_dir: str, **queue: Any) -> Suite:
    """A Suite with only what the queue needs (config, pools, reactor) and a QueueRunner."""
    config = make_config(data_dir, **queue)
    os.makedirs(config.queue_dir, exist_ok=True)
    suite = Suite(config=config, pools=Pools(reactor=reactor), tls=None, directory=None,
                  queue=None, mailstore=None, reactor=reactor)
    suite.queue = QueueRunner(suite)
    return suite


def start(suite: Suite) -> None:
    suite.pools.startService()
    suite.queue.startService()


@defer.inlineCallbacks
def stop(suite: Suite) -> Any:
    """Let attempts in progress finish (so no callback outlives the test), then stop."""
    yield wait_idle(suite, timeout=10)
    if suite.queue.running:
        suite.queue.stopService()
    suite.pools.stopService()


@defer.inlineCallbacks
def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        yield task.deferLater(reactor, interval, lambda: None)


def wait_idle(suite: Suite, timeout: float = 10.0) -> defer.Deferred:
    return wait_for(lambda: not suite.queue._inflight and not suite.queue._scanning or None,
                    timeout)


def local_route(*mailboxes: str, address: str | None = None) -> Route:
    return Route(address=address or mailboxes[0], hosted=True, mailboxes=tuple(mailboxes))


def remote_route(address: str) -> Route:
    return Route(address=address, hosted=False)


def message(subject: str = "hello", received: int = 1, body: bytes = b"Hi there.\r\n") -> bytes:
    trace = b"".join(b"Received: from relay%d.example by mx.test.example; "
                     b"Sat, 28 Nov 2026 01:00:00 +0000\r\n" % i for i in range(received))
    return (trace + b"From: Carol <carol@remote.example>\r\nTo: alice@example.org\r\n"
            b"Subject: " + subject.encode() + b"\r\nMessage-ID: <" + subject.encode()
            + b"@remote.example>\r\n\r\n" + body)


def maildir_messages(config: Config, address: str) -> list[str]:
    root = config.maildir_for(address)
    found = []
    for sub in ("new", "cur"):
        d = os.path.join(root, sub)
        if os.path.isdir(d):
            found += [os.path.join(d, n) for n in sorted(os.listdir(d))]
    return found


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()

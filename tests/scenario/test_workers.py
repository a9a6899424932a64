"""[server] workers = 2: two processes serve the same listening sockets (mailsuite/workers.py).

Which process serves a connection is read from /proc: the process that holds the server side
of it. Each test opens connections until it has one in each process, so it proves both serve
rather than hoping the kernel spread them.
"""
from __future__ import annotations

import email
import imaplib
import os
import poplib
import re
import signal
import smtplib
import socket
import ssl
from typing import Any, Callable

import pytest

from mailsuite.workers import SHARED_LISTENERS
from tests.harness import HOST, MailServer
from tests.polling import wait_until
from tests.scenario.imapraw import PASSWORD, Raw, tagged

ALICE = "alice@example.org"


def start(base_dir: str) -> MailServer:
    srv = MailServer(base_dir, extra={"server": {"workers": 2,
                                                 "worker_listeners": list(SHARED_LISTENERS)}})
    srv.add_user(ALICE, PASSWORD)
    srv.start()
    wait_until(lambda: worker_pids(srv), timeout=60, message="the worker process")
    return srv


def worker_pids(srv: MailServer) -> list[int]:
    """Pids of the live workers that serve (their "serving" lines are in the log)."""
    text = srv.log_text()
    started = [int(p) for p in re.findall(r"started worker \d+ \(pid (\d+)\)", text)]
    return [p for p in started if f"[pid={p} mailsuite.workers#info] serving mx on" in text
            and alive(p)]


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet, in a container without an init, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start(str(tmp_path_factory.mktemp("workers")))
    yield srv
    srv.stop()


@pytest.fixture
def own_server(tmp_path):
    srv = start(str(tmp_path))
    yield srv
    srv.kill()


# -- which process serves a connection ---------------------------------------------------------

def serving_pid(server_port: int, client: socket.socket, pids: list[int]) -> int | None:
    """The pid (of `pids`) holding the server side of `client`'s connection."""
    client_port = client.getsockname()[1]
    wanted = f":{server_port:04X}", f":{client_port:04X}"
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(wanted[0]) and fields[2].endswith(wanted[1]):
                inode = fields[9]
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
                except OSError:
                    pass
        except OSError:
            pass
    return None


def one_in_each(srv: MailServer, listener: str, pids: list[int], connect: Callable[[], Any],
                sock_of: Callable[[Any], socket.socket], close: Callable[[Any], None],
                tries: int = 60) -> dict[int, Any]:
    """Open connections (each greeted, so accepted) until one is served by each of `pids`."""
    found: dict[int, Any] = {}
    for _ in range(tries):
        conn = connect()
        pid = serving_pid(srv.ports[listener], sock_of(conn), pids)
        if pid is not None and pid not in found:
            found[pid] = conn
            if len(found) == len(pids):
                return found
        else:
            close(conn)
    for conn in found.values():
        close(conn)
    raise AssertionError(f"{tries} connections to {listener} did not reach each of {pids}")


def smtp_in_each(srv: MailServer, pids: list[int], listener: str = "mx") -> dict[int, Any]:
    return one_in_each(srv, listener, pids,
                       lambda: smtplib.SMTP(HOST, srv.ports[listener], timeout=30),
                       lambda c: c.sock, lambda c: c.close())


def message(subject: str) -> str:
    return f"From: sender@remote.example\r\nTo: {ALICE}\r\nSubject: {subject}\r\n\r\nhello\r\n"


def subjects(paths: list[str]) -> list[str]:
    found = []
    for path in paths:
        with open(path, "rb") as f:
            found.append(email.message_from_bytes(f.read())["Subject"])
    return found


# -- the tests ----------------------------------------------------------------------------------

def test_both_processes_accept_smtp_and_each_message_is_delivered_once(server):
    first, worker = server.process.pid, worker_pids(server)[0]
    before = len(server.messages(ALICE))
    sessions = smtp_in_each(server, [first, worker])
    sent = []
    for pid, smtp in sessions.items():
        for n in range(3):
            subject = f"smtp {pid} {n}"
            smtp.sendmail("sender@remote.example", [ALICE], message(subject))
            sent.append(subject)
        smtp.quit()
    delivered = server.wait_for_messages(ALICE, before + len(sent))
    got = subjects(delivered)
    assert sorted(s for s in got if s.startswith("smtp ")) == sorted(sent), server.log_text()
    log = server.log_text()
    accepted = dict(re.findall(r"\[pid=(\d+) mailsuite\.smtp\.server#info\] accepted (\w+)", log))
    assert {first, worker} <= {int(p) for p in accepted}
    # One queue id's story is whole in the one log, whichever process told it.
    queue_id = re.search(rf"\[pid={worker} mailsuite\.smtp\.server#info\] accepted (\w+)",
                         log).group(1)
    story = [line for line in log.splitlines() if f"queue_id={queue_id} " in line]
    assert [re.search(r"status=(\w+)", line).group(1) for line in story] == \
        ["queued", "sent", "removed"], story


def test_imap_pop3_and_submission_across_the_processes(server):
    first, worker = server.process.pid, worker_pids(server)[0]
    ctx = server.ssl_context()
    imaps = one_in_each(server, "imaps", [first, worker], lambda: Raw(server, login_as=None),
                        lambda r: r.sock, lambda r: r.close())
    idler, appender = imaps[first], imaps[worker]
    try:
        for raw in (idler, appender):
            assert tagged(raw.cmd(f"L LOGIN {ALICE} {PASSWORD}".encode())).startswith(b"L OK")
        exists = int(re.search(rb"\* (\d+) EXISTS", b"\n".join(idler.cmd(b"s SELECT INBOX")))
                     .group(1))
        idler.send(b"i IDLE\r\n")
        assert idler.line().startswith(b"+")
        body = message("appended in the worker").encode()
        appender.send(b"a APPEND INBOX {%d}\r\n" % len(body))
        assert appender.line().startswith(b"+")
        appender.send(body + b"\r\n")
        assert tagged(appender.response(b"a")).startswith(b"a OK")
        # Another process: the SQLite IDLE poll (0.5 s) sees it, well within Raw's timeout.
        while not (line := idler.line()).endswith(b"EXISTS"):
            pass
        assert line == b"* %d EXISTS" % (exists + 1)
        idler.send(b"DONE\r\n")
        assert tagged(idler.response(b"i")).startswith(b"i OK")
        fetched = b"\n".join(idler.cmd(b"f FETCH %d BODY.PEEK[HEADER.FIELDS (SUBJECT)]"
                                       % (exists + 1)))
        assert b"Subject: appended in the worker" in fetched
    finally:
        idler.close()
        appender.close()

    # Submission (STARTTLS + AUTH) in each process; then POP3 sees all of it.
    before = len(server.messages(ALICE))
    for pid, smtp in smtp_in_each(server, [first, worker], "submission").items():
        smtp.starttls(context=ctx)
        smtp.login(ALICE, PASSWORD)
        smtp.sendmail(ALICE, [ALICE], message(f"submitted via {pid}").replace(
            "sender@remote.example", ALICE))
        smtp.quit()
    assert len(server.wait_for_messages(ALICE, before + 2)) == before + 2
    pop = poplib.POP3_SSL(HOST, server.ports["pop3s"], context=ctx, timeout=30)
    try:
        pop.user(ALICE)
        pop.pass_(PASSWORD)
        count = pop.stat()[0]
        assert count == before + 2
        tops = [b"\n".join(pop.top(n, 0)[1]) for n in range(1, count + 1)]
        assert sum(b"Subject: submitted via" in t for t in tops) == 2
        assert any(b"Subject: appended in the worker" in t for t in tops)
    finally:
        pop.quit()
    with imaplib.IMAP4_SSL(HOST, server.ports["imaps"], ssl_context=ctx) as c:
        c.login(ALICE, PASSWORD)
        assert c.select("INBOX")[1] == [str(count).encode()]


def test_a_worker_killed_is_restarted_and_loses_nothing_it_acknowledged(own_server):
    srv = own_server
    first, worker = srv.process.pid, worker_pids(srv)[0]
    smtp = smtp_in_each(srv, [first, worker])
    smtp[first].close()
    sent = []
    for n in range(5):
        subject = f"before the kill {n}"
        smtp[worker].sendmail("sender@remote.example", [ALICE], message(subject))
        sent.append(subject)  # acknowledged: 250
    os.kill(worker, signal.SIGKILL)
    smtp[worker].close()
    wait_until(lambda: f"worker 1 (pid {worker}) was killed by SIGKILL; restarting it in"
               in srv.log_text(), message="the restart line")
    wait_until(lambda: [p for p in worker_pids(srv) if p != worker], timeout=60,
               message="the new worker")
    delivered = srv.wait_for_messages(ALICE, len(sent), timeout=60)
    assert sorted(subjects(delivered)) == sorted(sent), srv.log_text()
    new = [p for p in worker_pids(srv) if p != worker][0]
    for pid, conn in smtp_in_each(srv, [first, new]).items():  # the new worker serves
        conn.quit()


def test_sigterm_stops_every_process(own_server):
    srv = own_server
    pids = [srv.process.pid, *worker_pids(srv)]
    assert len(pids) == 2
    srv.stop()
    assert [p for p in pids if alive(p)] == []
    assert "worker 1 (pid %d) stopped" % pids[1] in srv.log_text()


def test_no_worker_outlives_a_first_process_killed_with_sigkill(own_server):
    srv = own_server
    worker = worker_pids(srv)[0]
    os.kill(srv.process.pid, signal.SIGKILL)
    srv.process.wait(10)
    wait_until(lambda: not alive(worker), timeout=30,
               message="the worker to end with its parent")


def test_by_default_the_workers_share_smtp_and_the_first_process_serves_imap(tmp_path):
    """[server] worker_listeners defaults to the SMTP listeners: every IMAP session is the
    first process's (one \\Recent, immediate notifications, TLS resumption)."""
    srv = MailServer(str(tmp_path), extra={"server": {"workers": 2}})
    srv.add_user(ALICE, PASSWORD)
    srv.start()
    try:
        wait_until(lambda: worker_pids(srv), timeout=60, message="the worker process")
        first, worker = srv.process.pid, worker_pids(srv)[0]
        pids = [first, worker]
        smtp = one_in_each(srv, "mx", pids, lambda: smtplib.SMTP(HOST, srv.ports["mx"],
                                                                   timeout=30),
                           lambda c: c.sock, lambda c: c.close())
        assert set(smtp) == {first, worker}
        for c in smtp.values():
            c.close()
        served = set()
        context = ssl.create_default_context(cafile=srv.cafile)
        context.check_hostname = False
        for _ in range(20):  # each greeted, so accepted by the process that serves it
            c = imaplib.IMAP4_SSL(HOST, srv.ports["imaps"], ssl_context=context, timeout=30)
            served.add(serving_pid(srv.ports["imaps"], c.sock, pids))
            c.logout()
        assert served == {first}
        assert f"[pid={worker} mailsuite.workers#info] serving imaps" not in srv.log_text()
    finally:
        srv.stop()


def test_a_worker_needs_no_access_to_the_tls_key_or_the_configuration_file(tmp_path):
    """twistd drops privileges after the first process read them: a root-only key (Let's
    Encrypt's) or configuration file must still reach the workers, which start later (and
    again after a crash). Here the files are gone instead (root reads any mode)."""
    from mailsuite.tls import create_self_signed

    own = tmp_path / "own-tls"
    own.mkdir()
    cert, key = str(own / "fullchain.pem"), str(own / "privkey.pem")
    create_self_signed("mx.test.example", cert, key)
    srv = MailServer(str(tmp_path / "server"), extra={
        "server": {"workers": 2}, "tls": {"cert": cert, "key": key}})
    srv.add_user(ALICE, PASSWORD)
    srv.start()
    try:
        wait_until(lambda: worker_pids(srv), timeout=60, message="the worker process")
        os.unlink(cert)
        os.unlink(key)
        os.rename(srv.config_path, srv.config_path + ".gone")
        old = worker_pids(srv)[0]
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: [p for p in worker_pids(srv) if p != old], timeout=60,
                   message="a new worker, started without the files")
        new = [p for p in worker_pids(srv) if p != old][0]
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        pids = [srv.process.pid, new]

        def submission() -> smtplib.SMTP:
            c = smtplib.SMTP(HOST, srv.ports["submission"], timeout=30)
            c.starttls(context=context)
            return c

        both = one_in_each(srv, "submission", pids, submission, lambda c: c.sock,
                           lambda c: c.close())
        for c in both.values():
            c.login(ALICE, PASSWORD)
            c.close()
        assert "Traceback" not in srv.log_text()
    finally:
        os.rename(srv.config_path + ".gone", srv.config_path)
        srv.stop()

"""`mailsuite trace` through the CLI's entry point (cli.main), on a SQLite directory whose
events an EventStore (playing the server's recorder) wrote."""
from __future__ import annotations

import time

import pytest

from mailsuite.admin import cli
from mailsuite.admin.trace_cmd import matching, parse_age
from mailsuite.admin.cli import CommandError
from mailsuite.directory import DirectoryStore
from mailsuite.events import EventStore
from tests.harness import write_toml

QID = "0190ab12cd34ef56"
DSN = "0190ab12cd34ff00"


def event(when: float, kind: str, address: str | None = None, message_id: str | None = None,
          queue_id: str = QID, **fields) -> dict:
    return {"time": when, "queue_id": queue_id, "kind": kind, "message_id": message_id,
            "address": address, "fields": fields}


@pytest.fixture
def db_url(tmp_path):
    """The default database; tests/scenario/test_events_postgresql.py uses PostgreSQL."""
    return "sqlite:///" + str(tmp_path / "data" / "mailsuite.db")


@pytest.fixture
def env(tmp_path, db_url):
    config_path = str(tmp_path / "mailsuite.toml")
    write_toml(config_path, {"server": {"data_dir": str(tmp_path / "data")},
                             "database": {"url": db_url}})
    store = DirectoryStore(db_url)
    store.prepare()
    now = time.time()
    t = now - 3 * 3600  # three hours ago
    EventStore(store).write([
        event(t, "received", "alice@a.test", "<m1@a.test>", **{"from": "alice@a.test"},
              client_ip="192.0.2.7", listener="submission", protocol="ESMTPSA",
              tls="TLSv1.3 TLS_AES_256_GCM_SHA384", auth_user="alice@a.test", size=321,
              nrcpt=2, verdicts={"disposition": "accept"}),
        event(t, "queued", "bob@a.test", to="bob@a.test", local=True),
        event(t, "queued", "later@far.test", to="later@far.test", local=False),
        event(t + 0.01, "sent", "bob@a.test", to="bob@a.test", relay="local", delay=0.01,
              attempts=1, maildir="/srv/mail/a.test/bob/new/1.M1Q0190N0.mx",
              detail="250 2.0.0 delivered to maildir as 1.M1Q0190N0.mx"),
        event(t + 1, "transaction", domain="far.test", relay="mx.far.test[192.0.2.9]:25",
              tls=False, reused=False, accepted=0, total=1),
        event(t + 1, "deferred", "later@far.test", to="later@far.test", relay="mx.far.test",
              delay=1.0, attempts=1, detail="451 4.2.0 greylisted, try again later"),
        event(t + 2, "received", "", "<dsn@a.test>", queue_id=DSN, **{"from": ""},
              listener="local", size=900, nrcpt=1),
        event(now - 60, "received", "carol@a.test", "<m2@a.test>", queue_id="0190ab12cd34ee00",
              **{"from": "carol@a.test"}),
    ], {})
    yield config_path, store
    store.close()


def run(env, capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["--config", env[0], "trace", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_trace_by_address_shows_the_whole_life_in_time_order(env, capsys):
    code, out, err = run(env, capsys, "later@far.test")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"{QID} message-id=<m1@a.test> from=<alice@a.test>"
    kinds = [line.split()[2] for line in lines[1:]]
    assert kinds == ["received", "queued", "queued", "sent", "transaction", "deferred"]
    assert ('received     client=192.0.2.7 listener=submission protocol=ESMTPSA '
            'tls="TLSv1.3 TLS_AES_256_GCM_SHA384" auth=alice@a.test size=321 nrcpt=2 '
            'verdicts="disposition=accept"') in lines[1]
    assert "maildir=/srv/mail/a.test/bob/new/1.M1Q0190N0.mx" in lines[4]
    assert "relay=mx.far.test[192.0.2.9]:25 tls=no reused=no accepted=0/1" in lines[5]
    assert lines[6].endswith('deferred     to=<later@far.test> relay=mx.far.test delay=1.0s '
                             'attempts=1 answer="451 4.2.0 greylisted, try again later"')


def test_trace_by_message_id_and_by_queue_id_find_the_same(env, capsys):
    by_address = run(env, capsys, "bob@a.test")[1]
    assert run(env, capsys, "<m1@a.test>")[1] == by_address
    assert run(env, capsys, QID)[1] == by_address
    # Without the angle brackets a Message-ID looks like an address: both are tried.
    assert run(env, capsys, "m1@a.test")[1] == by_address


def test_since_limits_the_messages_and_groups_are_separate(env, capsys):
    code, out, _ = run(env, capsys, "carol@a.test", "--since", "30m")
    assert code == 0 and out.startswith("0190ab12cd34ee00 message-id=<m2@a.test>")
    code, _, err = run(env, capsys, "alice@a.test", "--since", "2h")
    assert code == 1 and err.startswith("mailsuite: no recorded message matches alice@a.test "
                                        "in the last 2h")
    code, out, _ = run(env, capsys, "alice@a.test", "--since", "4h")
    assert code == 0 and out.count(QID) == 1


def test_bad_input_is_one_line(env, capsys):
    for args, text in [(("bob@a.test", "--since", "2 hours"), "--since '2 hours'"),
                       (("just-a-word",), "is not a queue id"),
                       (("bob@a.test", "--limit", "0"), "--limit")]:
        code, out, err = run(env, capsys, *args)
        assert code == 1 and out == "" and len(err.splitlines()) == 1 and text in err, err


def test_what_the_argument_is_taken_for():
    assert matching(QID) == {"queue_ids": [QID]}
    assert matching("<x@y>") == {"message_ids": ["<x@y>"]}
    assert matching("Bob@A.test") == {"addresses": ["Bob@A.test"],
                                      "message_ids": ["<Bob@A.test>"]}
    assert [parse_age(a) for a in ("45s", "30m", "2h", "3d", "1w")] == [
        45, 1800, 7200, 3 * 86400, 7 * 86400]
    with pytest.raises(CommandError):
        parse_age("2")

"""The configuration file: defaults that run out of the box, and one clear line for mistakes."""
import os

import pytest

from mailsuite import config
from mailsuite.mailbox.store import MailStore
from tests.harness import REPO_ROOT


def write(tmp_path, text):
    path = tmp_path / "mailsuite.toml"
    path.write_text(text)
    return str(path)


def test_defaults_are_unprivileged_loopback():
    c = config.Config()
    assert c.listen.mx == "tcp:2525:interface=127.0.0.1"
    assert c.listen.submission.startswith("tcp:2587:")
    assert c.listen.submissions.startswith("tcp:2465:")
    assert c.listen.imap.startswith("tcp:2143:") and c.listen.imaps.startswith("tcp:2993:")
    assert c.listen.pop3.startswith("tcp:2110:") and c.listen.pop3s.startswith("tcp:2995:")
    assert c.database_url.startswith("sqlite:///") and c.database_url.endswith("mailsuite-data/mailsuite.db")


def test_example_configuration_loads():
    c = config.load(os.path.join(REPO_ROOT, "etc", "mailsuite.toml"))
    assert c.server.hostname == "mail.example.org"
    assert c.listen.mx == "tcp:25" and c.listen.submission == "tcp:587"
    assert (MailStore(c.mail_dir).account("Alice@Example.ORG").path
            == "/var/lib/mailsuite/mail/example.org/alice")


def test_values_override_defaults(tmp_path):
    c = config.load(write(tmp_path, '[server]\nhostname = "mx.example.net"\n'
                                    '[limits]\nmax_recipients = 5\nauth_failure_delay = 2\n'))
    assert c.hostname == "mx.example.net"
    assert c.limits.max_recipients == 5
    assert c.limits.auth_failure_delay == 2.0
    assert c.limits.max_message_size == config.LimitsSection().max_message_size


@pytest.mark.parametrize("text, message", [
    ('[server]\nhostnme = "x"\n', "unknown key 'hostnme' in [server]"),
    ('[smpt]\nport = 25\n', "unknown section [smpt]"),
    ('[limits]\nmax_recipients = "many"\n', "limits.max_recipients must be of type int"),
    ('[limits]\nmax_recipients = true\n', "limits.max_recipients must be of type int"),
    ('[courier]\nnameservers = "127.0.0.1"\n', "courier.nameservers must be a list"),
    ('[server\n', "not valid TOML"),
])
def test_mistakes_are_one_line_naming_the_problem(tmp_path, text, message):
    with pytest.raises(config.ConfigError) as e:
        config.load(write(tmp_path, text))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(str(tmp_path / "nope.toml"))


@pytest.mark.parametrize("name", ["", " "])
def test_empty_file_name_is_refused(name):
    """`--config ''` is a mistake (an unset variable in a script), not "use the defaults"."""
    with pytest.raises(config.ConfigError, match="configuration file name is empty"):
        config.load(name)


@pytest.mark.parametrize("content, message", [
    (b"# " + b"x" * config.MAX_CONFIG_SIZE + b"\n", "larger than 1048576 octets"),
    (b'[server]\nhostname = "caf\xe9"\n', "not valid UTF-8"),
    (b"a = " + b"[" * 200_000 + b"]" * 200_000 + b"\n", "not valid TOML"),
    (b'[server]\nhostname = "a\\u0000b"\n', "server.hostname contains a NUL character"),
    (b'[limits]\nmax_recipients = "' + b"9" * 5000 + b'"\n', "must be of type int"),
], ids=["huge", "latin1", "nested", "nul", "long-value"])
def test_hostile_files_are_one_line(tmp_path, content, message):
    path = tmp_path / "mailsuite.toml"
    path.write_bytes(content)
    with pytest.raises(config.ConfigError) as e:
        config.load(str(path))
    assert message in str(e.value)
    assert "\n" not in str(e.value) and len(str(e.value)) < 500


def test_directory_device_and_fifo_are_one_line(tmp_path):
    with pytest.raises(config.ConfigError, match="is a directory"):
        config.load(str(tmp_path))
    with pytest.raises(config.ConfigError, match="is not a regular file"):
        config.load("/dev/zero")  # endless
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(config.ConfigError, match="is not a regular file"):
        config.load(str(fifo))  # opening it would wait for a writer forever

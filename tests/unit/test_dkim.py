"""DKIM keys (`mailsuite dkim generate`) and signing, verified with dkimpy."""
from __future__ import annotations

import os
import re
from types import SimpleNamespace

import dkim
import pytest

from mailsuite.admin.cli import main
from mailsuite.courier.dkim import Signer, generate, load_keys

MESSAGE = (b"Received: from client by mx\r\nFrom: \"Alice\" <alice@signed.test>\r\n"
           b"To: bob@remote.test\r\nSubject: hello\r\nDate: Sat, 28 Nov 2026 01:00:00 +0000\r\n"
           b"Message-ID: <1@signed.test>\r\n\r\nBody line  \r\n\r\n\r\n")


def dns_of(keys):
    records = {f"{k.selector}._domainkey.{k.domain}.".encode(): k.txt.encode() for k in keys}
    return lambda name, timeout=5: records.get(name if name.endswith(b".") else name + b".")


def test_generate_writes_keys_and_records(tmp_path):
    keys = generate(str(tmp_path), "Signed.Test", "mail", "both")
    assert [(k.selector, k.algorithm) for k in keys] == [("mail-ed", "ed25519"),
                                                         ("mail-rsa", "rsa")]
    for key in keys:
        assert os.stat(key.private_path).st_mode & 0o777 == 0o600
        assert open(key.private_path, "rb").read().startswith(b"-----BEGIN ")
        with open(os.path.join(tmp_path, "signed.test", key.selector + ".txt")) as f:
            assert f.read().strip() == key.txt
    assert keys[0].txt.startswith("v=DKIM1; k=ed25519; p=")
    assert keys[1].txt.startswith("v=DKIM1; k=rsa; p=")
    assert keys[1].zone_line.startswith('mail-rsa._domainkey.signed.test. IN TXT "v=DKIM1; k=rsa')
    with pytest.raises(FileExistsError):
        generate(str(tmp_path), "signed.test", "mail", "both")  # never replace a published key
    with pytest.raises(ValueError):
        generate(str(tmp_path), "not a domain", "mail", "rsa")
    assert [k.selector for k, _ in load_keys(str(tmp_path), "signed.test")] == ["mail-ed",
                                                                                "mail-rsa"]


def test_signer_signs_from_domain_and_verifies(tmp_path):
    keys = generate(str(tmp_path), "signed.test", "s", "both")
    signed = Signer(str(tmp_path)).sign(MESSAGE, "bounce-handler@other.test")
    assert signed.endswith(MESSAGE)
    assert signed.count(b"DKIM-Signature:") == 2
    for idx in range(2):
        assert dkim.DKIM(signed).verify(idx=idx, dnsfunc=dns_of(keys))
    unfolded = re.sub(rb"\r\n[ \t]+", b" ", signed)
    assert b"c=relaxed/relaxed" in unfolded
    signed_headers = re.search(rb"h=([^;]+);", unfolded).group(1).replace(b" ", b"")
    assert signed_headers.split(b":") == [
        b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to", b"mime-version",
        b"content-type", b"in-reply-to", b"references"]
    # An absent header is signed as absent: adding a Cc in transit breaks the signature.
    assert not dkim.verify(signed.replace(b"Subject: hello", b"Cc: x@evil.test\r\nSubject: hello"),
                           dnsfunc=dns_of(keys))
    assert not dkim.verify(signed.replace(b"Subject: hello", b"Subject: HELLO"),
                           dnsfunc=dns_of(keys))


def test_no_key_means_unchanged_and_envelope_domain_fallback(tmp_path):
    signer = Signer(str(tmp_path))
    assert signer.sign(MESSAGE, "alice@signed.test") == MESSAGE
    keys = generate(str(tmp_path), "envelope.test", "e", "rsa")
    signed = signer.sign(MESSAGE, "list-bounces@envelope.test")
    assert b"d=envelope.test" in signed
    assert dkim.verify(signed, dnsfunc=dns_of(keys))


def test_admin_command(tmp_path, capsys):
    config = tmp_path / "m.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path}/data"\n')
    def run(*args: str) -> SimpleNamespace:
        """The admin command line, in this process: exit code, stdout, stderr."""
        capsys.readouterr()
        code = main(["--config", str(config), "dkim", *args])
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    out = run("generate", "example.net", "--algorithm", "ed25519")
    assert out.returncode == 0, out.stderr
    assert re.search(r'^mail\._domainkey\.example\.net\. IN TXT "v=DKIM1; k=ed25519; p=\S+"$',
                     out.stdout, re.M)
    assert os.path.exists(tmp_path / "data" / "dkim" / "example.net" / "mail.private")
    assert run("show", "example.net").stdout.startswith("mail._domainkey.example.net.")
    again = run("generate", "example.net", "--algorithm", "ed25519")
    assert again.returncode == 1 and "exists" in again.stderr
    assert "Traceback" not in again.stderr  # one line, as every admin refusal

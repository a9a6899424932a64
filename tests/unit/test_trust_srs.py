"""SRS (mailsuite.trust.srs): forwarded senders rewritten, bounces reversed, forgeries refused."""
from __future__ import annotations

import os

import pytest

from mailsuite.trust.srs import SRS, SRSError, load_or_create_secret

DAY = 86400.0


def make(now=1_800_000_000.0, domain="fwd.example", secret=b"k" * 64, max_age=21):
    clock = [now]
    return SRS(secret, domain, max_age, now=lambda: clock[0]), clock


def test_forward_then_reverse_gives_the_original_sender():
    srs, _ = make()
    rewritten = srs.forward("Carol.Smith@Remote.Example")
    local, _, domain = rewritten.rpartition("@")
    assert domain == "fwd.example" and local.startswith("SRS0=")
    assert srs.is_srs(rewritten)
    assert srs.reverse(rewritten) == "Carol.Smith@Remote.Example"
    # A receiver that lower-cases the local part does not break it.
    assert srs.reverse(rewritten.lower()).lower() == "carol.smith@remote.example"


@pytest.mark.parametrize("sender", ["", "alice@fwd.example", "ALICE@FWD.example"])
def test_null_and_own_senders_are_not_rewritten(sender):
    srs, _ = make()
    assert srs.forward(sender) == sender


def test_a_forged_hash_is_refused():
    srs, _ = make()
    rewritten = srs.forward("carol@remote.example")
    local, _, domain = rewritten.rpartition("@")
    parts = local.split("=")
    parts[1] = "aaaaaa" if parts[1] != "aaaaaa" else "bbbbbb"
    with pytest.raises(SRSError):
        srs.reverse("=".join(parts) + "@" + domain)
    other, _ = make(secret=b"another secret" * 4)
    with pytest.raises(SRSError):
        other.reverse(rewritten)  # made with another secret


def test_an_address_to_another_target_is_refused():
    """The hash covers the original address: changing it (to relay elsewhere) fails."""
    srs, _ = make()
    local, _, domain = srs.forward("carol@remote.example").rpartition("@")
    with pytest.raises(SRSError):
        srs.reverse(local.replace("remote.example", "victim.example") + "@" + domain)


def test_expiry_after_max_age_days():
    srs, clock = make(max_age=21)
    rewritten = srs.forward("carol@remote.example")
    clock[0] += 21 * DAY
    assert srs.reverse(rewritten) == "carol@remote.example"
    clock[0] += 1 * DAY
    with pytest.raises(SRSError, match="expired"):
        srs.reverse(rewritten)


@pytest.mark.parametrize("address", [
    "SRS0=@fwd.example", "SRS0=abc@fwd.example", "SRS0====@fwd.example",
    "SRS1=x@fwd.example", "SRS1=abcdef=@fwd.example", "plain@fwd.example",
    "SRS0=aaaaaa=zz=remote.example=carol@other.example",
])
def test_malformed_addresses_are_refused(address):
    srs, _ = make()
    with pytest.raises(SRSError):
        srs.reverse(address)


def test_someone_elses_srs0_becomes_srs1_and_reverses_to_them():
    first, _ = make(domain="first.example", secret=b"first" * 10)
    ours, _ = make(domain="fwd.example")
    theirs = first.forward("carol@remote.example")
    rewritten = ours.forward(theirs)
    assert rewritten.startswith("SRS1=") and rewritten.endswith("@fwd.example")
    back = ours.reverse(rewritten)
    assert back.endswith("@first.example") and back.startswith("SRS0=")
    assert first.reverse(back) == "carol@remote.example"
    # A third forwarder keeps the first one's domain.
    third, _ = make(domain="third.example", secret=b"third" * 10)
    again = third.forward(rewritten)
    assert "=first.example==" in again
    assert third.reverse(again) == back.replace(back.rpartition("@")[2], "first.example")


def test_secret_is_created_once_and_private(tmp_path):
    secret = load_or_create_secret(str(tmp_path))
    assert len(secret) >= 32
    assert os.stat(tmp_path / "srs.key").st_mode & 0o777 == 0o600
    assert load_or_create_secret(str(tmp_path)) == secret

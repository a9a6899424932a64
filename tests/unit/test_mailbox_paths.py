"""Every write of the store stays under mail_dir, symlinks or not (docs/design/maildir.md,
"Paths"), and environment faults come out as the typed, temporary StoreUnavailable."""
from __future__ import annotations

import errno
import os

import pytest

from mailsuite.mailbox import maildir as maildir_module
from mailsuite.mailbox.store import (MailboxError, MailStore, StoreUnavailable, UnsafePath)

HEADER = b"Return-Path: <carol@remote.example>\r\n"
BODY = b"Subject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def store(tmp_path):
    os.makedirs(tmp_path / "mail")
    return MailStore(str(tmp_path / "mail"))


@pytest.fixture
def elsewhere(tmp_path):
    path = tmp_path / "elsewhere"
    os.makedirs(path)
    return path


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "m.eml"
    path.write_bytes(BODY)
    return str(path)


def everything_under(path) -> list[str]:
    return [os.path.join(d, n) for d, dirs, files in os.walk(path) for n in dirs + files]


def test_symlinked_domain_dir_is_refused(store, elsewhere, src):
    os.symlink(elsewhere, os.path.join(store.mail_dir, "example.org"))
    account = store.account("alice@example.org")
    with pytest.raises(UnsafePath):
        account.deliver_once(HEADER, src, when=1.0, unique="Qabc1N0")
    with pytest.raises(UnsafePath):
        account.deliver(HEADER, data=BODY)
    with pytest.raises(UnsafePath):
        account.ensure_layout()
    with pytest.raises(UnsafePath):
        account.folder("INBOX")
    with pytest.raises(UnsafePath):
        account.subscribe("Sent")
    with pytest.raises(UnsafePath):
        account.lock_maildrop()
    assert everything_under(elsewhere) == []


def test_symlinked_user_dir_is_refused(store, elsewhere, src):
    os.makedirs(os.path.join(store.mail_dir, "example.org"))
    os.symlink(elsewhere, os.path.join(store.mail_dir, "example.org", "alice"))
    with pytest.raises(UnsafePath):
        store.account("alice@example.org").deliver_once(HEADER, src, when=1.0, unique="Qa1N0")
    assert everything_under(elsewhere) == []


@pytest.mark.parametrize("sub", ["new", "tmp", "cur"])
def test_symlinked_maildir_subdir_is_refused(store, elsewhere, src, sub):
    account = store.account("alice@example.org")
    maildir_module.make_maildir(account.path)
    os.rmdir(os.path.join(account.path, sub))
    os.symlink(elsewhere, os.path.join(account.path, sub))
    with pytest.raises(UnsafePath):
        account.deliver_once(HEADER, src, when=1.0, unique="Qa1N0")
    with pytest.raises(UnsafePath):
        account.folder("INBOX")
    assert everything_under(elsewhere) == []


def test_symlinked_folder_is_refused_for_every_write(store, elsewhere):
    account = store.account("alice@example.org")
    account.ensure_layout()
    inbox = account.folder("INBOX")
    uid = inbox.append(BODY)
    os.symlink(elsewhere, os.path.join(account.path, ".Evil"))
    with pytest.raises(MailboxError):
        account.create_folder("Evil")
    with pytest.raises(UnsafePath):
        account.folder("Evil")
    with pytest.raises(UnsafePath):
        account.rename_folder("Evil", "Other")
    with pytest.raises(UnsafePath):
        account.delete_folder("Evil")
    sent = account.folder("Sent")
    os.rename(os.path.join(account.path, ".Sent"), os.path.join(account.path, ".Sent-real"))
    os.symlink(elsewhere, os.path.join(account.path, ".Sent"))
    with pytest.raises(UnsafePath):
        account.folder("Sent")
    with pytest.raises(UnsafePath):
        account.rename_folder("Sent", "Sent2")
    assert everything_under(elsewhere) == []
    assert sent is not None and uid == 1


@pytest.mark.parametrize("name", [maildir_module.UIDLIST, maildir_module.INDEX,
                                  maildir_module.KEYWORDS, "subscriptions"])
def test_symlinked_index_files_are_not_followed(store, tmp_path, name):
    """dovecot-uidlist, mailsuite-index, dovecot-keywords or subscriptions replaced by a
    symlink: appends refuse it (O_NOFOLLOW), rewrites replace the link; the target is never
    written."""
    account = store.account("alice@example.org")
    account.ensure_layout()
    inbox = account.folder("INBOX")
    inbox.append(BODY)
    inbox.append(BODY)
    target = tmp_path / "victim"
    target.write_bytes(b"")
    path = os.path.join(account.path, name)
    if os.path.exists(path):
        os.unlink(path)
    os.symlink(target, path)
    fresh = MailStore(store.mail_dir).account("alice@example.org")
    folder = fresh.folder("INBOX")
    try:
        uid = folder.append(BODY, flags=["$Label1"])
        folder.sync()
        folder.add_flags(uid, ["$Label2"])
        fresh.subscribe("Archive")
    except MailboxError:
        pass  # refusing is fine too; writing through the link is not
    assert target.read_bytes() == b""


def test_a_symlinked_mail_dir_itself_is_fine(tmp_path, src):
    real = tmp_path / "srv-mail"
    os.makedirs(real)
    os.symlink(real, tmp_path / "mail")
    store = MailStore(str(tmp_path / "mail"))
    path, written = store.account("alice@example.org").deliver_once(
        HEADER, src, when=1.0, unique="Qa1N0")
    assert written and os.path.realpath(path).startswith(str(real))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EMFILE])
def test_environment_faults_are_store_unavailable(store, monkeypatch, code):
    account = store.account("alice@example.org")
    account.ensure_layout()
    inbox = account.folder("INBOX")

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(StoreUnavailable) as caught:
        inbox.append(BODY)
    e = caught.value
    assert isinstance(e, MailboxError) and isinstance(e, OSError)
    assert e.errno == code
    assert str(e) == f"mail storage temporarily unavailable: {os.strerror(code)}"
    assert store.mail_dir not in str(e)  # fit for a client
    with pytest.raises(StoreUnavailable):
        account.subscribe("Other")
    monkeypatch.undo()
    assert [m.uid for m in inbox.sync()] == []  # nothing half-stored


def test_folder_replaced_by_a_symlink_during_a_session(store, elsewhere):
    """A Folder object opened before the swap still refuses to write through it."""
    account = store.account("alice@example.org")
    account.ensure_layout()
    inbox = account.folder("INBOX")
    sent = account.folder("Sent")
    uid = inbox.append(BODY)
    real = os.path.join(account.path, ".Sent")
    os.rename(real, real + "-moved")
    os.symlink(elsewhere, real)
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(elsewhere, sub))
    with pytest.raises(UnsafePath):
        sent.append(BODY)
    with pytest.raises(UnsafePath):
        inbox.copy([uid], sent)
    with pytest.raises(UnsafePath):
        inbox.move([uid], sent)
    with pytest.raises(UnsafePath):
        sent.expunge()
    assert sorted(everything_under(elsewhere)) == sorted(
        os.path.join(elsewhere, sub) for sub in ("cur", "new", "tmp"))


def test_a_plain_path_is_proven_without_realpath_a_link_inside_mail_dir_with_it(
        store, monkeypatch):
    """The usual path (no link below mail_dir) costs an lstat per component below mail_dir,
    not a realpath from `/`; a link that stays inside mail_dir still passes, through realpath."""
    account = store.account("alice@example.org")
    account.ensure_layout()
    resolved = []
    real_realpath = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p: resolved.append(p) or real_realpath(p))
    store.prove(account.path, maildir_module.SUBDIRS)
    store.prove(os.path.join(account.path, ".Sent"), maildir_module.SUBDIRS)
    store.prove(os.path.join(store.mail_dir, "example.org", "nobody-yet"))
    assert resolved == []
    os.symlink(os.path.join(store.mail_dir, "example.org"), os.path.join(store.mail_dir, "alias"))
    store.prove(os.path.join(store.mail_dir, "alias", "alice"), maildir_module.SUBDIRS)
    assert resolved == [os.path.join(store.mail_dir, "alias", "alice")]
    with pytest.raises(UnsafePath):
        store.prove(os.path.join(store.mail_dir, "example.org", "..", "..", "x"))

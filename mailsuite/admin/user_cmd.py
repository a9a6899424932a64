"""`mailsuite user add|list|remove|passwd|disable|enable|sender`: mail accounts.

Passwords are prompted twice on the terminal (a mismatch is refused), or read from standard input
with `--password-stdin` (for scripts: `echo "$pw" | mailsuite user add ...`): exactly one line,
UTF-8, at most 1024 octets, with or without its line end; anything else is refused, never cut.

`user sender add|remove|list` manages the extra addresses a user may send as (a shared mailbox's
address, or `@domain`), besides its own and its aliases (docs/design/directory.md).

`passwd`, `disable` and `remove` tell the running instances at once through the database
(PostgreSQL NOTIFY, mailsuite/notify.py): they forget the account's cached logins and, for
`disable` and `remove`, end its open IMAP and POP3 sessions. The change itself is committed
first; a notification that cannot be sent is one warning line, not a failure.
"""
from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any

from mailsuite.admin.cli import CommandError
from mailsuite.admin.domain_cmd import directory_command
from mailsuite.directory import DirectoryStore
from mailsuite.directory.records import DirectoryError
from mailsuite.directory.store import MAX_HASH, MAX_PASSWORD
from mailsuite.notify import notify_directory_change


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("user", help="mail accounts")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("add", help="create an account in a hosted domain")
    p.add_argument("address")
    _password_option(p)
    p.set_defaults(func=cmd_add)

    p = actions.add_parser("list", help="accounts, one per line (disabled ones marked)")
    p.add_argument("domain", nargs="?")
    p.set_defaults(func=cmd_list)

    p = actions.add_parser("remove", help="delete an account (its Maildir is kept)")
    p.add_argument("address")
    p.set_defaults(func=cmd_remove)

    p = actions.add_parser("passwd", help="set a new password")
    p.add_argument("address")
    _password_option(p)
    p.set_defaults(func=cmd_passwd)

    p = actions.add_parser("disable", help="refuse logins (mail is still accepted)")
    p.add_argument("address")
    p.set_defaults(func=cmd_disable)

    p = actions.add_parser("enable", help="allow logins again")
    p.add_argument("address")
    p.set_defaults(func=cmd_enable)

    sender = actions.add_parser("sender", help="extra addresses a user may send as")
    sender_actions = sender.add_subparsers(dest="sender_action", metavar="ACTION")
    sender_actions.required = True
    p = sender_actions.add_parser("add", help="let USER send as ADDRESS (or any @domain address)")
    p.add_argument("user")
    p.add_argument("address", metavar="ADDRESS|@DOMAIN")
    p.set_defaults(func=cmd_sender_add)
    p = sender_actions.add_parser("remove", help="withdraw an extra sender address")
    p.add_argument("user")
    p.add_argument("address", metavar="ADDRESS|@DOMAIN")
    p.set_defaults(func=cmd_sender_remove)
    p = sender_actions.add_parser("list", help="extra sender addresses (of one user)")
    p.add_argument("user", nargs="?")
    p.set_defaults(func=cmd_sender_list)


def _password_option(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--password-stdin", action="store_true",
                        help="read the password as one line from standard input instead of "
                             "prompting")
    source.add_argument("--hash-stdin", action="store_true",
                        help="read an existing password hash from standard input (import from "
                             "Dovecot: {SHA512-CRYPT}$6$..., {BLF-CRYPT}, {SSHA512}, "
                             "{ARGON2ID}...; rehashed to argon2id at the first login)")


def read_hash() -> str:
    password_hash = read_stdin_line("password hash", MAX_HASH).strip()
    if not password_hash:
        raise CommandError("empty password hash refused")
    return password_hash


def read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = read_stdin_line("password", MAX_PASSWORD)
    else:
        if not _has_terminal():
            # getpass would fall back to standard input with a warning on stderr.
            raise CommandError("no terminal to ask for the password on: give it with "
                               "--password-stdin")
        try:
            password = getpass.getpass("Password: ")
            again = getpass.getpass("Password (again): ")
        except EOFError:
            raise CommandError("no password given")
        except UnicodeDecodeError:
            raise CommandError("the password typed is not valid UTF-8")
        if password != again:
            raise CommandError("passwords do not match")
    if not password:
        raise CommandError("empty password refused")
    return password


def read_stdin_line(what: str, limit: int) -> str:
    """Standard input as exactly one line of at most `limit` UTF-8 octets, its line end (LF or
    CRLF) optional. More lines, more octets or other bytes are refused, never silently cut: a
    script that pipes a file in by mistake must not set its first line as a password."""
    data = _read_stdin(limit + 3)  # the line, CRLF, and one octet that proves there is more
    line, newline, rest = data.partition(b"\n")
    if newline and line.endswith(b"\r"):
        line = line[:-1]
    if len(line) > limit:
        raise CommandError(f"{what} longer than {limit} octets refused")
    if rest:
        raise CommandError(f"standard input holds more than one line: give the {what} alone on "
                           "one line")
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError(f"the {what} on standard input is not valid UTF-8")


def _has_terminal() -> bool:
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


def _read_stdin(size: int) -> bytes:
    stream = sys.stdin
    if stream is None:
        raise CommandError("standard input is closed")
    try:
        binary = getattr(stream, "buffer", None)
        if stream.isatty():
            # Typed at a terminal: one line is all there will be (no end of file to wait for).
            text = binary.readline(size) if binary is not None else stream.readline(size)
        else:
            text = binary.read(size) if binary is not None else stream.read(size)
    except (OSError, ValueError) as e:
        raise CommandError(f"cannot read standard input: {getattr(e, 'strerror', None) or e}")
    except UnicodeDecodeError:  # a text stream without a binary buffer
        raise CommandError("standard input is not valid UTF-8")
    if isinstance(text, str):
        return text.encode("utf-8", "surrogateescape")
    return text


@directory_command
def cmd_add(store: DirectoryStore, args: argparse.Namespace) -> int:
    # Validate before prompting: nobody should type a password twice for a typo'd domain.
    store.check_new_user(args.address)
    if args.hash_stdin:
        address = store.add_user(args.address, password_hash=read_hash())
    else:
        address = store.add_user(args.address, read_password(args))
    print(f"added user {address}")
    return 0


@directory_command
def cmd_list(store: DirectoryStore, args: argparse.Namespace) -> int:
    for user in store.list_users(args.domain):
        print(user.address if user.enabled else f"{user.address}\tdisabled")
    return 0


@directory_command
def cmd_remove(store: DirectoryStore, args: argparse.Namespace) -> int:
    address = store.remove_user(args.address)
    print(f"removed user {address}; its Maildir on disk was kept")
    _tell_instances(store, "remove", address)
    return 0


@directory_command
def cmd_passwd(store: DirectoryStore, args: argparse.Namespace) -> int:
    store.require_user(args.address)  # before prompting, as for add
    if args.hash_stdin:
        address = store.set_password_hash(args.address, read_hash())
    else:
        address = store.set_password(args.address, read_password(args))
    print(f"changed the password of {address}")
    _tell_instances(store, "passwd", address)
    return 0


@directory_command
def cmd_disable(store: DirectoryStore, args: argparse.Namespace) -> int:
    address = store.set_enabled(args.address, False)
    print(f"disabled logins of {address}")
    _tell_instances(store, "disable", address)
    return 0


def _tell_instances(store: DirectoryStore, action: str, address: str) -> None:
    try:
        notify_directory_change(store, action, address)
    except DirectoryError as e:
        # Done in the database all the same: new logins everywhere already see it.
        print(f"warning: running instances not told at once: {e}", file=sys.stderr)


@directory_command
def cmd_enable(store: DirectoryStore, args: argparse.Namespace) -> int:
    address = store.set_enabled(args.address, True)
    print(f"enabled logins of {address}")
    return 0


@directory_command
def cmd_sender_add(store: DirectoryStore, args: argparse.Namespace) -> int:
    user, address = store.add_sender(args.user, args.address)
    print(f"{user} may now send as {address}")
    return 0


@directory_command
def cmd_sender_remove(store: DirectoryStore, args: argparse.Namespace) -> int:
    user, address = store.remove_sender(args.user, args.address)
    print(f"{user} may no longer send as {address}")
    return 0


@directory_command
def cmd_sender_list(store: DirectoryStore, args: argparse.Namespace) -> int:
    for user, address in store.list_senders(args.user):
        print(f"{user}\t{address}")
    return 0

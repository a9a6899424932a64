"""`mailsuite user add|list|remove|passwd|disable|enable`: mail accounts.

Passwords are prompted twice on the terminal (a mismatch is refused), or read as one line from
standard input with `--password-stdin` (for scripts: `echo "$pw" | mailsuite user add ...`).
"""
from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from mailsuite.admin.cli import CommandError
from mailsuite.admin.domain_cmd import directory_command
from mailsuite.directory import DirectoryStore


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
    password_hash = sys.stdin.readline().strip()
    if not password_hash:
        raise CommandError("empty password hash refused")
    return password_hash


def read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        password = password[:-1] if password.endswith("\r") else password
    else:
        try:
            password = getpass.getpass("Password: ")
            again = getpass.getpass("Password (again): ")
        except EOFError:
            raise CommandError("no password given")
        if password != again:
            raise CommandError("passwords do not match")
    if not password:
        raise CommandError("empty password refused")
    return password


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
    return 0


@directory_command
def cmd_passwd(store: DirectoryStore, args: argparse.Namespace) -> int:
    store.require_user(args.address)  # before prompting, as for add
    if args.hash_stdin:
        address = store.set_password_hash(args.address, read_hash())
    else:
        address = store.set_password(args.address, read_password(args))
    print(f"changed the password of {address}")
    return 0


@directory_command
def cmd_disable(store: DirectoryStore, args: argparse.Namespace) -> int:
    address = store.set_enabled(args.address, False)
    print(f"disabled logins of {address}")
    return 0


@directory_command
def cmd_enable(store: DirectoryStore, args: argparse.Namespace) -> int:
    address = store.set_enabled(args.address, True)
    print(f"enabled logins of {address}")
    return 0

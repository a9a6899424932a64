"""`mailsuite admin add|passwd|delete|list`: who may log in to the admin web dashboard.

Dashboard administrators are not mail users (docs/design/admin-web.md, "Accounts"): they have
no mailbox, and a mail user's password never opens the dashboard. Passwords are read as for
`mailsuite user` (prompted twice, or one line with `--password-stdin`) and stored as argon2id.
A `passwd` or `delete` ends the admin's open dashboard sessions at their next request.
"""
from __future__ import annotations

import argparse
from typing import Any

from mailsuite.admin.domain_cmd import directory_command
from mailsuite.admin.user_cmd import read_password
from mailsuite.directory import DirectoryStore
from mailsuite.directory.admins import AdminStore, hash_new_password


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("admin", help="accounts of the admin web dashboard")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("add", help="create a dashboard administrator")
    p.add_argument("name")
    _password_option(p)
    p.set_defaults(func=cmd_add)

    p = actions.add_parser("passwd", help="set a new password (ends the admin's sessions)")
    p.add_argument("name")
    _password_option(p)
    p.set_defaults(func=cmd_passwd)

    p = actions.add_parser("delete", help="remove an administrator (ends its sessions)")
    p.add_argument("name")
    p.set_defaults(func=cmd_delete)

    p = actions.add_parser("list", help="administrators, one per line")
    p.set_defaults(func=cmd_list)


def _password_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password as one line from standard input instead of prompting")


@directory_command
def cmd_add(store: DirectoryStore, args: argparse.Namespace) -> int:
    admins = AdminStore(store)
    name = admins.check_new(args.name)  # before prompting, as for `user add`
    name = admins.add(name, hash_new_password(read_password(args)))
    print(f"added admin {name}")
    return 0


@directory_command
def cmd_passwd(store: DirectoryStore, args: argparse.Namespace) -> int:
    admins = AdminStore(store)
    name = admins.require(args.name)
    admins.set_password_hash(name, hash_new_password(read_password(args)))
    print(f"changed the password of admin {name}")
    return 0


@directory_command
def cmd_delete(store: DirectoryStore, args: argparse.Namespace) -> int:
    name = AdminStore(store).remove(args.name)
    print(f"deleted admin {name}")
    return 0


@directory_command
def cmd_list(store: DirectoryStore, args: argparse.Namespace) -> int:
    for admin in AdminStore(store).list():
        print(admin.name)
    return 0

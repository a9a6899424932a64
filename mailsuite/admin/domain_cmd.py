"""`mailsuite domain add|list|remove NAME [--force]`: the domains this server hosts.

The directory commands (domain, user, alias) open the database through `DirectoryStore` directly:
they run as a separate process, and a running server sees every change at its next look-up
because the directory caches nothing.
"""
from __future__ import annotations

import argparse
import functools
from typing import Any, Callable

from mailsuite.directory import DirectoryError, DirectoryStore

# Refusals the dispatcher reports as one line (also for the user and alias areas).
ERRORS = (DirectoryError,)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("domain", help="hosted domains")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("add", help="host a new domain")
    p.add_argument("name")
    p.set_defaults(func=cmd_add)

    p = actions.add_parser("list", help="hosted domains, one per line")
    p.set_defaults(func=cmd_list)

    p = actions.add_parser("remove", help="stop hosting a domain (mail on disk is kept)")
    p.add_argument("name")
    p.add_argument("--force", action="store_true",
                   help="also remove the domain's users and aliases")
    p.set_defaults(func=cmd_remove)


# -- shared by the directory commands (domain, user, alias) -------------------------------------
def directory_command(fn: Callable[[DirectoryStore, argparse.Namespace], int | None]
                      ) -> Callable[[Any, argparse.Namespace], int]:
    """Give `fn` an open, prepared DirectoryStore (closed afterwards)."""
    @functools.wraps(fn)
    def wrapper(config: Any, args: argparse.Namespace) -> int:
        store = DirectoryStore.from_config(config)  # refuses a SQLite URL under a typo
        try:
            store.prepare()  # the CLI may run before the server ever started
            return fn(store, args) or 0
        finally:
            store.close()

    return wrapper


# -- commands ------------------------------------------------------------------------------------
@directory_command
def cmd_add(store: DirectoryStore, args: argparse.Namespace) -> int:
    name = store.add_domain(args.name)
    print(f"added domain {name}")
    return 0


@directory_command
def cmd_list(store: DirectoryStore, args: argparse.Namespace) -> int:
    # Exactly one name per line and nothing else: scripts parse this.
    for domain in store.list_domains():
        print(domain.name)
    return 0


@directory_command
def cmd_remove(store: DirectoryStore, args: argparse.Namespace) -> int:
    users, aliases = store.remove_domain(args.name, force=args.force)
    detail = f" with {users} user(s) and {aliases} alias(es)" if users or aliases else ""
    print(f"removed domain {args.name.strip().lower()}{detail}; Maildirs on disk were kept")
    return 0

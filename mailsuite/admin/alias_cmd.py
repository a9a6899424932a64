"""`mailsuite alias add|list|remove`: forwarding addresses.

    mailsuite alias add sales@example.org alice@example.org bob@partner.example
    mailsuite alias add @example.org alice@example.org      # catch-all for example.org
    mailsuite alias list [DOMAIN]                           # "source -> target, target"
    mailsuite alias remove sales@example.org [TARGET...]    # no TARGET: the whole alias

Sources must be in a hosted domain; targets may be local or remote. Routing rules (catch-all
only when nothing else matches, +tags, nesting, cycles) are in mailsuite/directory/routing.py.
"""
from __future__ import annotations

import argparse
from typing import Any

from mailsuite.admin.domain_cmd import directory_command
from mailsuite.directory import DirectoryStore


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("alias", help="forwarding addresses and catch-alls")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("add", help="forward SOURCE (an address or @domain) to TARGET(s)")
    p.add_argument("source")
    p.add_argument("targets", nargs="+", metavar="TARGET")
    p.set_defaults(func=cmd_add)

    p = actions.add_parser("list", help="aliases, one source per line")
    p.add_argument("domain", nargs="?")
    p.set_defaults(func=cmd_list)

    p = actions.add_parser("remove", help="remove some targets of SOURCE, or all of them")
    p.add_argument("source")
    p.add_argument("targets", nargs="*", metavar="TARGET")
    p.set_defaults(func=cmd_remove)


@directory_command
def cmd_add(store: DirectoryStore, args: argparse.Namespace) -> int:
    alias = store.add_alias(args.source, args.targets)
    print(f"added alias {alias.source} -> {', '.join(alias.targets)}")
    return 0


@directory_command
def cmd_list(store: DirectoryStore, args: argparse.Namespace) -> int:
    for alias in store.list_aliases(args.domain):
        print(f"{alias.source} -> {', '.join(alias.targets)}")
    return 0


@directory_command
def cmd_remove(store: DirectoryStore, args: argparse.Namespace) -> int:
    removed = store.remove_alias(args.source, args.targets)
    print(f"removed {removed} target(s) of alias {args.source.strip().lower()}")
    return 0

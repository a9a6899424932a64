"""`mailsuite dkim generate|show`: DKIM keys for outbound signing.

`generate DOMAIN [--selector S] [--algorithm ed25519|rsa|both]` writes
<data_dir>/dkim/<domain>/<selector>.private (0600) and <selector>.txt and prints the TXT record to
publish. With `both` (the default) the selectors are <S>-ed and <S>-rsa: RSA for receivers that do
not verify Ed25519 yet (RFC 8463), Ed25519 for those that do.
"""
from __future__ import annotations

import argparse

from mailsuite.admin.cli import CommandError
from mailsuite.config import Config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("dkim", help="DKIM signing keys")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    gen = actions.add_parser("generate", help="create a key and print the DNS record to publish")
    gen.add_argument("domain")
    gen.add_argument("--selector", default=None, help="default: [dkim] selector (\"mail\")")
    gen.add_argument("--algorithm", choices=["ed25519", "rsa", "both"], default="both")
    gen.add_argument("--force", action="store_true",
                     help="replace an existing key of the same selector")
    gen.set_defaults(func=generate)

    show = actions.add_parser("show", help="print the DNS records of a domain's keys")
    show.add_argument("domain")
    show.set_defaults(func=show_records)


def generate(config: Config, args: argparse.Namespace) -> int:
    from mailsuite.courier import dkim

    selector = args.selector or config.dkim.selector
    try:
        keys = dkim.generate(config.dkim_dir, args.domain, selector, args.algorithm,
                             overwrite=args.force)
    except (ValueError, FileExistsError) as e:
        raise CommandError(str(e))
    except OSError as e:
        raise CommandError(f"cannot write the key: {e}")
    for key in keys:
        print(f"created {key.algorithm} key {key.private_path}")
    print("\nPublish this in the DNS zone of " + keys[0].domain + ":\n")
    for key in keys:
        print(key.zone_line)
    if not config.dkim.sign:
        print("\nNote: [dkim] sign = false in the configuration, so mail is not signed yet.")
    return 0


def show_records(config: Config, args: argparse.Namespace) -> int:
    from mailsuite.courier import dkim

    from mailsuite.directory import DirectoryError
    from mailsuite.directory.addresses import normalize_domain

    try:
        domain = normalize_domain(args.domain)  # a directory name under dkim_dir: no ../
    except DirectoryError as e:
        raise CommandError(str(e))
    keys = dkim.load_keys(config.dkim_dir, domain)
    if not keys:
        raise CommandError(f"no DKIM key for {args.domain}; create one with "
                           f"`mailsuite dkim generate {args.domain}`")
    for key, _ in keys:
        print(key.zone_line)
    return 0

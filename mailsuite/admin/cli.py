"""`mailsuite [--config FILE] <area> <action> ...`: the admin command line.

Each area lives in its own module (`mailsuite/admin/<area>_cmd.py`) exposing
`register(subparsers)`, which adds its sub-commands with `set_defaults(func=...)`; a command
function takes (config, args) and returns the exit status. Errors are one line on stderr and a
non-zero exit: raise `CommandError`, or an exception class the module lists in `ERRORS` (e.g. the
directory's or the spool's own refusals).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from mailsuite import config as config_module

AREAS = ["domain_cmd", "user_cmd", "alias_cmd", "queue_cmd", "dkim_cmd", "dns_cmd"]


class CommandError(Exception):
    """A refusal to report as one line and exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    return _build()[0]


def _build() -> tuple[argparse.ArgumentParser, tuple[type[BaseException], ...]]:
    parser = argparse.ArgumentParser(prog="mailsuite", description="Administer a mailsuite server.")
    parser.add_argument("--config", "-c", default=None,
                        help="TOML configuration file (default: built-in defaults, ./mailsuite-data)")
    subparsers = parser.add_subparsers(dest="area", metavar="AREA")
    subparsers.required = True
    errors: list[type[BaseException]] = [CommandError, config_module.ConfigError]
    for name in AREAS:
        try:
            module = importlib.import_module(f"mailsuite.admin.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"mailsuite.admin.{name}":
                raise
            continue  # that area is not built yet
        module.register(subparsers)
        errors.extend(getattr(module, "ERRORS", ()))
    return parser, tuple(errors)


def main(argv: list[str] | None = None) -> int:
    parser, errors = _build()
    args = parser.parse_args(argv)
    try:
        config = config_module.load(args.config)
        return args.func(config, args) or 0
    except errors as e:
        sys.stderr.write(f"mailsuite: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mailsuite queue list | head`
        return 0


if __name__ == "__main__":
    # Run the copy of this module that the area modules import (mailsuite.admin.cli), not
    # __main__: otherwise their CommandError would be another class and escape as a traceback.
    from mailsuite.admin.cli import main as _main

    sys.exit(_main())

"""`mailsuite [--config FILE] <area> <action> ...`: the admin command line.

Each area lives in its own module (`mailsuite/admin/<area>_cmd.py`) exposing
`register(subparsers)`, which adds its sub-commands with `set_defaults(func=...)`; a command
function takes (config, args) and returns the exit status. Errors are one line on stderr and a
non-zero exit: raise `CommandError`, or an exception class the module lists in `ERRORS` (e.g. the
directory's or the spool's own refusals).
"""
from __future__ import annotations

import argparse
import functools
import importlib
import sys
import unicodedata

from mailsuite import config as config_module

AREAS = ["domain_cmd", "user_cmd", "alias_cmd", "queue_cmd", "dkim_cmd", "dns_cmd", "limits_cmd",
         "reports_cmd", "trace_cmd", "admin_cmd"]


MAX_ARGUMENT = 4096  # characters of one command-line argument


class CommandError(Exception):
    """A refusal to report as one line and exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (exit status 2): scripts read the first line of
    stderr, and a refusal is always one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        usage = " ".join(self.format_usage().split())
        self.exit(2, f"{self.prog}: {message} ({usage})\n")


def build_parser() -> argparse.ArgumentParser:
    return _build()[0]


@functools.lru_cache(maxsize=1)
def _build() -> tuple[argparse.ArgumentParser, tuple[type[BaseException], ...]]:
    """The parser of every area, built once: a parser is reusable, and building it is most of
    what a short command costs (dozens of subcommands, gettext lookups for each help text)."""
    parser = _Parser(prog="mailsuite", description="Administer a mailsuite server.")
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
    """Run one command; the exit status: 0 done, 1 refused, 2 usage error. Every refusal is one
    line on stderr, whatever the input (docs/design/directory.md, "The admin command")."""
    if argv is None:
        argv = sys.argv[1:]
    problem = argument_problem(argv)
    if problem:
        sys.stderr.write(f"mailsuite: {problem}\n")
        return 2
    parser, errors = _build()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage error (one line, see _Parser) or --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        config = config_module.load(args.config)
        return args.func(config, args) or 0
    except errors as e:
        sys.stderr.write(f"mailsuite: {_one_line(str(e))}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mailsuite queue list | head`
        return 0
    except Exception as e:  # a bug: still one line, never a traceback in an operator's script
        sys.stderr.write(f"mailsuite: unexpected error ({type(e).__name__}: "
                         f"{_one_line(str(e))}); please report it\n")
        return 1


def argument_problem(argv: list[str]) -> str | None:
    """Why the command line cannot be meant (None when it can): an argument that is not UTF-8
    (bytes the shell passed through), contains a control character, or is absurdly long."""
    for number, arg in enumerate(argv, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return f"argument {number} is not valid UTF-8"
        if len(arg) > MAX_ARGUMENT:
            return f"argument {number} is longer than {MAX_ARGUMENT} characters"
        if any(unicodedata.category(c) == "Cc" for c in arg):
            return f"argument {number} contains a control character: {_one_line(repr(arg))}"
    return None


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split()) if ("\n" in text or "\r" in text) else text
    return line if len(line) <= limit else line[:limit] + "..."


if __name__ == "__main__":
    # Run the copy of this module that the area modules import (mailsuite.admin.cli), not
    # __main__: otherwise their CommandError would be another class and escape as a traceback.
    from mailsuite.admin.cli import main as _main

    sys.exit(_main())

"""The `evojax-nas` command line. Thin: every command calls importable, tested functions.

Errors a user can cause print one line (`evojax-nas: error: …`) and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence

from evojax_nas.errors import EvojaxNasError

# Subcommands living in their own modules, each exposing `add_command(subparsers)`.
_COMMAND_MODULES = (
    "evojax_nas.cli_train",
    "evojax_nas.cli_mutate",
    "evojax_nas.cli_evolve",
    "evojax_nas.cli_report",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="evojax-nas", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.add_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        argv = ["evolve"] if "evolve" in parser._subparsers._group_actions[0].choices else ["-h"]
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        from evojax_nas.train import enable_compilation_cache

        enable_compilation_cache()
        return int(args.handler(args) or 0)
    except EvojaxNasError as exc:
        print(f"evojax-nas: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evojax-nas: interrupted", file=sys.stderr)
        return 130


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())

"""The `evojax-nas` command line. Thin: every command calls importable, tested functions.

Errors a user can cause print one line (`evojax-nas: error: …`) and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
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
    "evojax_nas.cli_data",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="evojax-nas",
        description="Large-Scale Evolution of Image Classifiers (Real et al., 2017) in JAX. "
        "With no command it runs the default job: `evojax-nas evolve` (quick config).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        argv = ["evolve"]  # the default job
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


if __name__ == "__main__":
    sys.exit(main())

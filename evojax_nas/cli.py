"""The `evojax-nas` command line. Thin: every command calls importable, tested functions.

Errors a user can cause print one line (`evojax-nas: error: …`) and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from evojax_nas import devices
from evojax_nas.config import xla_cache_max_bytes
from evojax_nas.errors import EvojaxNasError

# Commands that never compile anything: they run without importing JAX (fast).
_NO_JAX = frozenset({"status", "adjust", "evolve", "worker"})

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
    devices.apply_cpu_only_environment()
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
        if args.command not in ("status", "adjust"):  # they compile nothing
            xla_cache_max_bytes()  # a bad $EVOJAX_NAS_XLA_CACHE_MAX_MB fails here, not in workers
        # Not where programs are shared through the run's store (see evojax_nas/programs.py):
        # worker processes decide for themselves.
        if args.command not in (*_NO_JAX, "evolve", "worker", "replay"):
            from evojax_nas.train import enable_compilation_cache

            enable_compilation_cache()
        return int(args.handler(args) or 0)
    except EvojaxNasError as exc:
        return _error(str(exc))
    except KeyboardInterrupt as exc:
        _error("interrupted", prefix="evojax-nas: ")
        return 128 + getattr(exc, "signum", 2)
    except BrokenPipeError:
        return _closed_stdout()
    except OSError as exc:  # a path the user gave cannot be read or written
        name = f" {exc.filename}" if exc.filename else ""
        return _error(f"{exc.strerror or exc}:{name}".rstrip(":"))
    except Exception as exc:
        if type(exc).__name__ == "DefaultCredentialsError":  # google.auth, not imported here
            return _error(
                "no Google Cloud credentials for a gs:// store: run `gcloud auth "
                "application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
            )
        raise


def _error(message: str, prefix: str = "evojax-nas: error: ") -> int:
    try:
        print(prefix + message, file=sys.stderr, flush=True)
    except OSError:
        pass  # stderr is gone too (a closed terminal): nothing left to tell
    return 2


def _closed_stdout() -> int:
    """Whoever read our output stopped (`evojax-nas … | head -3`): end quietly, like `yes`."""
    try:  # no second BrokenPipeError when Python flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a command its reader left


if __name__ == "__main__":
    sys.exit(main())

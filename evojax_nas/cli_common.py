"""Small pieces the command modules share; light to import (no JAX)."""

from __future__ import annotations

import argparse

from evojax_nas.hints import command  # noqa: F401  (re-exported for the commands)

STORE_HELP = "the run's store: its directory, or gs://bucket/prefix"


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def natural_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")

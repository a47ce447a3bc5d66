"""Small pieces the command modules share; light to import (no JAX)."""

from __future__ import annotations

from evojax_nas.hints import command  # noqa: F401  (re-exported for the commands)

STORE_HELP = "the run's store: its directory, or gs://bucket/prefix"

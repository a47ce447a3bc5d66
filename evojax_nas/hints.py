"""How to call the command line again, for hints in messages (light: no JAX; any layer)."""

from __future__ import annotations

import functools
import os
import shutil
import sys


@functools.cache
def command() -> str:
    """How to call `evojax-nas` again from the user's shell, as printed in hints.

    Bare `evojax-nas` when it is on PATH (an activated venv, a global install), else its path
    (e.g. `.venv/bin/evojax-nas`), so that a printed hint works when pasted as printed.
    """
    exe = os.path.join(os.path.dirname(sys.executable), "evojax-nas")
    if shutil.which("evojax-nas") or not os.path.exists(exe):
        return "evojax-nas"
    rel = os.path.relpath(exe)
    return exe if rel.startswith("..") else rel

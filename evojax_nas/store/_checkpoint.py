"""Orbax helpers: save a parameter pytree to a local directory and restore it.

Both backends go through a local directory: the local backend writes it in place (inside a
temporary individual directory that is renamed into the store), the GCS backend uploads its
files and downloads them again to restore. Orbax (msgpack/JSON metadata + tensorstore data)
never unpickles anything. `orbax` (and with it JAX) is imported lazily so that opening a store
stays cheap and fork-safe.
"""

import logging
import math
import os
import stat
from typing import Any

import numpy as np

from evojax_nas.errors import CheckpointError

log = logging.getLogger(__name__)

NONE_FILE = "none.json"  # The whole checkpoint of an individual published with params=None.
MAX_BYTES = 1 << 32  # Bound on a checkpoint's arrays when the caller gives none (4 GiB).
MAX_FILES = 256  # orbax writes a dozen files for our small trees
_SLACK = 1 << 20  # metadata files and per-chunk overhead on top of the arrays' bytes


def check_files(directory: str, max_bytes: int | None, what: str) -> None:
    """Refuses a checkpoint directory holding anything but regular files and directories (no
    symlinks, FIFOs, devices), too many files, or more bytes than `max_bytes` arrays can take.

    Raises:
        CheckpointError: with what is wrong.
    """
    limit = 2 * (MAX_BYTES if max_bytes is None else max_bytes) + _SLACK
    total, count = 0, 0
    for root, dirs, files in os.walk(directory):  # os.walk never follows symlinks by default
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(f"checkpoint {what} holds {name!r}, not a regular file")
            total, count = total + st.st_size, count + 1
    if count > MAX_FILES or total > limit:
        raise CheckpointError(
            f"checkpoint {what} holds {count} files, {total} bytes (limit {limit})"
        )


def _check_metadata(checkpointer: Any, directory: str, max_bytes: int, what: str) -> None:
    """Refuses, before loading anything, a checkpoint whose arrays exceed `max_bytes`."""
    tree = checkpointer.metadata(directory).item_metadata.tree
    total, stack = 0, [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif hasattr(node, "shape") and hasattr(node, "dtype"):
            total += math.prod(node.shape) * np.dtype(node.dtype).itemsize
    if total > max_bytes:
        raise CheckpointError(f"checkpoint {what} holds {total} bytes of arrays; limit {max_bytes}")


def _check_tree(tree: Any, where: str = "params") -> None:
    """Raises CheckpointError unless `tree` is a nested dict (str keys) of numpy arrays."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{where} has a non-string key {key!r}")
            _check_tree(value, f"{where}.{key}")
    elif not isinstance(tree, np.ndarray | np.generic) and not hasattr(tree, "__array__"):
        raise CheckpointError(f"{where} is a {type(tree).__name__}, not an array")


def save(params: dict | None, directory: str) -> None:
    """Writes `params` as an orbax checkpoint in `directory` (which must not exist).

    Args:
        params: nested dict of arrays, or None for "no weights".
        directory: local path of the checkpoint directory to create.
    """
    if params is None:
        os.makedirs(directory)
        with open(os.path.join(directory, NONE_FILE), "w") as f:
            f.write("{}")
        return
    _check_tree(params)
    import orbax.checkpoint as ocp

    tree = {"params": _to_numpy(params)}  # A wrapper so that an empty dict still saves.
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(directory), tree)


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def restore(directory: str, what: str, max_bytes: int | None = None) -> dict | None:
    """Reads a checkpoint written by `save`, refusing one bigger than `max_bytes`.

    Args:
        directory: local path of the checkpoint directory.
        what: the checkpoint's name in the store, for error messages.
        max_bytes: the most bytes its arrays may hold (default MAX_BYTES).

    Returns:
        The nested dict of numpy arrays, or None if it was saved from params=None.

    Raises:
        CheckpointError: the checkpoint is missing, truncated or corrupt.
    """
    check_files(directory, max_bytes, what)
    names = set(os.listdir(directory))
    if names == {NONE_FILE}:
        return None
    import orbax.checkpoint as ocp

    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            limit = MAX_BYTES if max_bytes is None else max_bytes
            _check_metadata(checkpointer, os.path.abspath(directory), limit, what)
            tree = checkpointer.restore(os.path.abspath(directory))
        params = tree["params"]
        _check_tree(params)
    except CheckpointError as e:
        raise CheckpointError(f"corrupt checkpoint {what}: {e}") from None
    except Exception as e:  # orbax/tensorstore raise many types for damaged files.
        log.debug("restore of %s failed", what, exc_info=True)
        raise CheckpointError(f"corrupt or truncated checkpoint {what}: {e}") from None
    return _to_numpy(params)

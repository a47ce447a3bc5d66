"""Orbax helpers: save a parameter pytree to a local directory and restore it.

Both backends go through a local directory: the local backend writes it in place (inside a
temporary individual directory that is renamed into the store), the GCS backend uploads its
files and downloads them again to restore. Orbax (msgpack/JSON metadata + tensorstore data)
never unpickles anything. `orbax` (and with it JAX) is imported lazily so that opening a store
stays cheap and fork-safe.
"""

import logging
import os
from typing import Any

import numpy as np

from evojax_nas.errors import CheckpointError

log = logging.getLogger(__name__)

NONE_FILE = "none.json"  # The whole checkpoint of an individual published with params=None.


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


def restore(directory: str, what: str) -> dict | None:
    """Reads a checkpoint written by `save`.

    Args:
        directory: local path of the checkpoint directory.
        what: the checkpoint's name in the store, for error messages.

    Returns:
        The nested dict of numpy arrays, or None if it was saved from params=None.

    Raises:
        CheckpointError: the checkpoint is missing, truncated or corrupt.
    """
    names = set(os.listdir(directory))
    if names == {NONE_FILE}:
        return None
    import orbax.checkpoint as ocp

    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            tree = checkpointer.restore(os.path.abspath(directory))
        params = tree["params"]
        _check_tree(params)
    except CheckpointError as e:
        raise CheckpointError(f"corrupt checkpoint {what}: {e}") from None
    except Exception as e:  # orbax/tensorstore raise many types for damaged files.
        log.debug("restore of %s failed", what, exc_info=True)
        raise CheckpointError(f"corrupt or truncated checkpoint {what}: {e}") from None
    return _to_numpy(params)

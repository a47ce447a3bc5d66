"""Orbax helpers: save a parameter pytree to a local directory and restore it.

Both backends go through a local directory: the local backend writes it in place (inside a
temporary individual directory that is renamed into the store), the GCS backend uploads its
files and downloads them again to restore. Orbax (msgpack/JSON metadata + tensorstore data)
never unpickles anything. `orbax` (and with it JAX) is imported lazily so that opening a store
stays cheap and fork-safe.
"""

import json
import logging
import math
import os
import stat
from typing import Any

import numpy as np

from evojax_nas.errors import CheckpointError

log = logging.getLogger(__name__)

NONE_FILE = "none.json"  # The whole checkpoint of an individual published with params=None.
# The leaves of a packed checkpoint (`save`): path, dtype and shape of each array, in order.
LEAVES_FILE = "leaves.json"
LEAVES_FORMAT = "evojax_nas.packed/1"
LEAVES_MAX_BYTES = 4 << 20
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

    Packed: the arrays of each dtype concatenated into one (an orbax checkpoint of a few
    arrays), their paths, dtypes and shapes in `LEAVES_FILE`. Orbax's cost grows by ~1 ms of CPU
    per array on top of ~20 ms: a default-job net's 20-50 arrays took 40-75 ms, packed ~20
    (a worker publishes each child beside the next one's training, on the same cores).
    `restore` reads this and the unpacked checkpoints written before it.

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

    leaves, groups = [], {}
    for path, value in _flatten(params):
        if value is None:  # an empty dict: kept, so that the tree comes back as it went
            leaves.append({"path": list(path)})
            continue
        a = np.asarray(value)
        leaves.append({"path": list(path), "dtype": a.dtype.name, "shape": list(a.shape)})
        groups.setdefault(a.dtype.name, []).append(a.ravel())
    packed = {name: np.concatenate(parts) for name, parts in groups.items()}
    with ocp.PyTreeCheckpointer() as checkpointer:  # "params": an empty dict still saves
        checkpointer.save(os.path.abspath(directory), {"params": packed})
    with open(os.path.join(directory, LEAVES_FILE), "w") as f:
        json.dump({"format": LEAVES_FORMAT, "leaves": leaves}, f)


def _flatten(tree: dict, prefix: tuple = ()):
    """(path, array) for each leaf of a nested dict in sorted order; (path, None) for an empty
    dict."""
    if not tree and prefix:
        yield prefix, None
    for key in sorted(tree):
        value = tree[key]
        if isinstance(value, dict):
            yield from _flatten(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _unpack(packed: Any, leaves: Any) -> dict:
    """The nested dict `save` packed, from its dtype groups and `LEAVES_FILE`'s list.

    Raises:
        CheckpointError: the list and the arrays do not fit together.
    """
    if not isinstance(packed, dict) or not isinstance(leaves, list):
        raise CheckpointError("not a packed checkpoint")
    packed = {name: np.asarray(flat) for name, flat in packed.items()}
    offsets = dict.fromkeys(packed, 0)
    out: dict = {}
    for leaf in leaves:
        path = leaf.get("path") if isinstance(leaf, dict) else None
        if not path or not all(isinstance(k, str) for k in path):
            raise CheckpointError(f"bad leaf {leaf!r}")
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"leaf {path} lies under an array")
        if path[-1] in node:
            raise CheckpointError(f"leaf {path} twice")
        if "dtype" not in leaf:
            node[path[-1]] = {}
            continue
        name, shape = leaf["dtype"], leaf.get("shape")
        if name not in packed or not isinstance(shape, list):
            raise CheckpointError(f"leaf {path}: no {name!r} arrays, or no shape")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"leaf {path}: bad shape {shape}")
        flat, start = packed[name], offsets[name]
        size = math.prod(shape)
        if flat.ndim != 1 or flat.dtype.name != name or start + size > flat.size:
            raise CheckpointError(f"leaf {path}: {name}{shape} does not fit its packed array")
        node[path[-1]] = flat[start : start + size].reshape(shape)
        offsets[name] = start + size
    if any(offsets[name] != flat.size for name, flat in packed.items()):
        raise CheckpointError("packed arrays longer than their leaves")
    return out


def _read_leaves(directory: str) -> Any:
    path = os.path.join(directory, LEAVES_FILE)
    if os.path.getsize(path) > LEAVES_MAX_BYTES:
        raise CheckpointError(f"{LEAVES_FILE} is over {LEAVES_MAX_BYTES} bytes")
    with open(path, "rb") as f:
        index = json.loads(f.read())
    if not isinstance(index, dict) or index.get("format") != LEAVES_FORMAT:
        raise CheckpointError(f"{LEAVES_FILE} is not {LEAVES_FORMAT}")
    return index.get("leaves")


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
        leaves = _read_leaves(directory) if LEAVES_FILE in names else None
        with ocp.PyTreeCheckpointer() as checkpointer:
            limit = MAX_BYTES if max_bytes is None else max_bytes
            _check_metadata(checkpointer, os.path.abspath(directory), limit, what)
            tree = checkpointer.restore(os.path.abspath(directory))
        params = tree["params"] if leaves is None else _unpack(tree["params"], leaves)
        _check_tree(params)
    except CheckpointError as e:
        raise CheckpointError(f"corrupt checkpoint {what}: {e}") from None
    except Exception as e:  # orbax/tensorstore raise many types for damaged files.
        log.debug("restore of %s failed", what, exc_info=True)
        raise CheckpointError(f"corrupt or truncated checkpoint {what}: {e}") from None
    return _to_numpy(params)

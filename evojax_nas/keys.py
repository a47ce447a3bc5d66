"""PRNG keys of a run: the event key and the purposes folded into it, named once.

Every random choice of a run derives from `event_key(seed, worker, event)` folded with one
purpose, so that each kind of choice has its own stream; a record stores its event key as a
JSON list of integers (`key_to_json`), from which `replay` re-derives the individual.
"""

from __future__ import annotations

import enum
from typing import Any

import jax
import numpy as np


class Purpose(enum.IntEnum):
    """What a key folded from an event key is for (the integer is part of every run's keys)."""

    SELECT = 0  # the pair (or sample) an event picks
    MUTATE = 1  # the child's mutations
    INIT = 2  # an initial individual's weights
    TRAIN = 3  # training: batch order, augmentation


SELECT, MUTATE, INIT, TRAIN = Purpose.SELECT, Purpose.MUTATE, Purpose.INIT, Purpose.TRAIN


def event_key(seed: int, worker_id: int, event: int) -> jax.Array:
    """The key of one worker event: derived from the run seed, the worker, the event count."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), worker_id), event)


def for_purpose(key: jax.Array, purpose: Purpose) -> jax.Array:
    """The key of one kind of random choice of an event."""
    return jax.random.fold_in(key, int(purpose))


def key_to_json(key: jax.Array) -> list[int]:
    """An event key as a record stores it: its raw data as a list of integers."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return [int(x) for x in np.asarray(key).ravel()]


def key_from_json(value: Any) -> jax.Array:
    """The event key a record stores (`key_to_json`'s inverse).

    Raises:
        ValueError: `value` is not a list of integers.
    """
    if not isinstance(value, list | tuple) or not all(isinstance(x, int) for x in value):
        raise ValueError(f"not a key: {value!r:.80}")
    return jax.numpy.asarray(np.asarray(value, dtype=np.uint32))

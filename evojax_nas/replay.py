"""Replaying one individual from its record: the same key must give the same child.

A record holds the event key that made the individual. Replaying re-derives the child from the
parent's stored DNA and weights (or the initial individual from nothing), retrains it, and
compares DNA, validation accuracy and every weight bit with what the store holds.
"""

from __future__ import annotations

import jax
import numpy as np

from evojax_nas import dna as dna_lib
from evojax_nas.config import from_dict as config_from_dict
from evojax_nas.errors import EvojaxNasError, NotFoundError
from evojax_nas.evolution import INIT, MUTATE, TRAIN, Evaluator
from evojax_nas.model import flatten, init_variables
from evojax_nas.mutations import mutate
from evojax_nas.store import Store


def _key(record: dict) -> jax.Array:
    key = record.get("key")
    if not isinstance(key, list) or not all(isinstance(x, int) for x in key):
        raise EvojaxNasError(f"record {record.get('id')} holds no event key to replay from")
    return jax.numpy.asarray(np.asarray(key, dtype=np.uint32))


def rebuild(store: Store, record: dict, input_channels: int, num_classes: int):
    """The (DNA, untrained variables) that the record's event produced, from the parent."""
    cfg = config_from_dict(store.read_config())
    key = _key(record)
    if record.get("parent") is None:
        dna = dna_lib.initial_dna(input_channels, num_classes, cfg.initial_learning_rate)
        return dna, init_variables(dna, jax.random.fold_in(key, INIT))
    parent_id = record["parent"]
    parent = dna_lib.from_dict(store.read_dna(parent_id))
    try:
        params = store.read_params(parent_id)
    except NotFoundError as exc:
        raise EvojaxNasError(
            f"cannot replay {record['id']}: its parent's weights are gone ({exc}); "
            "runs keep them for gc_grace_seconds after the parent dies"
        ) from None
    mutation = record.get("mutation", {})
    child, child_params, _ = mutate(
        parent,
        params,
        jax.random.fold_in(key, MUTATE),
        weights=mutation.get("weights", cfg.mutation_weights),
        count=int(mutation.get("count", cfg.mutations_per_child)),
        inherit=bool(mutation.get("inherit", cfg.inheritance)),
    )
    return child, child_params


def _same_weights(a, b) -> bool:
    fa, fb = flatten(a), flatten(b)
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def replay(
    store: Store, ind_id: str, evaluate: Evaluator, input_channels: int, num_classes: int
) -> dict:
    """Re-derives and retrains `ind_id`; says what matches the stored individual.

    Returns:
        A dict with `dna_matches`, `val_accuracy` and `stored_val_accuracy`,
        `accuracy_matches`, `weights_match` (None when the stored weights were collected) and
        `matches` (all of them).
    """
    record = store.read_record(ind_id)
    dna, params = rebuild(store, record, input_channels, num_classes)
    stored_dna = dna_lib.from_dict(store.read_dna(ind_id))
    result = evaluate(dna, params, jax.random.fold_in(_key(record), TRAIN))
    try:
        stored = store.read_params(ind_id)
        weights = _same_weights(result.variables, stored)
    except NotFoundError:
        weights = None
    out = {
        "id": ind_id,
        "dna_matches": dna == stored_dna,
        "val_accuracy": result.val_accuracy,
        "stored_val_accuracy": record.get("val_accuracy"),
        "accuracy_matches": result.val_accuracy == record.get("val_accuracy"),
        "weights_match": weights,
    }
    out["matches"] = bool(out["dna_matches"] and out["accuracy_matches"] and weights is not False)
    return out

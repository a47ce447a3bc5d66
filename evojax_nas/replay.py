"""Replaying individuals from their records: the same key must give the same child.

A record holds the event key that made the individual. Replaying re-derives the child from the
parent's stored DNA and weights (or the initial individual from nothing), retrains it, and
compares DNA, validation accuracy and every weight bit with what the store holds.
`replay_many` does it for a whole run or one lineage and gives each individual a verdict.
"""

from __future__ import annotations

import jax
import numpy as np

from evojax_nas import dna as dna_lib
from evojax_nas.config import stored_config
from evojax_nas.errors import CheckpointError, EvojaxNasError, NotFoundError, StoreError
from evojax_nas.evolution import Evaluator
from evojax_nas.keys import TRAIN, for_purpose, key_from_json
from evojax_nas.model import flatten
from evojax_nas.programs import code_version
from evojax_nas.recipe import Plan, make_child, make_initial
from evojax_nas.store import Store


class ParentCollected(EvojaxNasError):
    """The parent's weights were garbage-collected: the child cannot be re-derived."""


def _key(record: dict) -> jax.Array:
    try:
        return key_from_json(record.get("key"))
    except ValueError:
        raise EvojaxNasError(
            f"record {record.get('id')} holds no event key to replay from"
        ) from None


def rebuild(store: Store, record: dict, input_channels: int, num_classes: int):
    """The (DNA, untrained variables) that the record's event produced, from the parent."""
    cfg = stored_config(store.read_config())
    key = _key(record)
    if record.get("parent") is None:
        return make_initial(key, input_channels, num_classes, cfg.initial_learning_rate)
    parent_id = record["parent"]
    parent = dna_lib.from_dict(store.read_dna(parent_id))
    try:
        params = store.read_params(parent_id)
    except NotFoundError as exc:
        raise ParentCollected(
            f"cannot replay {record['id']}: its parent's weights are gone ({exc}); "
            "runs keep them for gc_grace_seconds after the parent dies"
        ) from None
    plan = Plan.from_json(record.get("mutation", {}), cfg)
    child, child_params, _ = make_child(key, parent, params, plan)
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
        `accuracy_matches`, `weights_match` (None when the stored weights were collected),
        `matches` (all of them) and `trained_by` (the record's `code`: None in older runs).
    """
    record = store.read_record(ind_id)
    dna, params = rebuild(store, record, input_channels, num_classes)
    stored_dna = dna_lib.from_dict(store.read_dna(ind_id))
    result = evaluate(dna, params, for_purpose(_key(record), TRAIN))
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
        "trained_by": record.get("code"),  # `programs.code_version()` of its worker, if named
    }
    out["matches"] = bool(out["dna_matches"] and out["accuracy_matches"] and weights is not False)
    return out


REPRODUCED, NOT_CHECKABLE, MISMATCH = "reproduced", "not checkable", "MISMATCH"


def lineage(store: Store, ind_id: str) -> list[str]:
    """The IDs from an initial individual down to `ind_id`, following the records' parents."""
    chain: list[str] = []
    current: str | None = ind_id
    while current is not None:
        if current in chain:
            raise EvojaxNasError(f"the records of {ind_id}'s ancestors form a cycle at {current}")
        chain.append(current)
        current = store.read_record(current).get("parent")
    return chain[::-1]


def verdict(
    store: Store, ind_id: str, evaluate: Evaluator, input_channels: int, num_classes: int
) -> dict:
    """Replays one individual; never raises for a damaged or uncheckable one.

    Returns:
        `replay`'s dict (when it ran) plus "verdict" (REPRODUCED, NOT_CHECKABLE or MISMATCH)
        and "detail" (what differs, or why it could not be checked).
    """
    try:
        out = replay(store, ind_id, evaluate, input_channels, num_classes)
    except ParentCollected:
        return {"id": ind_id, "verdict": NOT_CHECKABLE, "detail": "parent weights collected"}
    except (StoreError, CheckpointError, EvojaxNasError) as exc:
        return {"id": ind_id, "verdict": MISMATCH, "detail": f"damaged: {exc}"}
    except (ValueError, TypeError, KeyError) as exc:  # a well-formed record of the wrong shape
        return {"id": ind_id, "verdict": MISMATCH, "detail": f"damaged record: {exc!r}"}
    differs = [
        name
        for name, ok in (
            ("DNA", out["dna_matches"]),
            ("validation accuracy", out["accuracy_matches"]),
            ("weights", out["weights_match"] is not False),
        )
        if not ok
    ]
    if differs:
        detail = "different " + ", ".join(differs) + _other_code(out["trained_by"])
        return out | {"verdict": MISMATCH, "detail": detail}
    detail = "bit for bit" if out["weights_match"] else "DNA and accuracy (own weights collected)"
    return out | {"verdict": REPRODUCED, "detail": detail}


def _other_code(trained_by) -> str:
    """Why a mismatch may be expected: the individual was trained by other code than this
    checkout's (numbers agree only within one package code, JAX and jaxlib version)."""
    here = code_version()
    if not isinstance(trained_by, dict):
        return " (its record does not name the code that trained it: replay with that checkout)"
    other = [f"{k} {trained_by.get(k)} here {v}" for k, v in here.items() if trained_by.get(k) != v]
    if not other:
        return ""
    return f" (trained by other code: {'; '.join(other)}: replay with the checkout that made it)"


def replay_many(
    store: Store,
    ids: list[str],
    evaluate: Evaluator,
    input_channels: int,
    num_classes: int,
    on_verdict=None,
) -> list[dict]:
    """`verdict` for each of `ids`, in order; `on_verdict` sees each as soon as it is known."""
    out = []
    for ind_id in ids:
        v = verdict(store, ind_id, evaluate, input_channels, num_classes)
        if on_verdict is not None:
            on_verdict(v)
        out.append(v)
    return out

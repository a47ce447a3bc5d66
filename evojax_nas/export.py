"""Standalone models: prediction with one individual or a majority-vote ensemble, export, load.

An exported model is a directory that needs only this package (not the run's store):

    DIR/model.json                 dataset layout (image shape, classes, mean/std), members
    DIR/members/<id>/dna.json      each member's DNA
    DIR/members/<id>/checkpoint/   each member's variables, an orbax checkpoint
    DIR/README.txt                 how to load it

`load_model(DIR)` returns a function from uint8 images ``N×H×W×C`` to class probabilities. An
ensemble votes by majority over its members' argmax; ties go to the tied class with the largest
summed probability. Its "probabilities" are the vote shares with that tie-break folded in (see
`ensemble_probabilities`), so their argmax is exactly the ensemble's vote.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from evojax_nas import dna as dna_lib
from evojax_nas.errors import EvojaxNasError

FORMAT = 1
BATCH = 250  # images per compiled prediction call; the report uses the same batching
_README = """\
An evojax_nas model ({kind}, {n} member(s)) exported from {source}.

    import evojax_nas
    predict = evojax_nas.load_model("{path}")
    probabilities = predict(images)   # uint8 N x {h} x {w} x {c} -> float N x {classes}
    labels = probabilities.argmax(-1)

Members (best validation accuracy first): {ids}.
Images are normalised inside the model with the training split's mean/std in model.json.
An ensemble votes by majority over its members' argmax (ties: larger summed probability).
"""


class ExportError(EvojaxNasError):
    """An export directory cannot be written or read."""


def data_meta(dataset: Any) -> dict[str, Any]:
    """What a model needs to know about the data it was trained on (JSON-ready)."""
    return {
        "dataset": dataset.name,
        "image_shape": [int(s) for s in dataset.image_shape],
        "num_classes": int(dataset.num_classes),
        "mean": [float(m) for m in dataset.mean],
        "std": [float(s) for s in dataset.std],
        "augment": dataset.augment,
    }


def make_predict(dna: dna_lib.DNA, meta: dict[str, Any]) -> Callable:
    """A jitted `(params, batch_stats, images) -> probabilities` for this architecture."""
    import jax

    from evojax_nas.model import DNANet
    from evojax_nas.train import make_predict as train_predict

    norm = {"mean": tuple(meta["mean"]), "std": tuple(meta["std"]), "augment": meta["augment"]}
    return jax.jit(train_predict(DNANet(dna), norm))


def predict_batched(predict: Callable, variables: dict, x: np.ndarray) -> np.ndarray:
    """Class probabilities for `x`, in fixed-size padded batches (one compiled shape)."""
    params, stats = variables["params"], variables.get("batch_stats", {})
    out = []
    for start in range(0, len(x), BATCH):
        chunk = x[start : start + BATCH]
        pad = BATCH - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(predict(params, stats, chunk))[: BATCH - pad])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def ensemble_probabilities(member_probs: Sequence[np.ndarray]) -> np.ndarray:
    """Majority vote of K members as a distribution whose argmax is the vote's winner.

    Each member votes for its argmax. Summed probability / (K + 1) is below one vote, so it
    only breaks ties between classes with equal votes. Normalised, it sums to 1 per image.

    Args:
        member_probs: K arrays ``N×classes`` of member probabilities.

    Returns:
        float64 ``N×classes``.
    """
    probs = np.stack([np.asarray(p, np.float64) for p in member_probs])
    k, classes = probs.shape[0], probs.shape[-1]
    votes = np.eye(classes)[probs.argmax(-1)].sum(0)
    score = votes + probs.sum(0) / (k + 1)
    return score / score.sum(-1, keepdims=True)


def _save_checkpoint(variables: dict, path: str) -> None:
    import orbax.checkpoint as ocp

    tree = {"params": variables["params"]}
    if variables.get("batch_stats"):  # orbax saves no empty collection: omitted, restored as {}
        tree["batch_stats"] = variables["batch_stats"]
    with ocp.PyTreeCheckpointer() as ckpt:
        ckpt.save(os.path.abspath(path), tree)


def _restore_checkpoint(path: str) -> dict:
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckpt:
        tree = ckpt.restore(os.path.abspath(path))
    as_np = lambda t: {k: as_np(v) for k, v in t.items()} if isinstance(t, dict) else np.asarray(t)
    return {"params": as_np(tree["params"]), "batch_stats": as_np(tree.get("batch_stats", {}))}


def write_model(
    out_dir: str,
    members: Sequence[tuple[dict, dna_lib.DNA, dict]],
    meta: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> str:
    """Writes an exported model.

    Args:
        out_dir: a directory that does not exist or is empty.
        members: (record, DNA, variables) of each member, best validation first.
        meta: `data_meta` of the dataset the members were trained on.
        extra: more JSON fields for model.json (source store, test accuracy...).

    Returns:
        The path of model.json.

    Raises:
        ExportError: `out_dir` is a non-empty directory or a file, or `members` is empty.
    """
    if not members:
        raise ExportError("nothing to export: no individual with stored weights")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ExportError(f"{out_dir} exists and is not an empty directory: choose another --out")
    entries = []
    for record, dna, variables in members:
        sub = os.path.join("members", record["id"])
        os.makedirs(os.path.join(out_dir, sub))
        with open(os.path.join(out_dir, sub, "dna.json"), "w", encoding="utf-8") as f:
            f.write(dna_lib.to_json(dna))
        _save_checkpoint(variables, os.path.join(out_dir, sub, "checkpoint"))
        entries.append(
            {
                "id": record["id"],
                "val_accuracy": record.get("val_accuracy"),
                "architecture": record.get("architecture"),
                "dna": f"{sub}/dna.json",
                "checkpoint": f"{sub}/checkpoint",
            }
        )
    kind = "ensemble" if len(entries) > 1 else "single"
    model = {"format": FORMAT, "kind": kind, **meta, "members": entries, **(extra or {})}
    path = os.path.join(out_dir, "model.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(model, f, indent=2, sort_keys=True)
    h, w, c = meta["image_shape"]
    readme = _README.format(
        kind=kind,
        n=len(entries),
        source=(extra or {}).get("source", "a run"),
        path=out_dir,
        h=h,
        w=w,
        c=c,
        classes=meta["num_classes"],
        ids=", ".join(e["id"] for e in entries),
    )
    with open(os.path.join(out_dir, "README.txt"), "w", encoding="utf-8") as f:
        f.write(readme)
    return path


def load_model(path: str) -> Callable[[np.ndarray], np.ndarray]:
    """Loads a model written by `evojax-nas export`.

    Args:
        path: the export directory (holding model.json).

    Returns:
        `predict(images) -> probabilities`: images are uint8 (or float in [0, 255]) arrays
        ``N×H×W×C`` shaped like the training images; the result is float ``N×classes``. For an
        ensemble it is the vote share with ties broken by summed probability
        (`ensemble_probabilities`), so its argmax is the ensemble's prediction.

    Raises:
        ExportError: the directory is not an exported model.
    """
    try:
        with open(os.path.join(path, "model.json"), encoding="utf-8") as f:
            model = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path} is not an exported model: {exc}") from None
    if model.get("format") != FORMAT:
        raise ExportError(f"{path}: unsupported export format {model.get('format')!r}")
    shape = tuple(model["image_shape"])
    members = []
    for entry in model["members"]:
        dna = dna_lib.load(os.path.join(path, entry["dna"]))
        variables = _restore_checkpoint(os.path.join(path, entry["checkpoint"]))
        members.append((make_predict(dna, model), variables))

    def predict(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or tuple(images.shape[1:]) != shape:
            raise ExportError(f"expected images N×{'×'.join(map(str, shape))}, got {images.shape}")
        probs = [predict_batched(fn, variables, images) for fn, variables in members]
        return probs[0] if len(probs) == 1 else ensemble_probabilities(probs)

    return predict

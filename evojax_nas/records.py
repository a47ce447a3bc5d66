"""Pure queries over a run's records (and an individual's DNA): no store, no JAX, no I/O.

`report`, `compare` and `plots` compute from these over one loaded view of a run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from evojax_nas import dna as dna_lib


def trained(records: Iterable[dict]) -> list[dict]:
    """The records of individuals that completed training, oldest first."""
    done = [r for r in records if isinstance(r.get("born"), int | float)]
    return sorted(done, key=lambda r: (r["born"], r["id"]))


def run_start(records: Sequence[dict]) -> float:
    """Unix time the run started: the earliest start of training of any individual."""
    return min(r["born"] - r.get("train_seconds", 0.0) for r in records)


def best_so_far(records: Sequence[dict]) -> list[dict]:
    """The records that were the best by validation when they were born, in time order."""
    out, best = [], -math.inf
    for r in records:  # already sorted by birth
        if r.get("val_accuracy", 0.0) > best:
            best = r["val_accuracy"]
            out.append(r)
    return out


def ancestry(records: Sequence[dict], ind_id: str) -> list[dict]:
    """The lineage of `ind_id`, from its initial ancestor to itself."""
    by_id = {r["id"]: r for r in records}
    chain, cur = [], by_id.get(ind_id)
    while cur is not None and cur["id"] not in {c["id"] for c in chain}:
        chain.append(cur)
        cur = by_id.get(cur.get("parent"))
    return chain[::-1]


def ranked(records: Iterable[dict]) -> list[dict]:
    """Records by validation accuracy, best first (ties: the older one first)."""
    return sorted(records, key=lambda r: (-r.get("val_accuracy", 0.0), r["born"], r["id"]))


def paper_diagram(dna: dna_lib.DNA) -> str:
    """The backbone in the paper's notation: `Input → C+BN+R → C → … → Global Pool → Output`.

    "C" is a convolution, "+BN+R" a batch-norm + ReLU vertex; an identity edge into a BN+R
    vertex stacks another "+BN+R" onto the previous block, as in the paper's Figure 1.
    """
    parts = ["Input"]
    path = dna_lib.backbone(dna)
    for vid in path[:-1]:
        e = next(x for x in dna.out_edges(vid) if not x.is_skip)
        relu = dna.vertex(e.dst).kind == "bn_relu"
        skips = sum(1 for x in dna.in_edges(e.dst) if x.is_skip)
        note = f" (+{skips} skip)" if skips else ""
        if e.is_conv:
            parts.append("C" + ("+BN+R" if relu else "") + note)
        elif relu and parts[-1] != "Input":
            parts[-1] += "+BN+R" + note
        elif relu or note:
            parts.append(("BN+R" if relu else "Sum") + note)
    return " → ".join([*parts, "Global Pool", "Output"])

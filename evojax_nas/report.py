"""Reports on a run: the best individual by validation, measured once on the test split.

The paper's reporting rule (§3.7): "the best model" is the one with the highest *validation*
accuracy; only its *test* accuracy is reported. Evolution never sees the test split; this module
(with `compare` and `export`, which use it) is the only code that calls
`data.load_test_split`. Test accuracies are cached in the store (meta `test-accuracy`), so a
second report on the same run does no evaluation at all and does not even load the data.
A report or an export works over one `RunView`: the records read once, each DNA and checkpoint
at most once.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from evojax_nas import data as data_lib
from evojax_nas import dna as dna_lib
from evojax_nas import export, stall
from evojax_nas.app import open_run
from evojax_nas.errors import (
    CheckpointError,
    ConcurrencyError,
    EvojaxNasError,
    NotFoundError,
    ReportError,
)
from evojax_nas.records import ancestry, best_so_far, paper_diagram, ranked, run_start, trained
from evojax_nas.state import HISTORY, TEST_CACHE  # noqa: F401  (HISTORY: readers use it here)
from evojax_nas.store import Store

log = logging.getLogger(__name__)

TEST_NOTE = (
    "selection used validation accuracy only; the test split was read by report/compare/export "
    "alone, to measure the individuals named here"
)


def trained_records(store: Store) -> list[dict]:
    """Every individual's record that completed training, oldest first."""
    records = trained(store.records())
    if not records:
        from evojax_nas.hints import command

        raise ReportError(
            f"{store.url} holds no trained individuals yet: start a worker with "
            f"`{command()} worker {store.url}`"
        )
    return records


class RunView:
    """One loaded view of a run, what a report or an export reads: the config and the trained
    records are read once; each individual's DNA and weights at most once.

    Weights are kept only for the IDs in `keep` (the ensemble's members, used more than once);
    others are read, used and dropped, so a long Figure 2 series does not pile up in memory.
    """

    def __init__(self, store: Store):
        """Reads the run's config (first: "no run here" is the clearer error), then records."""
        self.run = open_run(store)
        self.store, self.cfg = store, self.run.cfg
        self.records = trained_records(store)
        self.keep: set[str] = set()
        self._dnas: dict[str, dna_lib.DNA] = {}
        self._weights: dict[str, dict | None] = {}  # kept weights, and None for collected ones

    def dna(self, ind_id: str) -> dna_lib.DNA:
        if ind_id not in self._dnas:
            self._dnas[ind_id] = dna_lib.from_dict(self.store.read_dna(ind_id))
        return self._dnas[ind_id]

    def weights(self, ind_id: str) -> dict | None:
        """An individual's variables, or None when they were collected."""
        if ind_id in self._weights:
            return self._weights[ind_id]
        try:
            variables = self.store.read_params(ind_id)
        except (NotFoundError, CheckpointError) as exc:
            log.info("no weights for %s: %s", ind_id, exc)
            variables = None
        if variables is None or ind_id in self.keep:
            self._weights[ind_id] = variables
        return variables


class TestEvaluator:
    """Measures individuals on the test split; loads data and compiles only when needed."""

    def __init__(self, view: RunView):
        """Binds to a run's view; nothing is loaded until the first evaluation."""
        self.view, self.cfg = view, view.cfg
        self._data: tuple[Any, np.ndarray, np.ndarray] | None = None
        self._predictors: dict[str, Any] = {}
        self._probabilities: dict[str, np.ndarray | None] = {}

    @property
    def meta(self) -> dict[str, Any]:
        """`export.data_meta` of the run's dataset (train statistics, image shape)."""
        return export.data_meta(self._load()[0])

    def test_labels(self) -> np.ndarray:
        return self._load()[2]

    def _load(self) -> tuple[Any, np.ndarray, np.ndarray]:
        if self._data is None:
            ds = self.view.run.task.dataset
            x, y = data_lib.load_test_split(self.cfg.dataset, data_dir=self.cfg.data_dir)
            log.info("test split of %s: %d images (reporting only)", self.cfg.dataset, len(y))
            self._data = (ds, x, np.asarray(y))
        return self._data

    def member(self, ind_id: str) -> tuple[dna_lib.DNA, dict] | None:
        """(DNA, variables) of an individual, or None if its weights were collected."""
        variables = self.view.weights(ind_id)
        return None if variables is None else (self.view.dna(ind_id), variables)

    def probabilities(self, ind_id: str) -> np.ndarray | None:
        """Test-set class probabilities of an individual (computed once), None without weights."""
        if ind_id not in self._probabilities:
            self._probabilities[ind_id] = self._predict(ind_id)
        return self._probabilities[ind_id]

    def _predict(self, ind_id: str) -> np.ndarray | None:
        found = self.member(ind_id)
        if found is None:
            return None
        dna, variables = found
        key = dna_lib.architecture_key(dna)
        if key not in self._predictors:
            self._predictors[key] = export.make_predict(dna, self.meta)
        return export.predict_batched(self._predictors[key], variables, self._load()[1])

    def accuracy(self, probs: np.ndarray) -> float:
        return float(np.mean(probs.argmax(-1) == self.test_labels()))


class TestCache:
    """Test accuracies cached in the store's meta file; saved with compare-and-swap."""

    def __init__(self, store: Store, dataset: str):
        """Reads the cache; one made for another dataset counts as empty."""
        self.store, self.dataset = store, dataset
        value, _ = store.read_meta(TEST_CACHE)
        if not value or value.get("dataset") != dataset:
            value = {}
        self.individuals: dict[str, float | None] = dict(value.get("individuals", {}))
        self.ensembles: dict[str, float] = dict(value.get("ensembles", {}))
        self.dirty = False

    def save(self, attempts: int = 5) -> None:
        """Merges this cache into the store's (another report may have written meanwhile)."""
        if not self.dirty:
            return

        def merge(value: dict | None) -> dict:
            value = value if value and value.get("dataset") == self.dataset else {}
            return {
                "dataset": self.dataset,
                "individuals": {**value.get("individuals", {}), **self.individuals},
                "ensembles": {**value.get("ensembles", {}), **self.ensembles},
            }

        try:
            self.store.update_meta(TEST_CACHE, merge, attempts=attempts)
            self.dirty = False
        except ConcurrencyError:
            log.warning("could not save the test-accuracy cache of %s (busy)", self.store)


def individual_accuracy(ind_id: str, evaluator: TestEvaluator, cache: TestCache) -> float | None:
    """Test accuracy of one individual (cached); None when its weights were collected."""
    if ind_id not in cache.individuals:
        probs = evaluator.probabilities(ind_id)
        cache.individuals[ind_id] = None if probs is None else evaluator.accuracy(probs)
        cache.dirty = True
    return cache.individuals[ind_id]


def ensemble_members(view: RunView, k: int) -> list[dict]:
    """The top-k by validation among individuals whose weights are still stored.

    Their weights, read here to check they exist, stay in `view` for the evaluation and export.
    """
    if k < 1:
        raise ReportError(f"--ensemble must be at least 1, got {k}")
    out = []
    for r in ranked(view.records):
        if len(out) == k:
            break
        view.keep.add(r["id"])
        # A live individual's checkpoint is never collected: it is read when used, not here.
        if r.get("alive") or view.weights(r["id"]) is not None:
            out.append(r)
        else:
            view.keep.discard(r["id"])
    return out


def ensemble_accuracy(
    members: Sequence[dict], evaluator: TestEvaluator, cache: TestCache
) -> float | None:
    """Test accuracy of the majority vote of `members` (cached by their IDs)."""
    if not members:
        return None
    key = ",".join(r["id"] for r in members)
    if key not in cache.ensembles:
        probs = [evaluator.probabilities(r["id"]) for r in members]
        if any(p is None for p in probs):
            return None
        cache.ensembles[key] = evaluator.accuracy(export.ensemble_probabilities(probs))
        cache.dirty = True
    return cache.ensembles[key]


def progress_series(records: Sequence[dict], evaluator, cache) -> list[dict]:
    """Figure 2's points: test accuracy of the best-by-validation individual over time.

    Each point is where a new best by validation was born. `test_accuracy` is None where its
    weights were garbage-collected before any report measured it.
    """
    start = run_start(records)
    return [
        {
            "time_s": r["born"] - start,
            "id": r["id"],
            "val_accuracy": r["val_accuracy"],
            "test_accuracy": individual_accuracy(r["id"], evaluator, cache),
        }
        for r in best_so_far(records)
    ]


def run_summary(store: Store, k: int = 1) -> dict[str, Any]:
    """Measures a run (no files written): the numbers of `evojax-nas report --json`."""
    view = RunView(store)
    return summarize(view, TestEvaluator(view), k)


def summarize(view: RunView, evaluator: TestEvaluator, k: int) -> dict[str, Any]:
    """`run_summary` over a loaded view (and its evaluator, which keeps what it computed)."""
    records, cfg = view.records, view.cfg
    cache = TestCache(view.store, cfg.dataset)
    members = ensemble_members(view, k)  # first: their weights are then read once, and kept
    series = progress_series(records, evaluator, cache)
    best = ranked(records)[0]
    summary = {
        "store": view.store.url,
        "dataset": cfg.dataset,
        "selection": cfg.selection,
        "inheritance": cfg.inheritance,
        "seed": cfg.seed,
        "best_id": best["id"],
        "best_val_accuracy": best["val_accuracy"],
        "best_test_accuracy": individual_accuracy(best["id"], evaluator, cache),
        "best_architecture": paper_diagram(view.dna(best["id"])),
        "best_architecture_detail": best.get("architecture"),
        "ancestry": [r["id"] for r in ancestry(records, best["id"])],
        "ensemble_k": k,
        "ensemble_ids": [r["id"] for r in members],
        "ensemble_test_accuracy": ensemble_accuracy(members, evaluator, cache),
        "individuals_trained": len(records),
        "total_flops": math.fsum(r.get("flops", 0.0) for r in records),
        "wall_hours": (records[-1]["born"] - run_start(records)) / 3600,
        "progress": series,
        "progress_missing": [p["id"] for p in series if p["test_accuracy"] is None],
        "test_split": TEST_NOTE,
        "stall": stall_diagnosis(view.store, records, cfg),
    }
    cache.save()
    return summary


def stall_diagnosis(store: Store, records: Sequence[dict], cfg) -> dict[str, Any]:
    """`stall.diagnose` of the trained records, its advice naming this run (a JSON dict)."""
    from evojax_nas.hints import command

    d = stall.diagnose(records, cfg.population, run=store.url, steps=cfg.steps, command=command())
    return d.to_dict()


def output_dir(store: Store, out_dir: str | None) -> str:
    """Where a report's files go: `out_dir`, else `<run>/report` (local) or `./report-<name>`."""
    if out_dir:
        return out_dir
    if store.url.startswith("gs://"):
        return "report-" + store.url.rstrip("/").split("/")[-1]
    return os.path.join(store.url, "report")


def write_report(store: Store, k: int = 3, out_dir: str | None = None) -> dict[str, Any]:
    """Measures a run and writes Figure 1, Figure 2, the best architecture and report.json.

    Args:
        store: the run's store.
        k: ensemble size (top-k by validation among individuals with stored weights).
        out_dir: where the files go (default `output_dir`).

    Returns:
        `run_summary`'s dict plus "outputs" (the paths of the files written).
    """
    from evojax_nas import plots  # matplotlib: only when drawing

    out = output_dir(store, out_dir)
    if out_dir is None and os.path.islink(out):  # a store's contents may be hostile
        raise EvojaxNasError(f"{out} is a symlink; refusing to write through it (use --out)")
    view = RunView(store)
    summary = summarize(view, TestEvaluator(view), k)
    os.makedirs(out, exist_ok=True)
    records = view.records
    paths = {
        name: os.path.join(out, name)
        for name in ("figure1.png", "figure2.png", "architecture.txt", "report.json")
    }
    for path in paths.values():  # replace, never write through, a symlink left in its place
        if os.path.islink(path):
            os.unlink(path)
    history, _ = store.read_meta(HISTORY)
    shown = plots.figure1(
        records,
        summary["best_id"],
        paths["figure1.png"],
        diagram=lambda ind_id: paper_diagram(view.dna(ind_id)),
        history=(history or {}).get("events", []),
        name=store.url.rstrip("/").split("/")[-1],
    )
    plots.figure2(summary["progress"], paths["figure2.png"], 3600 * summary["wall_hours"])
    with open(paths["architecture.txt"], "w", encoding="utf-8") as f:
        f.write(architecture_text(view, shown))
    summary["outputs"] = paths
    with open(paths["report.json"], "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return summary


def architecture_text(view: RunView, shown: Sequence[dict]) -> str:
    """The best architecture (last of `shown`) and the ancestors drawn on Figure 1, as text."""
    blocks = []
    for r in shown:
        dna = view.dna(r["id"])
        blocks.append(
            f"{r['id']}  validation {r['val_accuracy']:.4f}  learning rate {dna.learning_rate:.4g}"
            f"\n  {paper_diagram(dna)}\n  {dna_lib.describe(dna)}\n"
        )
    return "best by validation (last) and the ancestors shown on Figure 1:\n\n" + "\n".join(blocks)


def export_run(store: Any, out_dir: str, k: int = 1) -> str:
    """Exports the best individual by validation (k=1) or the top-k majority-vote ensemble.

    Args:
        store: the run's store.
        out_dir: a new (or empty) directory.
        k: number of members, best validation first, among individuals with stored weights.

    Returns:
        The path of the written model.json.
    """
    view = RunView(store)
    evaluator = TestEvaluator(view)
    summary = summarize(view, evaluator, k)
    records = {r["id"]: r for r in view.records}
    members = []
    for ind_id in summary["ensemble_ids"]:
        found = evaluator.member(ind_id)
        if found is not None:
            members.append((records[ind_id], *found))
    extra = {
        "source": store.url,
        "test_accuracy": summary["ensemble_test_accuracy"],
        "selected_by": "validation accuracy (top-k among individuals with stored weights)",
    }
    return export.write_model(out_dir, members, evaluator.meta, extra)

"""`compare`: several runs measured, grouped (evolution, its controls), tested against noise.

Groups are compared with the first group (a reference, e.g. evolution) by a permutation test on
the difference of their mean test accuracies: a gap counts only when it is larger than the
spread of the runs makes likely by chance, so nobody reads a 2-point gap with σ = 2 as a result.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from evojax_nas import plots, report
from evojax_nas.errors import ReportError
from evojax_nas.store import open_store

ALPHA = 0.05  # a difference "exceeds the noise" when its two-sided p-value is below this
MAX_PERMUTATIONS = 20_000  # exact test up to this many splits, else this many random ones


def compare(
    urls: Sequence[str], labels: Sequence[str] | None = None, out: str = "compare.png"
) -> dict[str, Any]:
    """Measures several runs, plots their groups with mean ± 2σ bands, and tabulates them.

    Args:
        urls: run stores.
        labels: a group name per store; default from each run's config (`group_label`).
        out: the PNG to write.

    Returns:
        {"runs": [...], "groups": [...], "table": markdown text, "plot": out}.
    """
    if labels is not None and len(labels) != len(urls):
        raise ReportError(f"{len(labels)} labels for {len(urls)} stores")
    runs = []
    for i, url in enumerate(urls):
        store = open_store(url, create=False)
        summary = report.run_summary(store, k=1)
        summary["group"] = labels[i] if labels else group_label(summary)
        summary["budget"] = {k: store.read_config().get(k) for k in BUDGET_FIELDS}
        runs.append(summary)
    warnings = comparable(runs)
    groups = _group(runs)
    plots.compare_plot(runs, groups, out)
    differences = group_differences(runs, groups)
    result = {
        "runs": runs,
        "groups": groups,
        "differences": differences,
        "table": table(groups) + "\n\n" + differences_table(differences),
        "plot": out,
    }
    return result | {"warnings": warnings}


BUDGET_FIELDS = ("population", "steps", "max_children", "max_minutes", "workers")


def comparable(runs: Sequence[dict]) -> list[str]:
    """Refuses runs on different datasets (different test sets); warns on different budgets."""
    datasets = sorted({r["dataset"] for r in runs})
    if len(datasets) > 1:
        raise ReportError(
            f"these runs use different datasets ({', '.join(datasets)}): their test "
            "accuracies cannot be averaged or compared; compare runs of one dataset"
        )
    warnings = []
    for field in BUDGET_FIELDS:
        values = sorted({str(r["budget"][field]) for r in runs})
        if len(values) > 1:
            warnings.append(f"the runs differ in {field} ({', '.join(values)})")
    return warnings


def _group(runs: Sequence[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["group"] for r in runs):
        rs = [r for r in runs if r["group"] == name]
        test = np.array(
            [np.nan if r["best_test_accuracy"] is None else r["best_test_accuracy"] for r in rs]
        )
        out.append(
            {
                "group": name,
                "runs": len(rs),
                "seeds": [r["seed"] for r in rs],
                "test_mean": float(np.nanmean(test)) if not np.all(np.isnan(test)) else None,
                # σ over runs: undefined (None, "n/a") for a group of one measured run
                "test_std": float(np.nanstd(test, ddof=1)) if np.sum(~np.isnan(test)) > 1 else None,
                "val_mean": float(np.mean([r["best_val_accuracy"] for r in rs])),
                "flops_mean": float(np.mean([r["total_flops"] for r in rs])),
                "individuals_mean": float(np.mean([r["individuals_trained"] for r in rs])),
                "wall_hours_mean": float(np.mean([r["wall_hours"] for r in rs])),
            }
        )
    return out


def table(groups: Sequence[dict]) -> str:
    """Markdown table: final test accuracy (mean, σ over runs) and cost per group."""
    pct = lambda v: "n/a" if v is None or math.isnan(v) else f"{100 * v:.2f}"  # noqa: E731
    rows = [
        "| group | runs | test acc. mean (%) | σ (%) | best val. mean (%) | individuals "
        "| FLOPs per run | wall min per run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        rows.append(
            f"| {g['group']} | {g['runs']} | {pct(g['test_mean'])} | "
            f"{pct(g['test_std'])} | {pct(g['val_mean'])} | "
            f"{g['individuals_mean']:.0f} | {g['flops_mean']:.2e} | "
            f"{60 * g['wall_hours_mean']:.1f} |"
        )
    return "\n".join(rows)


def group_label(cfg: dict[str, Any]) -> str:
    """The control a run belongs to, from its config."""
    if cfg.get("selection") == "random":
        return "random search"
    if not cfg.get("inheritance", True):
        return "no inheritance"
    return "evolution" if cfg.get("selection") == "tournament" else str(cfg.get("selection"))


def _tests(runs: Sequence[dict], group: str) -> np.ndarray:
    values = [r["best_test_accuracy"] for r in runs if r["group"] == group]
    return np.array([v for v in values if v is not None], dtype=float)


def permutation_p(a: np.ndarray, b: np.ndarray, seed: int = 0) -> float:
    """Two-sided p-value of the difference of means of `a` and `b` under relabelling.

    Exact (every split) when there are at most MAX_PERMUTATIONS, else MAX_PERMUTATIONS random
    splits from a fixed seed (so the answer does not change between calls).
    """
    both, n = np.concatenate([a, b]), len(a)
    observed = abs(a.mean() - b.mean())
    eps = 1e-12 * max(1.0, observed)
    if math.comb(len(both), n) <= MAX_PERMUTATIONS:
        splits = (list(c) for c in itertools.combinations(range(len(both)), n))
    else:
        rng = np.random.default_rng(seed)
        splits = (rng.permutation(len(both))[:n] for _ in range(MAX_PERMUTATIONS))
    hits = total = 0
    for idx in splits:
        mask = np.zeros(len(both), bool)
        mask[idx] = True
        hits += abs(both[mask].mean() - both[~mask].mean()) >= observed - eps
        total += 1
    return float(hits / total)


def group_differences(runs: Sequence[dict], groups: Sequence[dict]) -> list[dict]:
    """Each group against the first: the difference of mean test accuracies and whether it
    exceeds the noise (permutation test, `ALPHA`). Needs two measured runs per group."""
    if len(groups) < 2:
        return []
    ref = groups[0]["group"]
    a = _tests(runs, ref)
    out = []
    for g in groups[1:]:
        b = _tests(runs, g["group"])
        row = {"group": g["group"], "vs": ref, "runs": [len(b), len(a)]}
        if len(a) < 2 or len(b) < 2:
            out.append(row | {"difference": None, "p_value": None, "exceeds_noise": None})
            continue
        p = float(permutation_p(b, a))
        diff = float(b.mean() - a.mean())
        out.append(row | {"difference": diff, "p_value": p, "exceeds_noise": bool(p < ALPHA)})
    return out


def differences_table(differences: Sequence[dict]) -> str:
    """Markdown: each group's difference from the reference, and whether it is noise."""
    if not differences:
        return ""
    rows = [
        "| group | vs | difference (points) | p (permutation) | larger than the noise? |",
        "|---|---|---|---|---|",
    ]
    for d in differences:
        if d["difference"] is None:
            verdict, diff, p = "unknown: fewer than 2 measured runs", "n/a", "n/a"
        else:
            verdict = "yes" if d["exceeds_noise"] else f"no (p ≥ {ALPHA})"
            diff, p = f"{100 * d['difference']:+.2f}", f"{d['p_value']:.3f}"
        rows.append(f"| {d['group']} | {d['vs']} | {diff} | {p} | {verdict} |")
    return "\n".join(rows)

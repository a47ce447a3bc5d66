"""The paper's figures as PNGs (matplotlib, Agg backend), and `compare` of several runs.

- Figure 1: every individual as a dot (wall time vs validation accuracy), alive ones
  highlighted, the best's ancestry traced and some ancestors' architectures listed, and the
  run's `adjust` events (mutation-rate periods, weight resets) as vertical lines.
- Figure 2: test accuracy of the best-by-validation individual over wall time.
- Compare: Figure-2 curves of several runs grouped (e.g. five seeds of evolution, the random
  search and no-inheritance controls) with mean ± 2σ bands, and a table of final results.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np

from evojax_nas import dna as dna_lib
from evojax_nas import report
from evojax_nas.store import Store, open_store

STYLES = {  # the paper's Figure 2: evolution solid blue, controls dashed / dash-dotted
    "evolution": ("#1f77b4", "-"),
    "no inheritance": ("#ff7f0e", "--"),
    "random search": ("#2ca02c", "-."),
}


def _finish_axes(ax, unit: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(f"wall time ({unit})")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def time_unit(seconds: float) -> tuple[float, str]:
    """(divisor, name) for a time axis: minutes for short runs, hours from two hours on."""
    return (3600.0, "hours") if seconds >= 7200 else (60.0, "minutes")


def pick_ancestors(lineage: Sequence[dict], n: int = 4) -> list[dict]:
    """The best and up to n-1 earlier ancestors, spread over the lineage's architecture changes."""
    changes = [
        r
        for i, r in enumerate(lineage)
        if i == 0 or r.get("architecture_key") != lineage[i - 1].get("architecture_key")
    ]
    changes = [r for r in changes if r is not lineage[-1]]
    if len(changes) > n - 1:
        idx = np.linspace(0, len(changes) - 1, n - 1).round().astype(int)
        changes = [changes[i] for i in sorted(set(idx))]
    return [*changes, lineage[-1]]


def _scatter(ax, points: Sequence[dict], t, **style) -> None:
    ax.scatter([t(r) for r in points], [100 * r["val_accuracy"] for r in points], **style)


def figure1(store: Store, records: Sequence[dict], best_id: str, path: str) -> list[dict]:
    """Draws Figure 1 into `path`; returns the ancestors listed under the plot."""
    plt = _pyplot()
    start = report.run_start(records)
    div, unit = time_unit(records[-1]["born"] - start)
    t = lambda r: (r["born"] - start) / div  # noqa: E731
    lineage = report.ancestry(records, best_id)
    shown = pick_ancestors(lineage)
    lines = []
    for letter, r in zip("ABCDEFGH", shown, strict=False):
        arch = report.paper_diagram(dna_lib.from_dict(store.read_dna(r["id"])))
        head = f"{letter}  {r['id']}  val {100 * r['val_accuracy']:.1f}%  "
        lines += textwrap.wrap(head + arch, 120, subsequent_indent=" " * 6)
    extra = 0.17 * len(lines) + 0.3  # inches for the architecture list
    fig, (ax, text) = plt.subplots(
        2, 1, figsize=(11, 6 + extra), gridspec_kw={"height_ratios": [6, extra]}
    )
    dead = [r for r in records if not r.get("alive")]
    alive = [r for r in records if r.get("alive")]
    _scatter(ax, dead, t, s=9, c="#b0b0b0", label=f"killed ({len(dead)})")
    _scatter(ax, alive, t, s=26, c="#1f4e9c", label=f"alive ({len(alive)})", zorder=3)
    ax.plot(
        [t(r) for r in lineage],
        [100 * r["val_accuracy"] for r in lineage],
        "-o",
        c="#d62728",
        ms=3,
        lw=1,
        label="ancestry of the best",
        zorder=4,
    )
    for letter, r in zip("ABCDEFGH", shown, strict=False):
        ax.annotate(
            letter,
            (t(r), 100 * r["val_accuracy"]),
            xytext=(4, 6),
            textcoords="offset points",
            fontsize=10,
            weight="bold",
            color="#d62728",
        )
    _draw_history(ax, store, start, div)
    name = store.url.rstrip("/").split("/")[-1]
    title = f"Progress of the run {name}: {len(records)} individuals"
    _finish_axes(ax, unit, "validation accuracy (%)", title)
    text.axis("off")
    text.text(
        0, 1, "\n".join(lines), va="top", family="monospace", fontsize=7.5, transform=text.transAxes
    )
    _save(fig, path)
    return shown


def _draw_history(ax, store: Store, start: float, div: float) -> None:
    """Vertical lines (and shaded periods) for the `adjust` events of the run."""
    history, _ = store.read_meta(report.HISTORY)
    for event in (history or {}).get("events", []):
        x = (event["time"] - start) / div
        if event.get("kind") == "weight_reset":
            ax.axvline(x, color="#9467bd", ls="--", lw=1)
            label = "weight reset"
        else:
            ax.axvline(x, color="#e377c2", ls=":", lw=1.2)
            if event.get("until"):
                ax.axvspan(x, (event["until"] - start) / div, color="#e377c2", alpha=0.12)
            label = f"{event.get('mutations_per_child')} mutations/child"
        ax.annotate(
            label,
            (x, 1),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=7,
        )


def figure2(series: Sequence[dict], path: str, end_s: float | None = None) -> None:
    """Draws Figure 2 (test accuracy of the best-by-validation individual over time).

    Args:
        series: `report.progress_series` points.
        path: the PNG to write.
        end_s: the run's length in seconds; the last value is held until then.
    """
    plt = _pyplot()
    end_s = max([end_s or 0.0, *(p["time_s"] for p in series)])
    series = [*series, {**series[-1], "time_s": end_s}] if series else []
    div, unit = time_unit(end_s)
    fig, ax = plt.subplots(figsize=(8, 5))
    ok = [p for p in series if p["test_accuracy"] is not None]
    ax.step(
        [p["time_s"] / div for p in ok],
        [100 * p["test_accuracy"] for p in ok],
        where="post",
        marker="o",
        ms=4,
        markevery=list(range(len(ok) - 1)),  # the last point only holds the value to the end
        c="#1f77b4",
        label="test (best by validation)",
    )
    ax.step(
        [p["time_s"] / div for p in series],
        [100 * p["val_accuracy"] for p in series],
        where="post",
        c="#7f7f7f",
        lw=0.8,
        ls=":",
        label="its validation accuracy",
    )
    missing = [p for p in series[:-1] if p["test_accuracy"] is None]
    if missing:
        ax.scatter(
            [p["time_s"] / div for p in missing],
            [100 * p["val_accuracy"] for p in missing],
            marker="x",
            c="#d62728",
            label=f"not measured: weights collected ({len(missing)})",
        )
    _finish_axes(ax, unit, "accuracy (%)", "Test accuracy of the best individual by validation")
    _save(fig, path)


def group_label(cfg: dict[str, Any]) -> str:
    """The control a run belongs to, from its config."""
    if cfg.get("selection") == "random":
        return "random search"
    if not cfg.get("inheritance", True):
        return "no inheritance"
    return "evolution" if cfg.get("selection") == "tournament" else str(cfg.get("selection"))


def curve(series: Sequence[dict], grid: np.ndarray) -> np.ndarray:
    """A run's Figure-2 value at each time of `grid` (NaN before its first measured point)."""
    out = np.full(grid.shape, np.nan)
    for p in series:
        if p["test_accuracy"] is not None:
            out[grid >= p["time_s"]] = p["test_accuracy"]
    return out


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
        raise report.ReportError(f"{len(labels)} labels for {len(urls)} stores")
    runs = []
    for i, url in enumerate(urls):
        store = open_store(url, create=False)
        summary = report.run_summary(store, k=1)
        summary["group"] = labels[i] if labels else group_label(summary)
        summary["budget"] = {k: store.read_config().get(k) for k in BUDGET_FIELDS}
        runs.append(summary)
    warnings = comparable(runs)
    groups = _group(runs)
    _plot_compare(runs, groups, out)
    result = {"runs": runs, "groups": groups, "table": table(groups), "plot": out}
    return result | {"warnings": warnings}


BUDGET_FIELDS = ("population", "steps", "max_children", "max_minutes", "workers")


def comparable(runs: Sequence[dict]) -> list[str]:
    """Refuses runs on different datasets (different test sets); warns on different budgets."""
    datasets = sorted({r["dataset"] for r in runs})
    if len(datasets) > 1:
        raise report.ReportError(
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


def _plot_compare(runs: Sequence[dict], groups: Sequence[dict], out: str) -> None:
    plt = _pyplot()
    end = max(3600 * r["wall_hours"] for r in runs)
    div, unit = time_unit(end)
    grid = np.linspace(0, end, 300)
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, g in enumerate(groups):
        color, ls = STYLES.get(g["group"], (f"C{i + 3}", "-"))
        curves = np.array([curve(r["progress"], grid) for r in runs if r["group"] == g["group"]])
        with np.errstate(all="ignore"):
            import warnings

            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(curves, 0)
            sd = np.nanstd(curves, 0, ddof=1) if len(curves) > 1 else np.zeros_like(mean)
        ax.plot(grid / div, 100 * mean, ls, c=color, label=f"{g['group']} (n={g['runs']})")
        ax.fill_between(
            grid / div, 100 * (mean - 2 * sd), 100 * (mean + 2 * sd), color=color, alpha=0.15, lw=0
        )
    _finish_axes(
        ax,
        unit,
        "test accuracy of the best by validation (%)",
        "Repeatability and controls (mean ± 2σ over runs)",
    )
    _save(fig, out)

"""The paper's figures as PNGs (matplotlib's Agg canvas; no pyplot, no global state).

Drawing only: everything drawn is passed in (records, diagrams, history); nothing is read here.

- Figure 1: every individual as a dot (wall time vs validation accuracy), alive ones
  highlighted, the best's ancestry traced and some ancestors' architectures listed, and the
  run's `adjust` events (mutation-rate periods, weight resets) as vertical lines.
- Figure 2: test accuracy of the best-by-validation individual over wall time.
- Compare: Figure-2 curves of several runs grouped (e.g. five seeds of evolution, the random
  search and no-inheritance controls) with mean ± 2σ bands (`evojax_nas.compare` measures).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence

import numpy as np

from evojax_nas.records import ancestry, run_start

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


def _figure(**kwargs):
    """A figure on its own Agg canvas: no pyplot, no backend switch, nothing to close."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


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


def figure1(
    records: Sequence[dict],
    best_id: str,
    path: str,
    *,
    diagram: Callable[[str], str],
    history: Sequence[dict] = (),
    name: str = "",
) -> list[dict]:
    """Draws Figure 1 into `path`; returns the ancestors listed under the plot.

    Args:
        records: the run's trained records, oldest first.
        best_id: the best individual by validation (its ancestry is traced).
        path: the PNG to write.
        diagram: an individual's architecture in the paper's notation, by ID.
        history: the run's `adjust` events (meta `history`).
        name: the run's name, for the title.
    """
    start = run_start(records)
    div, unit = time_unit(records[-1]["born"] - start)
    t = lambda r: (r["born"] - start) / div  # noqa: E731
    lineage = ancestry(records, best_id)
    shown = pick_ancestors(lineage)
    lines = []
    for letter, r in zip("ABCDEFGH", shown, strict=False):
        arch = diagram(r["id"])
        head = f"{letter}  {r['id']}  val {100 * r['val_accuracy']:.1f}%  "
        lines += textwrap.wrap(head + arch, 120, subsequent_indent=" " * 6)
    extra = 0.17 * len(lines) + 0.3  # inches for the architecture list
    fig = _figure(figsize=(11, 6 + extra))
    ax, text = fig.subplots(2, 1, gridspec_kw={"height_ratios": [6, extra]})
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
    _draw_history(ax, history, start, div)
    title = f"Progress of the run {name}: {len(records)} individuals"
    _finish_axes(ax, unit, "validation accuracy (%)", title)
    text.axis("off")
    text.text(
        0, 1, "\n".join(lines), va="top", family="monospace", fontsize=7.5, transform=text.transAxes
    )
    _save(fig, path)
    return shown


def _draw_history(ax, history: Sequence[dict], start: float, div: float) -> None:
    """Vertical lines (and shaded periods) for the `adjust` events of the run."""
    for event in history:
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
    end_s = max([end_s or 0.0, *(p["time_s"] for p in series)])
    series = [*series, {**series[-1], "time_s": end_s}] if series else []
    div, unit = time_unit(end_s)
    fig = _figure(figsize=(8, 5))
    ax = fig.subplots()
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


def _nan_mean_sd(curves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and σ (ddof 1; 0 for one curve) over axis 0 ignoring NaN, NaN where nothing is
    measured — computed without raising or silencing warnings."""
    ok = ~np.isnan(curves)
    n = ok.sum(0)
    total = np.where(ok, curves, 0.0).sum(0)
    mean = np.divide(total, n, out=np.full(n.shape, np.nan), where=n > 0)
    if len(curves) < 2:
        return mean, np.zeros_like(mean)
    sq = np.where(ok, (curves - mean) ** 2, 0.0).sum(0)
    sd = np.sqrt(np.divide(sq, n - 1, out=np.full(n.shape, np.nan), where=n > 1))
    return mean, sd


def curve(series: Sequence[dict], grid: np.ndarray) -> np.ndarray:
    """A run's Figure-2 value at each time of `grid` (NaN before its first measured point)."""
    out = np.full(grid.shape, np.nan)
    for p in series:
        if p["test_accuracy"] is not None:
            out[grid >= p["time_s"]] = p["test_accuracy"]
    return out


def compare_plot(runs: Sequence[dict], groups: Sequence[dict], out: str) -> None:
    """Figure-2 curves of several runs, grouped, with mean ± 2σ bands (σ over the group's runs)."""
    end = max(3600 * r["wall_hours"] for r in runs)
    div, unit = time_unit(end)
    grid = np.linspace(0, end, 300)
    fig = _figure(figsize=(8, 5))
    ax = fig.subplots()
    for i, g in enumerate(groups):
        color, ls = STYLES.get(g["group"], (f"C{i + 3}", "-"))
        curves = np.array([curve(r["progress"], grid) for r in runs if r["group"] == g["group"]])
        mean, sd = _nan_mean_sd(curves)
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

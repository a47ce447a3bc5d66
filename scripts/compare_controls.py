"""Evolution vs the paper's two controls (random search, no weight inheritance), several seeds.

    .venv/bin/python scripts/compare_controls.py --out runs/controls
    .venv/bin/python scripts/compare_controls.py --out runs/sweep --sweep-steps 50,100,200,400

Defaults: 3 seeds x 3 groups, each run 2 minutes of wall time with 2 worker processes on the
embedded MNIST digits (population 10, 200 steps per child): about 22 minutes on 2 CPU cores,
then `compare` (the test split is read there, and only there). Runs go one after another,
interleaved by seed, so that a change in machine load falls on every group alike. As in the
paper (§4), every run gets the same wall time on the same hardware. A run whose store already
exists is not run again (so an interrupted comparison can be finished).

Printed: the `compare` table, each group's best validation and test accuracy (mean and σ over
seeds), and for each control the difference of its mean from evolution's with a 95% confidence
interval (Welch's t; needs ≥ 2 seeds per group).

`--sweep-steps` is the paper's Figure 3 (right) in miniature: evolution (or the `--groups`
chosen) at each number of training steps per child, same seeds, same wall time per run; it
writes OUT/sweep.png (accuracy against steps per child, mean ± σ over seeds) and a table.
With 4 step counts and 3 seeds at 2 minutes a run, that is 24 minutes.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from evojax_nas.devices import apply_cpu_only_environment

apply_cpu_only_environment()  # before JAX is imported: no libtpu warnings on a CPU host

from evojax_nas.compare import compare  # noqa: E402
from evojax_nas.config import from_dict, load_config  # noqa: E402
from evojax_nas.plots import STYLES  # noqa: E402
from evojax_nas.runner import evolve  # noqa: E402
from evojax_nas.store import open_store  # noqa: E402

GROUPS = {  # name -> config changes
    "evolution": {"selection": "tournament", "inheritance": True},
    "random search": {"selection": "random", "inheritance": True},
    "no inheritance": {"selection": "tournament", "inheritance": False},
}
SLUG = {"evolution": "evolution", "random search": "random", "no inheritance": "noinherit"}
BY_SLUG = {slug: name for name, slug in SLUG.items()}
CONTROL = "evolution"  # the group every other one is compared with


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/controls", help="parent directory of the runs")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--minutes", type=float, default=2.0, help="wall time per run")
    p.add_argument("--max-children", type=int, default=None, help="also stop after N children")
    p.add_argument("--population", type=int, default=10)
    p.add_argument("--steps", type=int, default=200, help="training steps per child")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="any other config field, e.g. --set mutations_per_child=2 (repeatable)",
    )
    p.add_argument(
        "--groups",
        help=f"comma-separated, of {','.join(SLUG.values())} (default: all; with "
        "--sweep-steps: evolution)",
    )
    p.add_argument(
        "--sweep-steps",
        help="comma-separated steps per child, e.g. 50,100,200,400: Figure 3 (right)",
    )
    p.add_argument("--plot", default=None, help="compare PNG (default OUT/compare.png)")
    args = p.parse_args(argv)
    try:
        args.sweep = [int(s) for s in args.sweep_steps.split(",")] if args.sweep_steps else None
        args.extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    except ValueError as e:
        p.error(f"--sweep-steps takes integers, --set FIELD=JSON: {e}")
    default = "evolution" if args.sweep else ",".join(SLUG.values())
    slugs = (args.groups or default).split(",")
    if unknown := [s for s in slugs if s not in BY_SLUG]:
        p.error(f"unknown --groups {unknown}; choose from {','.join(SLUG.values())}")
    args.group_names = [BY_SLUG[s] for s in slugs]
    return args


def run_config(group: str, seed: int, steps: int, args: argparse.Namespace):
    """The quick config with this script's budget and the group's selection/inheritance."""
    changes = {
        "dataset": args.dataset,
        "population": args.population,
        "steps": steps,
        "workers": args.workers,
        "seed": seed,
        "max_children": args.max_children,
        "max_minutes": args.minutes,
        **args.extra,
        **GROUPS[group],
    }
    return from_dict(load_config("quick").to_dict() | changes)


def run_one(url: str, group: str, seed: int, steps: int, args: argparse.Namespace) -> None:
    if os.path.exists(os.path.join(url, "config.json")):
        logging.warning("%s exists: not run again", url)
        return
    start = time.time()
    # Each run with an empty persistent XLA cache of its own (layer-wise workers use one):
    # a run must not start with the programs an earlier run of the comparison compiled.
    with tempfile.TemporaryDirectory(prefix="xla-") as xla:
        before = os.environ.get("EVOJAX_NAS_XLA_CACHE")
        os.environ["EVOJAX_NAS_XLA_CACHE"] = xla
        try:
            progress = evolve(url, run_config(group, seed, steps, args), out=io.StringIO())
        finally:
            if before is None:
                os.environ.pop("EVOJAX_NAS_XLA_CACHE", None)
            else:
                os.environ["EVOJAX_NAS_XLA_CACHE"] = before
    logging.warning(
        "%-15s %4d steps, seed %d: %d children, best val %.4f, %.1f min",
        group,
        steps,
        seed,
        progress.children,
        progress.best,
        (time.time() - start) / 60,
    )


def plan(args: argparse.Namespace) -> list[dict]:
    """Every run, interleaved by seed (then steps, then group): url, group, steps, seed, label."""
    runs = []
    for seed in range(args.seeds):
        for steps in args.sweep or [args.steps]:
            for group in args.group_names:
                name = f"{SLUG[group]}-s{seed}" + (f"-steps{steps}" if args.sweep else "")
                label = f"{group}, {steps} steps" if args.sweep else group
                runs.append(
                    {
                        "url": os.path.join(args.out, name),
                        "group": group,
                        "steps": steps,
                        "seed": seed,
                        "label": label,
                    }
                )
    return runs


# --------------------------------------------------------------------------- statistics


def t_quantile(p: float, df: float) -> float:
    """Student's t quantile (0.5 < p < 1, df > 0), numpy only: bisection on the integrated pdf."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t: float) -> float:
        x = np.linspace(0.0, t, 4001)
        y = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
        return 0.5 + float(np.sum((y[:-1] + y[1:]) / 2) * (x[1] - x[0]))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def summary(values: Sequence[float | None]) -> dict:
    """n, mean and σ (ddof 1; None for fewer than 2) of the values that are not None."""
    v = np.array([x for x in values if x is not None], dtype=float)
    return {
        "n": len(v),
        "mean": float(v.mean()) if len(v) else None,
        "std": float(v.std(ddof=1)) if len(v) > 1 else None,
    }


def welch(a: Sequence[float | None], b: Sequence[float | None], level: float = 0.95) -> dict:
    """mean(a) − mean(b) with its Welch confidence interval; interval None for < 2 values each."""
    sa, sb = summary(a), summary(b)
    out = {"diff": None, "low": None, "high": None, "df": None}
    if sa["mean"] is None or sb["mean"] is None:
        return out
    out["diff"] = sa["mean"] - sb["mean"]
    if sa["n"] < 2 or sb["n"] < 2:
        return out
    va, vb = sa["std"] ** 2 / sa["n"], sb["std"] ** 2 / sb["n"]
    se = math.sqrt(va + vb)
    if se == 0:
        return out | {"low": out["diff"], "high": out["diff"]}
    df = (va + vb) ** 2 / (va**2 / (sa["n"] - 1) + vb**2 / (sb["n"] - 1))
    half = t_quantile(0.5 + level / 2, df) * se
    return out | {"low": out["diff"] - half, "high": out["diff"] + half, "df": df}


def statistics(runs: Sequence[dict]) -> dict:
    """Per label: best validation and test accuracy over seeds; per control: Welch vs evolution.

    `runs` are `plan` entries with "val" and "test" (the run's best by validation) filled in.
    """
    labels = list(dict.fromkeys(r["label"] for r in runs))
    groups = {
        label: {
            "steps": next(r["steps"] for r in runs if r["label"] == label),
            "group": next(r["group"] for r in runs if r["label"] == label),
            "val": summary([r["val"] for r in runs if r["label"] == label]),
            "test": summary([r["test"] for r in runs if r["label"] == label]),
        }
        for label in labels
    }
    diffs = []
    for label, g in groups.items():
        ref = [r for r in runs if r["group"] == CONTROL and r["steps"] == g["steps"]]
        if g["group"] == CONTROL or not ref:
            continue
        mine = [r for r in runs if r["label"] == label]
        diffs.append(
            {
                "label": label,
                "versus": next(r["label"] for r in ref),
                **{m: welch([r[m] for r in ref], [r[m] for r in mine]) for m in ("val", "test")},
            }
        )
    return {"groups": groups, "differences": diffs}


def stat_lines(stats: dict) -> list[str]:
    """The statistics as text: accuracies in %, σ over seeds, 95% intervals."""
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
    lines = [
        "| runs | n | best val. mean (%) | σ | test mean (%) | σ |",
        "|---|---|---|---|---|---|",
    ]
    for label, g in stats["groups"].items():
        v, t = g["val"], g["test"]
        lines.append(
            f"| {label} | {v['n']} | {pct(v['mean'])} | {pct(v['std'])} | {pct(t['mean'])} "
            f"| {pct(t['std'])} |"
        )
    for d in stats["differences"]:
        for m, name in (("val", "best val."), ("test", "test")):
            w = d[m]
            ci = f"[{pct(w['low'])}, {pct(w['high'])}]" if w["low"] is not None else "n/a"
            lines.append(
                f"{d['versus']} − {d['label']}, {name}: {pct(w['diff'])} points, "
                f"95% CI {ci} (Welch)"
            )
    return lines


# --------------------------------------------------------------------------- sweep plot


def plot_sweep(stats: dict, out: str) -> None:
    """Figure 3 (right) in miniature: accuracy against training steps per child."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, group in enumerate(dict.fromkeys(g["group"] for g in stats["groups"].values())):
        gs = sorted(
            (g for g in stats["groups"].values() if g["group"] == group), key=lambda g: g["steps"]
        )
        color, _ = STYLES.get(group, (f"C{i + 3}", "-"))
        for metric, ls, marker in (("val", "-", "o"), ("test", "--", "s")):
            pts = [(g["steps"], g[metric]) for g in gs if g[metric]["mean"] is not None]
            if not pts:
                continue
            x = [s for s, _ in pts]
            y = [100 * m["mean"] for _, m in pts]
            err = [100 * (m["std"] or 0.0) for _, m in pts]
            name = "best validation" if metric == "val" else "its test accuracy"
            ax.errorbar(
                x, y, yerr=err, fmt=ls + marker, c=color, capsize=3, label=f"{group}: {name}"
            )
    ax.set_xscale("log", base=2)
    ticks = sorted({g["steps"] for g in stats["groups"].values()})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("training steps per child")
    ax.set_ylabel("accuracy (%), mean ± σ over seeds")
    ax.set_title("Accuracy against training steps per child (cf. paper Figure 3, right)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    runs = plan(args)
    for r in runs:
        run_one(r["url"], r["group"], r["seed"], r["steps"], args)
        r["url"] = open_store(r["url"]).url
    plot = args.plot or os.path.join(args.out, "compare.png")
    result = compare([r["url"] for r in runs], labels=[r["label"] for r in runs], out=plot)
    for r, s in zip(runs, result["runs"], strict=True):
        r["val"], r["test"] = s["best_val_accuracy"], s["best_test_accuracy"]
    stats = statistics(runs)
    steps = ",".join(map(str, args.sweep)) if args.sweep else args.steps
    print(
        f"{args.seeds} seeds x {len(args.group_names)} groups, {args.minutes} min per run"
        + (f" (at most {args.max_children} children)" if args.max_children is not None else "")
        + f", {args.workers} workers, population {args.population}, {steps} steps/child, "
        f"{args.dataset}" + (f", {json.dumps(args.extra)}" if args.extra else "")
    )
    for warning in result.get("warnings", []):
        if not (args.sweep and "steps" in warning):  # a sweep differs in steps on purpose
            print(f"warning: {warning}")
    print(result["table"])
    print("\n".join(stat_lines(stats)))
    print(f"plot: {plot}")
    if args.sweep:
        sweep_png = os.path.join(args.out, "sweep.png")
        plot_sweep(stats, sweep_png)
        print(f"sweep plot: {sweep_png}")
    with open(os.path.join(args.out, "statistics.json"), "w", encoding="utf-8") as f:
        json.dump({"runs": runs, **stats}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

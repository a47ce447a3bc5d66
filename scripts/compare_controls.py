"""Evolution vs the paper's two controls (random search, no weight inheritance), several seeds.

    .venv/bin/python scripts/compare_controls.py --out runs/controls

Defaults: 3 seeds x 3 groups, each run 2 minutes of wall time with 2 worker processes on the
embedded MNIST digits (population 10, 200 steps per child): about 22 minutes on 2 CPU cores,
then `compare` (the test split is read there, and only there). Runs go one after another,
interleaved by seed, so that a change in machine load falls on every group alike. As in the
paper (§4), every run gets the same wall time on the same hardware. A run whose store already
exists is not run again (so an interrupted comparison can be finished).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import os
import sys
import time

from evojax_nas.config import load_config
from evojax_nas.plots import compare
from evojax_nas.runner import evolve
from evojax_nas.store import open_store

GROUPS = {  # name -> config changes
    "evolution": {"selection": "tournament", "inheritance": True},
    "random search": {"selection": "random", "inheritance": True},
    "no inheritance": {"selection": "tournament", "inheritance": False},
}
SLUG = {"evolution": "evolution", "random search": "random", "no inheritance": "noinherit"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/controls", help="parent directory of the runs")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--minutes", type=float, default=2.0, help="wall time per run")
    p.add_argument("--population", type=int, default=10)
    p.add_argument("--steps", type=int, default=200, help="training steps per child")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--plot", default=None, help="compare PNG (default OUT/compare.png)")
    return p.parse_args(argv)


def run_one(url: str, group: str, seed: int, args: argparse.Namespace) -> None:
    if os.path.exists(os.path.join(url, "config.json")):
        logging.warning("%s exists: not run again", url)
        return
    cfg = dataclasses.replace(
        load_config("quick"),
        dataset=args.dataset,
        population=args.population,
        steps=args.steps,
        workers=args.workers,
        seed=seed,
        max_children=None,
        max_minutes=args.minutes,
        **GROUPS[group],
    )
    start = time.time()
    progress = evolve(url, cfg, out=io.StringIO())
    logging.warning(
        "%-15s seed %d: %d children, best val %.4f, %.1f min",
        group,
        seed,
        progress.children,
        progress.best,
        (time.time() - start) / 60,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    urls, labels = [], []
    for seed in range(args.seeds):
        for group in GROUPS:
            url = os.path.join(args.out, f"{SLUG[group]}-s{seed}")
            run_one(url, group, seed, args)
            urls.append(open_store(url).url)
            labels.append(group)
    plot = args.plot or os.path.join(args.out, "compare.png")
    result = compare(urls, labels=labels, out=plot)
    print(
        f"{args.seeds} seeds x {len(GROUPS)} groups, {args.minutes} min per run, "
        f"{args.workers} workers, population {args.population}, {args.steps} steps/child, "
        f"{args.dataset}"
    )
    print(result["table"])
    print(f"plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

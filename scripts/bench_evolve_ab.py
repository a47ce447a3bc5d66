"""Children per minute of the default job: this checkout against another one, side by side.

    git worktree add ../base <commit>      # the code to compare against
    .venv/bin/python scripts/bench_evolve_ab.py --baseline ../base --minutes 3 --rounds 2
    .venv/bin/python scripts/bench_evolve_ab.py --baseline . --this-args=--train-impl=layerwise

Each round runs `evojax-nas evolve` (the quick config, its 2 workers, the given wall time, no
child budget) from the baseline checkout and from this one, in alternating order, with the
same seed and an empty XLA cache of its own, so that a change in machine load falls on both
alike. It prints children per minute of each run and the ratio this / baseline per round.
Both use this venv's packages; only the `evojax_nas` source differs (PYTHONPATH), and
`--this-args` (more `evolve` arguments for this checkout only: the baseline can be this
checkout itself, to compare two settings). The runs evolve their own populations: children per
minute follows the sizes of the nets a run grows, so each run's distinct architectures and
mean convolutions per child are printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def born_records(store: str) -> list[dict]:
    """Records of individuals trained and published, in a local store."""
    out = []
    for ind in os.listdir(os.path.join(store, "inds")):
        try:
            with open(os.path.join(store, "inds", ind, "record.json"), encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if "born" in record:
            out.append(record)
    return out


def describe(records: list[dict]) -> str:
    archs = len({r.get("architecture_key") for r in records})
    convs = [str(r.get("architecture", "")).count("C") for r in records]
    return f"{archs} architectures, {statistics.fmean(convs or [0]):.1f} convs/child"


def run(source: str, out: str, minutes: float, seed: int, xla: str, extra: list[str]) -> list:
    env = dict(os.environ, PYTHONPATH=source, EVOJAX_NAS_XLA_CACHE=xla)
    cmd = [sys.executable, "-m", "evojax_nas.cli", "evolve", "--out", out]
    cmd += ["--max-minutes", str(minutes), "--max-children", "100000", "--seed", str(seed)]
    subprocess.run(cmd + extra, env=env, check=True, stdout=subprocess.DEVNULL, cwd=source)
    return born_records(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="checkout of the code to compare against")
    p.add_argument("--minutes", type=float, default=3.0, help="wall time of each run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--this-args", default="", help="more `evolve` arguments for this one only")
    p.add_argument("extra", nargs="*", help="more `evolve` arguments for both (after --)")
    args = p.parse_args(argv)
    base = os.path.abspath(args.baseline)
    ratios = []
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        for r in range(args.rounds):
            order = [("baseline", base), ("this", HERE)]
            rates = {}
            for name, source in order if r % 2 == 0 else order[::-1]:
                out, xla = os.path.join(tmp, f"{name}-{r}"), os.path.join(tmp, f"xla-{name}-{r}")
                extra = args.extra + (args.this_args.split() if name == "this" else [])
                records = run(source, out, args.minutes, r, xla, extra)
                rates[name] = len(records) / args.minutes
                print(
                    f"round {r} {name:<8} {rates[name]:6.1f} children/min ({describe(records)})",
                    flush=True,
                )
            ratios.append(rates["this"] / rates["baseline"])
            print(f"round {r} ratio this/baseline {ratios[-1]:.2f}", flush=True)
    print(f"median ratio over {len(ratios)} rounds: {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compiling the next child in the background on a CPU: does it pay with the default job's workers?

    .venv/bin/python scripts/bench_lookahead.py --run RUN --limit 300      # a run's two workers
    .venv/bin/python scripts/bench_lookahead.py --tiny --json              # seconds: the test's

`background_compile` (`evolution.background_compile`, the worker's lookahead) builds the next
child's programs on a thread while the current child trains. On an accelerator that hides the
compiler; on a CPU the compile thread shares the cores with training. This benchmark measures
what it does to layer-wise workers (`train_impl: "layerwise"`, the default job's), controlled:
each of `--workers` processes, started together as a run's workers are, replays the children
one worker of `--run` trained, in the order they were born (repeated architectures included:
those reuse the worker's compiled layers, as in the run), and for each builds its layer-wise
net (compiling the layer signatures it has not seen), trains `--steps` steps on synthetic
batches in the dataset's layout and evaluates it. Once with the lookahead off (each net built
when its child starts), once on (the next child's net built on a thread while the current one
trains); `--rounds` times, the two orders alternating, so that a change in machine load falls
on both. JAX's persistent compilation cache is off, and the workers do not share layer programs
(in a run they do, through its store: the same for both modes).

Printed for each mode: children per minute (all workers' children over the slowest worker's
wall time; median over rounds), seconds waiting for nets (the compile a child waits for),
training and evaluation seconds, the share of wall time not training, the compile seconds of
the workers' caches; and the ratio on ÷ off of children per minute. The correct answers of
every child must be the same both ways (the same nets and data), or the script fails.
Without `--run`, the workers share out a seeded mutation chain (every child a new
architecture). Measured figures: README, "Compiling: once per architecture per run".
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_layerwise  # noqa: E402  (a sibling script: Bench, chain_dnas)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", metavar="DIR", help="a local run directory: its workers' children")
    p.add_argument("--limit", type=int, default=300, help="children per worker at most")
    p.add_argument("--workers", type=int, default=2, help="processes started together")
    p.add_argument("--rounds", type=int, default=2, help="off/on pairs, order alternating")
    p.add_argument("--steps", type=int, default=200, help="training steps per child")
    p.add_argument("--mutations", type=int, default=80, help="seeded chain length (no --run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", choices=("mnist5k", "digits8x8"), default="mnist5k")
    p.add_argument("--tiny", action="store_true", help="a few tiny children (the test)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    # internal: one worker process of a round
    p.add_argument("--replay-worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--lookahead", choices=("off", "on"), default="off", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.mutations, args.steps, args.limit, args.dataset = 10, 4, 4, "digits8x8"
    return args


def worker_dnas(args, worker: int) -> list:
    """The children `worker` replays: the run's worker's, born order, or its share of a chain."""
    from evojax_nas import dna as D

    if not args.run:
        chain = bench_layerwise.chain_dnas(args.mutations, args.seed, 1, 10)
        return chain[worker :: args.workers][: args.limit]
    born = []
    for path in glob.glob(os.path.join(args.run, "inds", "*", "record.json")):
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if record.get("worker") == worker and record.get("born"):
            born.append((record["born"], os.path.dirname(path)))
    if not born:
        raise SystemExit(f"{args.run}: no children of worker {worker}")
    born.sort()
    return [D.load(os.path.join(ind, "dna.json")) for _, ind in born[: args.limit]]


def replay(dnas: list, dataset: str, steps: int, lookahead: bool, seed: int = 0) -> dict:
    """Builds, trains and evaluates `dnas` one after the other, as a worker does; with
    `lookahead`, each next net is built on a thread while the current child trains."""
    import jax

    from evojax_nas import dna as D
    from evojax_nas.model import init_variables

    b = bench_layerwise.Bench(dataset, steps, seed)
    classes = 10
    dnas = [D.for_data(d, b.image[-1], classes) for d in dnas]
    out = {"wait": 0.0, "train": 0.0, "eval": 0.0, "correct": []}
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lookahead")
    t0 = time.perf_counter()
    current = pool.submit(b.net, dnas[0]) if lookahead else None
    for i, dna in enumerate(dnas):
        variables = init_variables(dna, jax.random.fold_in(b.key, i))
        following = None
        if lookahead and i + 1 < len(dnas):  # queued: built once this child's net is ready
            following = pool.submit(b.net, dnas[i + 1])
        row = b._run(variables, current.result if lookahead else lambda dna=dna: b.net(dna))
        current = following
        out["wait"] += row["compile"]
        out["train"] += row["train"]
        out["eval"] += row["eval"]
        out["correct"].append(row["correct"])
    pool.shutdown()
    out["wall"] = time.perf_counter() - t0
    out.update(children=len(dnas), signatures=len(b.cache), compile=b.cache.seconds)
    return out


def run_round(args, lookahead: str) -> list[dict]:
    """The workers of one round, started together; each one's replay."""
    argv = [sys.executable, os.path.abspath(__file__), "--lookahead", lookahead]
    for name in ("run", "limit", "workers", "steps", "mutations", "seed", "dataset"):
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name}", str(value)]
    procs = [
        subprocess.Popen(
            [*argv, "--replay-worker", str(w)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for w in range(args.workers)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"a replay worker failed:\n{stderr.decode()[-2000:]}")
        results.append(json.loads(stdout))
    return results


def summarise(rounds: dict) -> dict:
    """Per mode, the medians over rounds of the workers' totals; the on ÷ off ratio."""
    out = {}
    for mode, runs in rounds.items():
        per_round = []
        for workers in runs:
            wall = max(w["wall"] for w in workers)
            total = {k: sum(w[k] for w in workers) for k in ("wait", "train", "eval", "compile")}
            walls = sum(w["wall"] for w in workers)
            per_round.append(
                {
                    "children_per_minute": 60 * sum(w["children"] for w in workers) / wall,
                    "non_training_share": 1 - total["train"] / walls,
                    **total,
                    "wall": wall,
                }
            )
        out[mode] = {k: statistics.median(r[k] for r in per_round) for k in per_round[0]}
        out[mode]["rounds"] = per_round
    out["ratio_on_over_off"] = out["on"]["children_per_minute"] / out["off"]["children_per_minute"]
    return out


def main(argv=None) -> int:
    from evojax_nas.devices import apply_cpu_only_environment

    apply_cpu_only_environment()  # before JAX is imported: no libtpu warnings on a CPU host
    args = parse_args(argv)
    if args.replay_worker is not None:
        import jax

        jax.config.update("jax_enable_compilation_cache", False)  # every compile a real one
        dnas = worker_dnas(args, args.replay_worker)
        res = replay(dnas, args.dataset, args.steps, args.lookahead == "on", args.seed)
        print(json.dumps(res))
        return 0
    rounds: dict = {"off": [], "on": []}
    for r in range(args.rounds):
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            rounds[mode].append(run_round(args, mode))
    differ = [
        (r, w)
        for r in range(args.rounds)
        for w in range(args.workers)
        if rounds["off"][r][w]["correct"] != rounds["on"][r][w]["correct"]
    ]
    out = {
        "source": f"run {args.run}" if args.run else f"seeded chain ({args.mutations})",
        "workers": args.workers,
        "steps": args.steps,
        **summarise(rounds),
        "same_answers": not differ,
        "load_average": os.getloadavg(),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['source']}: {args.workers} workers, {args.steps} steps per child")
        for mode in ("off", "on"):
            m = out[mode]
            print(
                f"  lookahead {mode:3s}: {m['children_per_minute']:7.1f} children/min  "
                f"waiting for nets {m['wait']:6.1f} s  train {m['train']:6.1f} s  "
                f"eval {m['eval']:5.1f} s  compile {m['compile']:6.1f} s  "
                f"not training {100 * m['non_training_share']:.1f} %"
            )
        print(f"  on / off: {out['ratio_on_over_off']:.2f}x children per minute")
        print("load average " + " ".join(f"{x:.2f}" for x in out["load_average"]))
    if differ:
        print(f"the correct answers differ between the modes: {differ}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

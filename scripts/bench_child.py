"""Where a worker's time goes while it produces children, and what compiling costs on TPU.

    .venv/bin/python scripts/bench_child.py                        # quick config, ~3 min
    .venv/bin/python scripts/bench_child.py --lookahead both       # background compile off/on
    .venv/bin/python scripts/bench_child.py --platform tpu         # TPU v4 compiles, no TPU
    .venv/bin/python scripts/bench_child.py --tiny                 # seconds: the test's mode
    .venv/bin/python scripts/bench_child.py --concurrent 2 --rounds 3  # cores shared or not

CPU (default; on a host with a GPU, JAX's default device is the GPU and it runs there): one
worker, in this process, produces `--children` children from a seeded sequence of events of the
quick config (mnist5k, 200 steps per child, population 10, the training implementation `auto`
picks: layer-wise on a CPU or GPU at 200 steps) into a fresh local
store, exactly as `evojax-nas worker` does (data on the device once; with `--train-impl whole`,
programs shared through the store). It prints the wall time split into selection, parent load,
mutation, compiled programs (compile, load or wait), training, evaluation, download and
publish; how each child got its programs (memory / shared / compiled / layers); the
non-training share of the worker's time, measured and projected to the paper's 25,600 steps per
child (the per-step time is the one measured here); and, for whole programs, what a *second*
worker (a new process) pays to load every architecture the first compiled, and how much
storage the programs take.

`--concurrent N` runs N such workers at once, each a process of its own with its own seed
(`--seed` + i) and store, as `evojax-nas evolve` runs N local workers: alternately unpinned and
each kept to its share of the cores (`devices.with_cpu_shares`, what `evolve` does on a CPU),
`--rounds` times, and prints the children per minute of all N together in each round and the
ratio pinned / unpinned.

`--platform tpu` compiles the train and eval programs of a seeded chain of 20 mutations for a
TPU v4 chip on this machine (libtpu from the `tpu` extra; nothing runs) and reports per-program
TPU compile seconds, XLA's TPU FLOPs and memory.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PAPER_STEPS = 25_600


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--platform", choices=("cpu", "tpu"), default="cpu")
    p.add_argument("--children", type=int, default=60, help="children to produce (CPU)")
    p.add_argument("--steps", type=int, default=200, help="training steps per child (CPU)")
    p.add_argument("--population", type=int, default=10)
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mutations", type=int, default=20, help="chain length (TPU)")
    p.add_argument("--topology", default="v4:2x2x1", help="TPU topology (TPU)")
    p.add_argument(
        "--lookahead",
        choices=("on", "off", "both"),
        default="off",
        help="background compile of the next child (both: off and on, each in a new process)",
    )
    p.add_argument(
        "--train-impl",
        choices=("auto", "whole", "layerwise", "both"),
        default="auto",
        help="the config's train_impl; auto (the default job's) is reported as what it chose "
        "(both: whole and layerwise, each in a new process)",
    )
    p.add_argument(
        "--publish",
        choices=("background", "inline"),
        default="background",
        help="publish each child on a background thread, as worker processes do, or in place",
    )
    p.add_argument(
        "--concurrent",
        type=int,
        metavar="N",
        help="N workers at once, each in its own process, pinned to their cores and not (CPU)",
    )
    p.add_argument("--rounds", type=int, default=2, help="unpinned/pinned rounds (--concurrent)")
    p.add_argument("--tiny", action="store_true", help="a few tiny children (for the test)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--second-worker", metavar="STORE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.children, args.steps, args.population = 4, 3, 2
        args.dataset, args.mutations, args.rounds = "digits8x8", 1, 1
    if args.concurrent is not None and (args.concurrent < 1 or args.platform != "cpu"):
        p.error("--concurrent takes a positive number of workers, on the CPU")
    return args


# ------------------------------------------------------------------------------- CPU worker


class TimedStore:
    """The store, with the seconds spent in `publish` (checkpoint + record + marker) added up."""

    def __init__(self, store):
        self._store, self.publish_seconds = store, []

    def __getattr__(self, name):
        return getattr(self._store, name)

    def publish(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._store.publish(*args, **kwargs)
        finally:
            self.publish_seconds.append(time.perf_counter() - t0)


def run_worker_bench(args, root: str, lookahead: bool, train_impl: str) -> dict:
    """Produces `args.children` children in a fresh store; returns the breakdown."""
    import dataclasses

    from evojax_nas.app import open_run
    from evojax_nas.config import load_config
    from evojax_nas.evolution import Worker, run_worker
    from evojax_nas.programs import CompileCounter
    from evojax_nas.store import open_store

    cfg = dataclasses.replace(
        load_config("quick"),
        dataset=args.dataset,
        steps=args.steps,
        population=args.population,
        seed=args.seed,
        max_children=None,
        max_minutes=None,
        workers=1,
        train_impl=train_impl,
    )
    store = open_store(root)
    store.write_config(cfg.to_dict())
    timed = TimedStore(store)
    t0 = time.perf_counter()
    task = open_run(store).task  # the dataset, loaded as a worker process loads it
    evaluator = task.evaluator()
    setup = time.perf_counter() - t0
    worker = Worker(
        timed,
        task.cfg,
        0,
        evaluator,
        task.input_channels,
        task.num_classes,
        background_publish=args.publish == "background",
    )
    with CompileCounter() as compiles:
        t0 = time.perf_counter()
        run_worker(worker, max_children=args.children, deadline=None, lookahead=lookahead)
        wall = time.perf_counter() - t0
    evaluator.cache.close()
    records = [r for r in store.records() if r.get("born")]
    phases = collections.Counter()
    for r in records:
        for name, seconds in (r.get("timings") or {}).items():
            phases[name] += seconds
    phases["publish"] = sum(timed.publish_seconds)
    # In the background, publishing overlaps the next child: it is not on the worker's path.
    accounted = sum(phases.values()) - phases["publish"] * (args.publish == "background")
    phases["other"] = max(0.0, wall - accounted)  # heartbeats, gc, abandoned events, overlap
    steps = sum(r.get("steps", 0) for r in records)
    per_step = phases["train"] / max(steps, 1)
    overhead = wall - phases["train"]
    n = len(records)
    paper_share = (overhead / n) / (overhead / n + per_step * PAPER_STEPS) if n else None
    return {
        "lookahead": lookahead,
        "publish": args.publish,
        "train_impl": train_impl,
        "children": n,
        "wall_seconds": wall,
        "setup_seconds": setup,
        "children_per_minute": n / (wall / 60),
        "phases_seconds": dict(phases),
        "programs": dict(collections.Counter(r.get("programs", "?") for r in records)),
        "distinct_architectures": len({r.get("architecture_key") for r in records}),
        "backend_compiles": compiles.count,
        "train_seconds_per_step": per_step,
        "non_training_share": overhead / wall,
        "non_training_share_at_paper_steps": paper_share,
        "program_bytes": _tree_bytes(os.path.join(root, "programs")),
        "cpus": ",".join(map(str, sorted(os.sched_getaffinity(0)))),  # the cores it ran on
    }


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def second_worker(root: str) -> dict:
    """In a new process: loads the programs of every architecture of the run from its store."""
    from evojax_nas.app import open_run
    from evojax_nas.dna import from_dict as dna_from_dict
    from evojax_nas.evolution import program_cache, train_config
    from evojax_nas.train import DeviceData

    run = open_run(root)
    store, cfg = run.store, run.cfg
    layout = DeviceData.upload(run.task.dataset, cfg.eval_batch_size).layout
    cache, tc = program_cache(store, cfg), train_config(cfg)
    seen, seconds, sources = set(), [], collections.Counter()
    for r in store.records():
        if r.get("architecture_key") in seen or not r.get("born"):
            continue
        seen.add(r.get("architecture_key"))
        dna = dna_from_dict(store.read_dna(r["id"]))
        t0 = time.perf_counter()
        sources[cache.get(dna, layout, tc).source] += 1
        seconds.append(time.perf_counter() - t0)
    return {"architectures": len(seen), "sources": dict(sources), "seconds": seconds}


def _worker_command(args, **flags) -> list[str]:
    """This script in a fresh process, printing JSON: one CPU worker with `args`' settings,
    `flags` (e.g. ``seed=1``) replacing some."""
    names = ("children", "steps", "population", "dataset", "seed", "publish", "train_impl")
    settings = {**{k: getattr(args, k) for k in names}, **flags}
    options = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    return [sys.executable, os.path.abspath(__file__), "--json", *options]


def cpu_main(args) -> dict:
    lookaheads = {"off": [False], "on": [True], "both": [False, True]}[args.lookahead]
    from evojax_nas.evolution import resolve_train_impl

    impls = (
        ["whole", "layerwise"]
        if args.train_impl == "both"
        else [resolve_train_impl(args.train_impl, args.steps)]
    )
    variants = [(la, impl) for impl in impls for la in lookaheads]
    out = {"runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-child-") as tmp:
        for i, (lookahead, impl) in enumerate(variants):
            root = os.path.join(tmp, f"run{i}")
            if len(variants) > 1:  # each variant in a fresh process: no warm caches carried
                cmd = _worker_command(args, lookahead="on" if lookahead else "off", train_impl=impl)
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                sub = json.loads(res.stdout)
                out["runs"] += sub["runs"]
                out["second_worker"] = sub.get("second_worker") or out.get("second_worker")
                continue
            out["runs"].append(run_worker_bench(args, root, lookahead, impl))
            if impl == "layerwise":
                continue  # `bench_layerwise.py --second-worker` measures shared layers
            res = subprocess.run(
                [sys.executable, __file__, "--second-worker", root],
                capture_output=True,
                text=True,
                check=True,
            )
            out["second_worker"] = json.loads(res.stdout)
    runs = {(r["train_impl"], r["lookahead"]): r for r in out["runs"]}
    for la in lookaheads:
        if ("whole", la) in runs and ("layerwise", la) in runs:
            w, lw = runs["whole", la], runs["layerwise", la]
            out.setdefault("layerwise_vs_whole", {})["on" if la else "off"] = (
                lw["children_per_minute"] / w["children_per_minute"]
            )
    return out


def print_cpu(out: dict, args) -> None:
    for run in out["runs"]:
        wall, phases = run["wall_seconds"], run["phases_seconds"]
        print(
            f"\n{run['train_impl']}, lookahead {'on' if run['lookahead'] else 'off'}: "
            f"{run['children']} children of "
            f"{args.steps} steps in {wall:.1f} s = {run['children_per_minute']:.1f} children/min "
            f"(setup {run['setup_seconds']:.1f} s not counted)"
        )
        for name in (
            "select",
            "load_parent",
            "mutate",
            "compile",
            "train",
            "eval",
            "download",
            "publish",
            "other",
        ):
            s = phases.get(name, 0.0)
            note = " (in the background: overlaps training)" * (
                name == "publish" and run.get("publish") == "background"
            )
            print(f"  {name:<12} {s:8.2f} s  {100 * s / wall:5.1f} %{note}")
        print(
            f"  programs: {run['programs']} over {run['distinct_architectures']} architectures; "
            f"{run['backend_compiles']} XLA backend compiles (programs and small host ops)"
        )
        print(
            f"  non-training share {100 * run['non_training_share']:.1f} % measured; "
            f"{100 * run['non_training_share_at_paper_steps']:.2f} % projected at "
            f"{PAPER_STEPS} steps/child ({1000 * run['train_seconds_per_step']:.2f} ms/step)"
        )
        print(f"  programs in the store: {run['program_bytes'] / 2**20:.1f} MiB")
    for la, ratio in out.get("layerwise_vs_whole", {}).items():
        print(f"\nlayerwise / whole children per minute (lookahead {la}): {ratio:.2f}x")
    second = out.get("second_worker")
    if second and second["seconds"]:
        s = sorted(second["seconds"])
        print(
            f"\nsecond worker (new process): {second['architectures']} architectures "
            f"{second['sources']}, load median {statistics.median(s):.3f} s, max {s[-1]:.3f} s"
        )


# ------------------------------------------------------------------------------- TPU compile


def tpu_main(args) -> dict:
    import jax

    from evojax_nas import dna as D
    from evojax_nas.mutations import mutate
    from evojax_nas.programs import Layout, Target, compile_programs, xla_flops
    from evojax_nas.steps import TrainConfig

    target = Target.tpu(args.topology)
    layout = Layout((3500, 28, 28, 1), "uint8", (33.3,), (78.6,), "digits")  # mnist5k's
    cfg = TrainConfig(steps=PAPER_STEPS)
    dna, key = D.initial_dna(1, 10, 0.1), jax.random.PRNGKey(args.seed)
    chain, seen = [dna], {D.architecture_key(dna)}
    for i in range(args.mutations):
        dna, _, _ = mutate(dna, None, jax.random.fold_in(key, i))
        chain.append(dna)
    rows = []
    for i, dna in enumerate(chain):
        arch = D.architecture_key(dna)
        if i and arch in seen:
            rows.append({"step": i, "architecture": arch, "reused": True})
            continue
        seen.add(arch)
        programs, compiled = compile_programs(dna, layout, cfg, target)
        mem = compiled[0].memory_analysis()
        rows.append(
            {
                "step": i,
                "architecture": arch,
                "describe": D.describe(dna),
                "seconds": programs.seconds,
                "flops_train_step": xla_flops(compiled[0]),  # XLA's count for the TPU
                "flops_eval_batch": xla_flops(compiled[1]),
                "train_temp_bytes": getattr(mem, "temp_size_in_bytes", None),
                "train_code_bytes": getattr(mem, "generated_code_size_in_bytes", None),
            }
        )
        print(
            f"  {i:2d} compiled in {sum(programs.seconds.values()):6.1f} s  "
            f"{rows[-1]['flops_train_step']:.2e} FLOP/step  {D.describe(dna)}",
            file=sys.stderr,
        )
    return {"device_kind": target.device_kind, "chain": rows}


def print_tpu(out: dict) -> None:
    done = [r for r in out["chain"] if not r.get("reused")]
    secs = sorted(sum(r["seconds"].values()) for r in done)
    print(
        f"\n{out['device_kind']}: {len(out['chain'])} DNAs of a mutation chain, "
        f"{len(done)} distinct architectures compiled (train + eval programs)"
    )
    print(
        f"  compile seconds per architecture: median {statistics.median(secs):.1f}, "
        f"min {secs[0]:.1f}, max {secs[-1]:.1f}"
    )
    flops = statistics.median(r["flops_train_step"] for r in done)
    print(
        f"  XLA TPU FLOPs per training step: median {flops:.2e}; "
        f"{flops * PAPER_STEPS:.2e} per child at {PAPER_STEPS} steps"
    )


# --------------------------------------------------------------------- concurrent workers


def concurrent_main(args) -> dict:
    """`args.concurrent` worker processes at once, unpinned then pinned, `args.rounds` times."""
    from evojax_nas.devices import CPU_AFFINITY, CPUS, with_cpu_shares

    n = args.concurrent
    pinned = with_cpu_shares([{}] * n, "cpu", environ={})
    if n > 1 and not all(CPUS in env for env in pinned):
        raise SystemExit("this platform cannot pin processes to cores")
    base = {k: v for k, v in os.environ.items() if k not in (CPUS, CPU_AFFINITY)}
    rounds = []
    for r in range(args.rounds):
        for mode, envs in (("unpinned", [{}] * n), ("pinned", pinned)):
            procs = [
                subprocess.Popen(
                    _worker_command(args, seed=args.seed + i),
                    env={**base, **env},
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for i, env in enumerate(envs)
            ]
            workers = []
            for i, proc in enumerate(procs):
                stdout, _ = proc.communicate()
                if proc.returncode:
                    raise SystemExit(f"worker {i} ({mode}) failed with exit {proc.returncode}")
                workers.append(json.loads(stdout)["runs"][0])
            total = sum(w["children_per_minute"] for w in workers)
            rounds.append(
                {"round": r, "mode": mode, "children_per_minute": total, "workers": workers}
            )
            print(f"  round {r} {mode:8s} {total:7.1f} children/min", file=sys.stderr)
    mean = {
        mode: statistics.mean(x["children_per_minute"] for x in rounds if x["mode"] == mode)
        for mode in ("unpinned", "pinned")
    }
    return {
        "concurrent": n,
        "cores": len(os.sched_getaffinity(0)),  # Linux: with_cpu_shares pinned them
        "rounds": rounds,
        "children_per_minute": mean,
        "pinned_over_unpinned": mean["pinned"] / mean["unpinned"],
    }


def print_concurrent(out: dict) -> None:
    print(f"\n{out['concurrent']} workers at once on {out['cores']} cores, children per minute:")
    for x in out["rounds"]:
        steps = [w["train_seconds_per_step"] * 1e3 for w in x["workers"]]
        print(
            f"  round {x['round']} {x['mode']:8s} {x['children_per_minute']:7.1f}  "
            f"(ms per training step: {', '.join(f'{s:.2f}' for s in steps)})"
        )
    print(f"pinned / unpinned: {out['pinned_over_unpinned']:.2f}x")


def main(argv=None) -> int:
    from evojax_nas.devices import apply_cpu_only_environment

    apply_cpu_only_environment()  # before JAX is imported: no libtpu warnings on a CPU host
    args = parse_args(argv)
    if args.second_worker:
        print(json.dumps(second_worker(args.second_worker)))
        return 0
    if os.environ.get("EVOJAX_NAS_CPUS"):  # a --concurrent worker keeps to its cores (its
        from evojax_nas.devices import apply  # inherited EVOJAX_NAS_CPUS), as evolve's do

        apply({})
    if args.concurrent:
        out, show = concurrent_main(args), print_concurrent
    elif args.platform == "tpu":
        out, show = tpu_main(args), print_tpu
    else:
        out, show = cpu_main(args), lambda out: print_cpu(out, args)
    if args.json:
        print(json.dumps(out))
    else:
        show(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

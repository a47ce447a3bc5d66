"""`evojax-nas evolve`, `worker` and `status`: run, join and inspect an evolution."""

from __future__ import annotations

import argparse
import json
import time

from evojax_nas.cli_train import positive_int
from evojax_nas.config import SELECTIONS, load_config, with_overrides
from evojax_nas.data import DATASETS
from evojax_nas.devices import workers_arg

DEFAULT_OUT = "runs/evolve-{time}"


def add_command(sub) -> None:
    p = sub.add_parser("evolve", help="run an evolution (default: the quick job on MNIST)")
    p.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help="the run's store: a directory or gs://bucket/prefix (default runs/evolve-<time>)",
    )
    p.add_argument("--config", default="quick", help="quick (default), paper, or a JSON file")
    p.add_argument("--dataset", help=f"one of {', '.join(DATASETS)}")
    p.add_argument(
        "--data-dir",
        help="CIFAR: the official binary archive (or its folder), or a tensorflow-datasets "
        "data_dir (may be gs://)",
    )
    p.add_argument("--population", type=positive_int, help="population set-point")
    p.add_argument(
        "--workers",
        type=workers_arg,
        default="auto",
        help="local worker processes, or auto (default): one per accelerator chip, each seeing "
        "only its own; on a CPU the config's number",
    )
    p.add_argument("--steps", type=positive_int, help="training steps per individual")
    p.add_argument("--max-children", type=int, help="stop after this many children in all")
    p.add_argument("--max-minutes", type=float, help="stop after this many minutes")
    p.add_argument("--seed", type=int)
    p.add_argument("--selection", choices=SELECTIONS)
    p.add_argument(
        "--no-inheritance",
        action="store_true",
        help="the paper's control: children do not inherit weights",
    )
    p.add_argument(
        "--create-only",
        action="store_true",
        help="write the run's config into the store and exit (workers join later)",
    )
    p.set_defaults(handler=run_evolve)

    w = sub.add_parser("worker", help="join an existing run as one more worker")
    w.add_argument("store", help="the run's store (directory or gs://bucket/prefix)")
    w.add_argument("--max-children", type=positive_int, default=None)
    w.add_argument("--max-minutes", type=float, default=None)
    w.add_argument(
        "--workers",
        type=workers_arg,
        default="auto",
        help="worker processes on this machine, or auto (default): one per accelerator chip, "
        "each seeing only its own (one on a CPU)",
    )
    w.add_argument("--restart", action="store_true", help="restart a worker process that dies")
    w.set_defaults(handler=run_join)

    r = sub.add_parser(
        "replay",
        help="re-derive and retrain individuals from their parents; check each matches",
        description="Re-derives each individual from its parent's stored weights and its "
        "recorded key, retrains it and compares DNA, validation accuracy and every weight bit. "
        "Exits 1 naming any mismatch.",
    )
    r.add_argument("store")
    r.add_argument("id", nargs="?", help="one individual's ID (see `status`)")
    which = r.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="every individual of the run")
    which.add_argument("--lineage", metavar="ID", help="the chain from an initial individual to ID")
    r.add_argument(
        "--strict",
        action="store_true",
        help="fail on individuals whose parent's weights were collected (not checkable)",
    )
    r.add_argument("--json", action="store_true")
    r.set_defaults(handler=run_replay)

    s = sub.add_parser("status", help="the state of a run, live or finished")
    s.add_argument("store")
    s.add_argument("--json", action="store_true")
    s.set_defaults(handler=run_status_cmd)


def run_evolve(args: argparse.Namespace) -> int:
    from evojax_nas.data import check_dataset
    from evojax_nas.devices import describe_plan, plan
    from evojax_nas.runner import evolve

    base = load_config(args.config)
    # auto: one worker per chip; an explicit count: every worker sees every device, as before
    envs = plan(base.workers) if args.workers == "auto" else None
    cfg = with_overrides(
        base,
        dataset=args.dataset,
        data_dir=args.data_dir,
        population=args.population,
        workers=len(envs) if envs is not None else args.workers,
        steps=args.steps,
        max_children=args.max_children,
        max_minutes=args.max_minutes,
        seed=args.seed,
        selection=args.selection,
        inheritance=False if args.no_inheritance else None,
    )
    out = args.out.replace("{time}", time.strftime("%Y%m%d-%H%M%S"))
    check_dataset(cfg.dataset, cfg.data_dir)  # a bad dataset fails here, before a run exists
    if args.create_only:
        from evojax_nas.runner import create_or_join
        from evojax_nas.store import open_store

        create_or_join(open_store(out), cfg)
        print(f"run {out} is ready: start workers with `evojax-nas worker {out}`")
        return 0
    print(
        f"run {out}: {cfg.selection} selection, population {cfg.population}, "
        f"{cfg.workers} workers, {cfg.steps} steps/child, dataset {cfg.dataset}"
        f"{'' if cfg.inheritance else ', no weight inheritance'}",
        flush=True,
    )
    if envs is not None:
        print(f"workers auto: {describe_plan(envs)}", flush=True)
    try:
        progress = evolve(out, cfg, verbose=args.verbose, worker_envs=envs)
    except KeyboardInterrupt:
        print(
            f"stopped. The run is kept: `evojax-nas status {out}`; continue it with "
            f"`evojax-nas worker {out}`."
        )
        return 130
    print(
        f"done: {progress.children} children, best validation accuracy {progress.best:.4f} "
        f"({progress.best_id}). Next: `evojax-nas status {out}`, `evojax-nas report {out}`."
    )
    return 0


def run_join(args: argparse.Namespace) -> int:
    from evojax_nas.devices import apply, describe_plan, plan, run_worker_processes
    from evojax_nas.runner import claim_worker_id, create_or_join, worker_main
    from evojax_nas.store import open_store

    store = open_store(args.store, create=False)
    create_or_join(store, None)
    envs = plan(1) if args.workers == "auto" else [{}] * args.workers
    if len(envs) > 1:
        print(f"{args.store}: {describe_plan(envs)}", flush=True)
        extra = []
        for flag, value in (
            ("--max-children", args.max_children),
            ("--max-minutes", args.max_minutes),
        ):
            extra += [flag, str(value)] if value is not None else []
        return run_worker_processes(
            args.store, envs, extra, restart=args.restart, verbose=args.verbose
        )
    apply(envs[0])
    wid = claim_worker_id(store)
    deadline = time.time() + args.max_minutes * 60 if args.max_minutes else None
    print(f"worker {wid} joined {args.store}", flush=True)
    children = worker_main(args.store, wid, args.max_children, deadline, verbose=args.verbose)
    print(f"worker {wid} trained {children} children")
    return 0


def run_status_cmd(args: argparse.Namespace) -> int:
    from evojax_nas.runner import run_status
    from evojax_nas.store import open_store

    status = run_status(open_store(args.store, create=False))
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    best = status["best_val_accuracy"]
    print(f"run               {status['store']}")
    print(f"population        {status['population']} (set-point {status['set_point']})")
    print(
        f"trained           {status['individuals_trained']} individuals, "
        f"{status['total_flops']:.3e} FLOPs"
    )
    print(
        "best (validation) "
        + (f"{best:.4f} {status['best_id']}" if best is not None else "none yet")
    )
    if status["best_architecture"]:
        print(f"  architecture    {status['best_architecture']}")
    rate = status["children_per_minute_overall"]
    print(f"children/min      {rate:.2f} overall" if rate else "children/min      n/a")
    print(f"workers seen      {status['workers_seen_recently']} in the last 5 minutes")
    per_device = ", ".join(f"{n} on {d}" for d, n in status["workers_per_device"].items())
    print(f"workers/device    {per_device or 'none yet'}")
    return 0


def run_replay(args: argparse.Namespace) -> int:
    from evojax_nas.config import from_dict
    from evojax_nas.data import load_dataset
    from evojax_nas.errors import EvojaxNasError
    from evojax_nas.evolution import training_evaluator
    from evojax_nas.replay import MISMATCH, NOT_CHECKABLE, lineage, replay_many
    from evojax_nas.store import open_store
    from evojax_nas.train import CompileCache

    if sum([bool(args.id), args.all, bool(args.lineage)]) != 1:
        raise EvojaxNasError("replay needs exactly one of: an ID, --all, --lineage ID")
    store = open_store(args.store, create=False)
    cfg = from_dict(store.read_config())
    if args.all:
        ids = [r["id"] for r in store.records()]
    else:
        ids = lineage(store, args.lineage) if args.lineage else [args.id]
    data = load_dataset(cfg.dataset, data_dir=cfg.data_dir)
    evaluate = training_evaluator(data, cfg, CompileCache())

    def show(v: dict) -> None:
        if not args.json:
            print(f"{v['id']:<24} {v['verdict']}: {v['detail']}", flush=True)

    out = replay_many(store, ids, evaluate, data.image_shape[-1], data.num_classes, show)
    bad = [v["id"] for v in out if v["verdict"] == MISMATCH]
    unchecked = [v["id"] for v in out if v["verdict"] == NOT_CHECKABLE]
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(
            f"replayed {len(out)}: {len(out) - len(bad) - len(unchecked)} reproduced, "
            f"{len(unchecked)} not checkable (parent weights collected), {len(bad)} mismatched"
            + (f": {', '.join(bad)}" if bad else "")
        )
    return 1 if bad or (args.strict and unchecked) else 0

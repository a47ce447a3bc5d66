"""`evojax-nas evolve`, `worker` and `status`: run, join and inspect an evolution."""

from __future__ import annotations

import argparse
import json
import time

from evojax_nas.cli_common import STORE_HELP, command, positive_int
from evojax_nas.cli_train import DATASET_HELP
from evojax_nas.config import SELECTIONS, TRAIN_IMPLS, load_config, with_overrides
from evojax_nas.devices import workers_arg
from evojax_nas.errors import EvojaxNasError
from evojax_nas.stall import summary_lines as stall_lines

DEFAULT_OUT = "runs/evolve-{time}"


def add_command(sub) -> None:
    p = sub.add_parser("evolve", help="run an evolution (default: the quick job on MNIST)")
    p.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help="the run's store: a directory or gs://bucket/prefix (default runs/evolve-<time>)",
    )
    p.add_argument("--config", default="quick", help="quick (default), paper, or a JSON file")
    p.add_argument("--dataset", help=DATASET_HELP + " (default: the config's, mnist5k)")
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
        help="local worker processes, or auto (default): one per TPU chip, up to 4 per GPU, "
        "each seeing only its own chip; on a CPU the config's number (a count: spread over "
        "the GPUs, one TPU chip each)",
    )
    p.add_argument("--steps", type=positive_int, help="training steps per individual")
    p.add_argument(
        "--train-impl",
        choices=TRAIN_IMPLS,
        help="whole: one compiled program per architecture; layerwise: per-layer programs "
        "compiled once per run (fewer compiles, slower steps: for few steps per child); "
        "auto (the configs' default): layerwise on a CPU up to 1000 steps per child, on a GPU "
        "up to 500",
    )
    p.add_argument(
        "--max-children", type=int, help="stop after this many children in the whole run"
    )
    p.add_argument(
        "--max-minutes", type=float, help="stop after this many minutes of the run's training"
    )
    p.add_argument("--seed", type=int, help="the run's seed: every random choice derives from it")
    p.add_argument(
        "--selection",
        choices=SELECTIONS,
        help="tournament (the paper), random (its control) or aging",
    )
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
    w.add_argument("store", help=STORE_HELP)
    w.add_argument(
        "--max-children",
        type=positive_int,
        default=None,
        help="this worker stops after this many children (the run's own budget still holds)",
    )
    w.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="this worker stops after this many minutes (the run's own budget still holds)",
    )
    w.add_argument(
        "--workers",
        type=workers_arg,
        default="auto",
        help="worker processes on this machine, or auto (default): one per TPU chip, up to 4 "
        "per GPU, each seeing only its own chip (one on a CPU)",
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
    r.add_argument("store", help=STORE_HELP)
    r.add_argument("id", nargs="?", help="one individual's ID (see `status`)")
    which = r.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="every individual of the run")
    which.add_argument("--lineage", metavar="ID", help="the chain from an initial individual to ID")
    r.add_argument(
        "--strict",
        action="store_true",
        help="fail on individuals whose parent's weights were collected (not checkable)",
    )
    r.add_argument("--json", action="store_true", help="print JSON")
    r.set_defaults(handler=run_replay)

    s = sub.add_parser("status", help="the state of a run, live or finished")
    s.add_argument("store", help=STORE_HELP)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(handler=run_status_cmd)


def run_evolve(args: argparse.Namespace) -> int:
    from evojax_nas.devices import describe_plan, explicit_plan, plan
    from evojax_nas.runner import check_run_inputs, create_run, evolve

    base = load_config(args.config)
    # auto: one worker per chip (several per GPU); an explicit count: spread over the GPUs,
    # one TPU chip each, on a CPU sharing the cores (`devices.explicit_plan`)
    auto = args.workers == "auto"
    envs = plan(base.workers) if auto else explicit_plan(args.workers)
    cfg = with_overrides(
        base,
        dataset=args.dataset,
        data_dir=args.data_dir,
        population=args.population,
        workers=len(envs) if envs is not None else args.workers,
        steps=args.steps,
        train_impl=args.train_impl,
        max_children=args.max_children,
        max_minutes=args.max_minutes,
        seed=args.seed,
        selection=args.selection,
        inheritance=False if args.no_inheritance else None,
    )
    out = args.out.replace("{time}", time.strftime("%Y%m%d-%H%M%S"))
    if args.create_only:
        create_run(out, cfg)
        print(f"run {out} is ready: start workers with `{command()} worker {out}`")
        return 0
    check_run_inputs(out, cfg)  # nothing is created before the config and data are good
    print(
        f"run {out}: {cfg.selection} selection, population {cfg.population}, "
        f"{cfg.workers} workers, {cfg.steps} steps/child, dataset {cfg.dataset}"
        f"{'' if cfg.inheritance else ', no weight inheritance'}",
        flush=True,
    )
    if envs is not None:
        print(f"workers{' auto' * auto}: {describe_plan(envs)}", flush=True)
    try:
        progress = evolve(out, cfg, verbose=args.verbose, checked=True, worker_envs=envs)
    except KeyboardInterrupt as exc:
        _say_stopped(out)
        return 128 + getattr(exc, "signum", 2)
    print(
        f"done: {progress.children} children, best validation accuracy {progress.best:.4f} "
        f"({progress.best_id or 'none this session'}). "
        f"Next: `{command()} status {out}`, `{command()} report {out}`."
    )
    return 0


def _say_stopped(out: str) -> None:
    from evojax_nas.app import open_run
    from evojax_nas.runner import run_budget

    try:
        run = open_run(out)
        store, cfg = run.store, run.cfg
        budget = run_budget(store, cfg)
        members = len(store.population())
        more = (
            f"it is finished ({budget.spent})"
            if budget.spent
            else f"continue it with `{command()} worker {out}`"
        )
        print(
            f"stopped. The run is kept (population {members}, set-point {cfg.population}): "
            f"`{command()} status {out}`; {more}.",
            flush=True,
        )
    except (OSError, EvojaxNasError):
        pass  # stdout or the store is gone: nothing more to say


def run_join(args: argparse.Namespace) -> int:
    from evojax_nas.app import open_run
    from evojax_nas.devices import (
        apply,
        describe_plan,
        discover,
        explicit_plan,
        plan,
        run_worker_processes,
        with_cpu_shares,
    )
    from evojax_nas.lifecycle import GracefulStop, interrupts_end_the_process
    from evojax_nas.progress import Progress
    from evojax_nas.runner import claim_worker_id, run_budget, worker_main

    run = open_run(args.store)
    store, cfg = run.store, run.cfg
    budget = run_budget(store, cfg)
    if budget.spent:
        print(f"run {args.store} is finished ({budget.spent}): nothing to do")
        return 0
    if args.workers == "auto":
        envs = plan(1)
    else:
        envs = explicit_plan(args.workers) or [{}] * args.workers
    if len(envs) > 1:  # one `worker` process per chip (or per --workers), each with its env
        print(f"{args.store}: {describe_plan(envs)}", flush=True)
        extra = []
        for flag, value in (
            ("--max-children", args.max_children),
            ("--max-minutes", args.max_minutes),
        ):
            extra += [flag, str(value)] if value is not None else []
        envs = with_cpu_shares(envs, discover().platform)
        return run_worker_processes(
            args.store, envs, extra, restart=args.restart, verbose=args.verbose
        )
    apply(envs[0])
    limits = [x for x in (args.max_children, budget.children_left) if x is not None]
    deadlines = [x for x in (budget.deadline,) if x is not None]
    if args.max_minutes:
        deadlines.append(time.time() + 60 * args.max_minutes)
    wid = claim_worker_id(store)
    print(
        f"worker {wid} joined {args.store}: {budget.done} children trained so far, "
        f"budget {budget.describe(cfg)} for the whole run",
        flush=True,
    )
    progress = Progress(cfg.max_children, offset=budget.done)
    with interrupts_end_the_process():
        stop = GracefulStop(announce=True).install()
        children = worker_main(
            args.store,
            wid,
            min(limits, default=None),
            min(deadlines, default=None),
            verbose=args.verbose,
            stop=stop,
            on_event=progress.update,
            run_max_children=cfg.max_children,
        )
    print(f"worker {wid} trained {children} children")
    return 0


def run_status_cmd(args: argparse.Namespace) -> int:
    from evojax_nas.runner import run_status
    from evojax_nas.store import open_store

    status = run_status(open_store(args.store, create=False))
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    for line in status_lines(status):
        print(line)
    return 0


def status_lines(status: dict) -> list[str]:
    """`evojax-nas status` as text: the same numbers as its --json."""
    store, best = status["store"], status["best_val_accuracy"]
    state = {
        "live": f"live: {status['workers_live']} worker(s) running",
        "idle": f"idle: no worker running, budget left; continue: `{command()} worker {store}`",
        "finished": f"finished: {status['budget_spent']}",
    }[status["state"]]
    lines = [
        f"run               {store}",
        f"state             {state}",
        f"population        {status['population']} (set-point {status['set_point']})",
        f"trained           {status['individuals_trained']} individuals, "
        f"{status['total_flops']:.3e} FLOPs, budget {status['budget']}",
        "best (validation) " + (f"{best:.4f} {status['best_id']}" if best is not None else "none"),
    ]
    if status["best_architecture_detail"]:
        lines.append(f"  architecture    {status['best_architecture_detail']}")
    overall = status["children_per_minute_overall"]
    lines.append(
        f"children/min      {status['children_per_minute_last_10min']:.2f} over the last 10 "
        "minutes, "
        + (
            f"{overall:.2f} overall ({status['training_minutes']:.1f} min of training)"
            if overall is not None
            else "n/a overall"
        )
    )
    per_device = ", ".join(f"{n} on {d}" for d, n in status["workers_per_device"].items())
    lines.append(f"workers/device    {per_device or 'none yet'}")
    return lines + stall_lines(status.get("stall"))


def run_replay(args: argparse.Namespace) -> int:
    from evojax_nas.app import open_run
    from evojax_nas.errors import EvojaxNasError
    from evojax_nas.replay import MISMATCH, NOT_CHECKABLE, lineage, replay_many

    if sum([bool(args.id), args.all, bool(args.lineage)]) != 1:
        raise EvojaxNasError("replay needs exactly one of: an ID, --all, --lineage ID")
    run = open_run(args.store)
    if args.all:
        ids = [r["id"] for r in run.store.records()]
    else:
        ids = lineage(run.store, args.lineage) if args.lineage else [args.id]
    task = run.task
    evaluate = task.evaluator()

    def show(v: dict) -> None:
        if not args.json:
            print(f"{v['id']:<24} {v['verdict']}: {v['detail']}", flush=True)

    out = replay_many(run.store, ids, evaluate, task.input_channels, task.num_classes, show)
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

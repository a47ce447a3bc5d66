"""Starting a run and its local worker processes; live progress; the state of a run.

Workers are independent processes (spawned: JAX is not fork-safe) that coordinate only
through the store; the parent process only reads their progress from a queue to show it.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import os
import queue as queue_lib
import signal
import sys
import time
from typing import Any

from evojax_nas.config import EvolutionConfig, from_dict
from evojax_nas.errors import ConcurrencyError, ConfigError, EvojaxNasError, NotFoundError
from evojax_nas.store import Store, open_store, retrying


def create_or_join(store: Store, cfg: EvolutionConfig | None) -> EvolutionConfig:
    """Writes the run's config into a new store, or returns the config an existing run uses."""
    if cfg is not None and store.write_config(cfg.to_dict()):
        return cfg
    try:
        stored = from_dict(store.read_config())
    except NotFoundError:
        raise ConfigError(
            f"{store.url} holds no run: start one with `evojax-nas evolve --out {store.url}`"
        ) from None
    if cfg is not None and stored != cfg:
        changed = sorted(k for k, v in cfg.to_dict().items() if stored.to_dict()[k] != v)
        raise ConfigError(
            f"{store.url} already holds a run with a different config "
            f"(fields {changed}); join it with `evojax-nas worker {store.url}` "
            "or choose another --out"
        )
    return stored


WORKER_COUNTER = "worker-ids"  # meta file: {"next": the next unclaimed worker ID}


def claim_worker_id(store: Store, start: int = 0) -> int:
    """A worker ID no other worker of this run has: compare-and-swap on a counter, O(1) requests
    however many workers the run ever started."""
    while True:
        value, version = store.read_meta(WORKER_COUNTER)
        nxt = value.get("next") if isinstance(value, dict) else None
        if type(nxt) is not int or nxt < 0:
            nxt = _first_unclaimed(store, start)  # a new run, a damaged counter or an old run
        try:
            store.write_meta(WORKER_COUNTER, {"next": nxt + 1, "time": time.time()}, version)
        except ConcurrencyError:
            continue  # another worker claimed meanwhile: read the counter again
        return nxt


def _first_unclaimed(store: Store, wid: int) -> int:
    """The lowest ID past the per-ID claims an older version of this code made."""
    while store.read_meta(f"worker-{wid}")[0] is not None:
        wid += 1
    return wid


def worker_main(
    url: str,
    worker_id: int,
    max_children: int | None,
    deadline: float | None,
    events: Any = None,
    verbose: bool = False,
) -> int:
    """The body of one worker process (also what `evojax-nas worker` runs)."""
    import logging

    from evojax_nas.data import load_dataset
    from evojax_nas.evolution import Worker, run_worker, training_evaluator
    from evojax_nas.train import CompileCache, enable_compilation_cache

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    enable_compilation_cache()
    store = retrying(open_store(url, create=False))  # waits out storage outages
    cfg = from_dict(store.read_config())
    dataset = load_dataset(cfg.dataset, data_dir=cfg.data_dir)
    worker = Worker(
        store,
        cfg,
        worker_id,
        training_evaluator(dataset, cfg, CompileCache()),
        dataset.image_shape[-1],
        dataset.num_classes,
    )
    on_event = events.put if events is not None else None
    try:
        return run_worker(worker, max_children=max_children, deadline=deadline, on_event=on_event)
    except KeyboardInterrupt:
        return worker.children


def _stop(procs: list, grace: float = 10.0) -> None:
    """Interrupts every worker (a Ctrl-C on a terminal reaches them already; a `kill -INT` of
    this process does not), then terminates the ones still running after `grace` seconds."""
    for p in procs:
        if p.is_alive() and p.pid is not None:
            os.kill(p.pid, signal.SIGINT)
    end = time.time() + grace
    for p in procs:
        p.join(timeout=max(0.0, end - time.time()))
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)


def _worker_process(
    url: str,
    worker_id: int,
    max_children: int | None,
    deadline: float | None,
    events: Any,
    verbose: bool,
    env: dict | None = None,
) -> None:
    """A spawned worker: a user-caused error goes to the parent as one message, not a traceback."""
    if env:  # its own chip (evojax_nas.devices), set before anything opens a device
        os.environ.update(env)
    try:
        worker_main(url, worker_id, max_children, deadline, events, verbose)
    except EvojaxNasError as exc:
        events.put({"action": "error", "worker": worker_id, "message": str(exc)})
        sys.exit(2)


def split_budget(total: int | None, workers: int) -> list[int | None]:
    if total is None:
        return [None] * workers
    return [total // workers + (i < total % workers) for i in range(workers)]


@dataclasses.dataclass
class Progress:
    """Live totals from worker events; prints one line per trained child."""

    budget: int | None
    start: float = dataclasses.field(default_factory=time.time)
    children: int = 0
    kills: int = 0
    abandoned: int = 0
    best: float = 0.0
    best_id: str = ""
    flops: float = 0.0
    population: int = 0
    out: Any = sys.stdout
    errors: list = dataclasses.field(default_factory=list)  # messages of failed workers

    def update(self, event: dict) -> None:
        action = event.get("action")
        if action == "error":
            self.errors.append(event["message"])
            return
        self.population = event.get("population", self.population)
        if action == "kill":
            self.kills += 1
            return
        if action == "abandoned":
            self.abandoned += 1
            return
        self.children += 1
        self.flops += event.get("flops", 0.0)
        if event.get("val_accuracy", 0.0) > self.best:
            self.best, self.best_id = event["val_accuracy"], event["id"]
        minutes = max(time.time() - self.start, 1e-9) / 60
        total = f"/{self.budget}" if self.budget is not None else ""
        names = ",".join(event.get("mutation", {}).get("names", [])) or "initial"
        print(
            f"[{minutes:6.1f} min] children {self.children}{total} | best val "
            f"{self.best:.4f} | population {self.population} | FLOPs {self.flops:.2e} | "
            f"{self.children / minutes:.1f}/min | {event['id']} {names} "
            f"val {event.get('val_accuracy', 0):.4f}",
            file=self.out,
            flush=True,
        )


def evolve(
    url: str,
    cfg: EvolutionConfig,
    *,
    verbose: bool = False,
    out: Any = sys.stdout,
    worker_envs: list[dict] | None = None,
) -> Progress:
    """Creates (or joins) the run at `url` and runs `cfg.workers` local worker processes.

    `worker_envs` (see `evojax_nas.devices.plan`) gives each worker its own environment, e.g.
    its own chip; there are then as many workers as environments.
    """
    store = open_store(url)
    cfg = create_or_join(store, cfg)
    deadline = time.time() + cfg.max_minutes * 60 if cfg.max_minutes else None
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    progress = Progress(cfg.max_children, out=out)
    procs = []
    envs = worker_envs if worker_envs is not None else [{}] * cfg.workers
    for budget, env in zip(split_budget(cfg.max_children, len(envs)), envs, strict=True):
        wid = claim_worker_id(store)
        p = ctx.Process(
            target=_worker_process,
            args=(url, wid, budget, deadline, events, verbose, env),
            name=f"evojax-nas-worker-{wid}",
        )
        p.start()
        procs.append(p)
    try:
        while any(p.is_alive() for p in procs) or not events.empty():
            try:
                progress.update(events.get(timeout=0.5))
            except queue_lib.Empty:
                continue
    except KeyboardInterrupt:
        print("stopping workers (their in-flight children are dropped) …", file=out, flush=True)
        _stop(procs)
        raise
    failed = [p.name for p in procs if p.exitcode not in (0, None)]
    if progress.errors:
        raise EvojaxNasError(progress.errors[0])
    if failed:
        raise EvojaxNasError(f"worker processes failed: {failed} (run with -v for their logs)")
    settle(store, cfg)
    return progress


SETTLE_WORKER = 999_999  # the key stream of the end-of-run settling kills


def settle(store: Store, cfg: EvolutionConfig) -> int:
    """Kills down to the set-point with the run's own selection rule once all workers stopped.

    Workers that reproduce at the same moment can leave a few more than the set-point alive.
    """
    from evojax_nas.evolution import decide, event_key

    kills = 0
    while len(members := store.population()) > cfg.population:
        decision = decide(members, event_key(cfg.seed, SETTLE_WORKER, kills), cfg)
        try:
            store.kill(decision.target)
        except (ConcurrencyError, NotFoundError):
            pass
        kills += 1
    return kills


def run_status(store: Store, recent_seconds: float = 300.0) -> dict:
    """A summary of a run, live or finished. Reads records, never the test split."""
    cfg = from_dict(store.read_config())
    members = store.population()
    records = store.records()
    trained = [r for r in records if r.get("born")]
    best = max(trained, key=lambda r: r.get("val_accuracy", 0.0), default=None)
    now = time.time()
    recent = [r for r in trained if now - r["born"] < 600]
    span = (max(r["born"] for r in trained) - min(r["born"] for r in trained)) if trained else 0
    seen = [w for w in store.workers(recent_seconds) if now - w.get("time", 0) < recent_seconds]
    return {
        "store": store.url,
        "config": cfg.to_dict(),
        "population": len(members),
        "set_point": cfg.population,
        "individuals_trained": len(trained),
        "best_id": best["id"] if best else None,
        "best_val_accuracy": best["val_accuracy"] if best else None,
        "best_architecture": best.get("architecture") if best else None,
        "best_alive_val_accuracy": max((m.fitness for m in members), default=None),
        # over the last 10 minutes, or over the run's age when it is younger than that
        "children_per_minute_last_10min": (
            len(recent) / min(10.0, max(now - min(r["born"] for r in trained), 60.0) / 60)
            if trained
            else 0.0
        ),
        "children_per_minute_overall": len(trained) / (span / 60) if span > 0 else None,
        "total_flops": math.fsum(r.get("flops", 0.0) for r in trained),
        "workers_seen_recently": len(seen),
        "workers": seen,
        "workers_per_device": workers_per_device(trained),
    }


def workers_per_device(records: list[dict]) -> dict[str, int]:
    """How many workers trained on each kind of device (from the records' "device")."""
    workers: dict[str, set] = {}
    for r in records:
        device = r.get("device") if isinstance(r.get("device"), dict) else {}
        label = f"{device.get('platform', '?')} {device.get('kind', '?')}".strip()
        workers.setdefault(label, set()).add(r.get("worker"))
    return {label: len(ids) for label, ids in sorted(workers.items())}

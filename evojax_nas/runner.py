"""Starting a run and supervising its local worker processes; the state of a run.

Workers are independent processes (spawned: JAX is not fork-safe) that coordinate only
through the store; the parent process reads their progress from a queue to show it, restarts
a worker that dies unexpectedly, and stops them all however it ends itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import multiprocessing as mp
import os
import queue as queue_lib
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from evojax_nas.app import open_run
from evojax_nas.config import EvolutionConfig, stored_config
from evojax_nas.devices import apply, discover, with_cpu_shares
from evojax_nas.errors import ConcurrencyError, ConfigError, EvojaxNasError, NotFoundError
from evojax_nas.hints import command
from evojax_nas.lifecycle import (
    LIVE_SECONDS,
    GracefulStop,
    Heartbeat,
    interrupts_end_the_process,
    is_live,
    watch_parent,
)
from evojax_nas.progress import Progress
from evojax_nas.state import FINISHED, WORKER_COUNTER, worker_of
from evojax_nas.store import Store, open_store

log = logging.getLogger(__name__)

STOP_GRACE = 15.0  # seconds a stopping worker may take to finish a child the population needs
MAX_RESTARTS = 3  # worker restarts allowed within RESTART_WINDOW before `evolve` gives up
RESTART_WINDOW = 600.0


def create_or_join(store: Store, cfg: EvolutionConfig | None) -> EvolutionConfig:
    """Writes the run's config into a new store, or returns the config an existing run uses."""
    if cfg is not None and store.write_config(cfg.to_dict()):
        return cfg
    try:
        stored = stored_config(store.read_config())
    except NotFoundError:
        raise ConfigError(
            f"{store.url} holds no run: start one with `{command()} evolve --out {store.url}`"
        ) from None
    if cfg is not None and stored != cfg:
        changed = sorted(k for k, v in cfg.to_dict().items() if stored.to_dict()[k] != v)
        raise ConfigError(
            f"{store.url} already holds a run with a different config "
            f"(fields {changed}); join it with `{command()} worker {store.url}` "
            "or choose another --out"
        )
    return stored


def claim_worker_id(store: Store, start: int = 0) -> int:
    """A worker ID no other worker of this run has: compare-and-swap on a counter, O(1) requests
    however many workers the run ever started."""

    def claim(value: dict | None) -> dict:
        nxt = value.get("next") if isinstance(value, dict) else None
        if type(nxt) is not int or nxt < 0:
            nxt = _first_unclaimed(store, start)  # a new run, a damaged counter or an old run
        return {"next": nxt + 1, "time": time.time()}

    return store.update_meta(WORKER_COUNTER, claim, attempts=None)["next"] - 1


def _first_unclaimed(store: Store, wid: int) -> int:
    """The lowest ID past the per-ID claims an older version of this code made."""
    while store.read_meta(f"worker-{wid}")[0] is not None:
        wid += 1
    return wid


def check_run_inputs(url: str, cfg: EvolutionConfig) -> None:
    """Checks everything `evolve` needs before it creates anything: the store's place and the
    dataset (loaded once, completely). Raises ConfigError, DataError or StoreError."""
    if not url.startswith("gs://"):
        path = os.path.abspath(url.removeprefix("file://"))
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ConfigError(f"--out {url}: {parent} is a file, not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"--out {url}: {parent} is not writable")
    from evojax_nas.data import load_dataset

    load_dataset(cfg.dataset, data_dir=cfg.data_dir)


def create_run(url: str, cfg: EvolutionConfig) -> EvolutionConfig:
    """Checks the inputs, then writes the run's config into a new store (or joins the run)."""
    check_run_inputs(url, cfg)
    return create_or_join(open_store(url), cfg)


def trained(records: Sequence[dict]) -> list[dict]:
    """The records of individuals that completed training."""
    return [r for r in records if isinstance(r.get("born"), int | float)]


def active_seconds(records: Sequence[dict]) -> float:
    """Time during which at least one worker was training a child that it then published.

    Pauses between sessions of a run (all workers stopped) do not count.
    """
    spans = sorted(
        (r["born"] - max(0.0, float(r.get("train_seconds") or 0.0)), r["born"])
        for r in trained(records)
    )
    total, end = 0.0, -math.inf
    for a, b in spans:
        if b > end:
            total += b - max(a, end)
            end = b
    return total


@dataclasses.dataclass(frozen=True)
class Budget:
    """What is left of a run's budget (`max_children`, `max_minutes` of its config)."""

    done: int  # children trained so far
    children_left: int | None  # None: no limit
    deadline: float | None  # Unix time the run's minutes run out; None: no limit
    spent: str = ""  # why nothing is left; "" while something is

    def describe(self, cfg: EvolutionConfig) -> str:
        parts = [f"{cfg.max_children} children"] if cfg.max_children is not None else []
        parts += [f"{cfg.max_minutes:g} minutes"] if cfg.max_minutes else []
        return " / ".join(parts) or "no limit"


def run_budget(
    store: Store, cfg: EvolutionConfig, records: Sequence[dict] | None = None, now: float = 0.0
) -> Budget:
    """The run's budget, counted over the whole run (every worker, every session)."""
    now = now or time.time()
    done = trained(store.records() if records is None else records)
    left = None if cfg.max_children is None else max(0, cfg.max_children - len(done))
    deadline = now + 60 * cfg.max_minutes - active_seconds(done) if cfg.max_minutes else None
    spent = ""
    if left == 0:
        spent = f"its {cfg.max_children} children are trained"
    elif cfg.max_minutes and (store.read_meta(FINISHED)[0] or deadline <= now):
        spent = f"its {cfg.max_minutes:g} minutes are spent"
    return Budget(len(done), left, deadline, spent)


def worker_main(
    url: str,
    worker_id: int,
    max_children: int | None,
    deadline: float | None,
    events: Any = None,
    verbose: bool = False,
    *,
    stop: GracefulStop | None = None,
    on_event: Callable[[dict], None] | None = None,
    run_max_children: int | None = None,
) -> int:
    """The body of one worker process (also what `evojax-nas worker` runs).

    It stops after `max_children` children, or between events once `deadline` passes or a stop
    is requested, but not while the population is below its set-point (a stop interrupts at
    most the child that refills it). `run_max_children` also stops it when the whole run has
    trained that many (checked every few events: other workers count too).
    """
    from evojax_nas.evolution import Worker, background_compile, run_worker, train_config
    from evojax_nas.train import enable_compilation_cache

    run = open_run(url, retry=True)  # waits out storage outages
    store, cfg = run.store, run.cfg
    if train_config(cfg).train_impl == "layerwise":
        # Layer programs are small and many: later runs (and, with `compile_cache: "worker"`,
        # the other workers of this host) find them in JAX's persistent cache; the run's other
        # workers load those compiled here from the run's store (`programs.SharedLayers`: no
        # trace or lower, 3 ms a program instead of 20 ms from the persistent cache).
        enable_compilation_cache(min_compile_seconds=0.0)
    elif cfg.compile_cache == "worker":  # else programs come from the run's store
        enable_compilation_cache()
    task = run.task
    worker = Worker(
        store,
        cfg,
        worker_id,
        task.evaluator(),
        task.input_channels,
        task.num_classes,
        background_publish=True,  # the supervisor knows a child may die unpublished with it
    )
    stop = stop or GracefulStop()
    extra = [0]  # events run since the stop was requested

    def after_event(summary: dict) -> None:
        if events is not None:
            events.put(summary)
        if on_event is not None:
            on_event(summary)
        if deadline is not None and time.time() >= deadline:
            stop.request("deadline")
        if run_max_children is not None and worker.event % 5 == 0:
            if len(store.individual_ids()) >= run_max_children:  # listings only, no records
                stop.request("budget")
        if stop.requested:
            extra[0] += 1

    def keep_going() -> bool:
        """False once a stop was requested, unless the population needs another child."""
        if not stop.requested:
            return True
        seeding = not getattr(worker, "seeded", True)
        return not (seeding or extra[0] > 3 or len(store.population()) >= cfg.population)

    beat = Heartbeat(store, worker_id)
    reason = "crashed"
    try:
        run_worker(
            worker,
            max_children=max_children,
            deadline=None,
            on_event=after_event,
            lookahead=background_compile(cfg),
            keep_going=keep_going,
        )
        reason = stop.reason if stop.requested else "budget"
    except KeyboardInterrupt:
        reason = "interrupted"
    finally:
        beat.close(reason)
    if reason == "deadline":
        try:
            store.write_meta(FINISHED, {"time": time.time(), "worker": worker_id})
        except ConcurrencyError:
            pass  # another worker saw the deadline first
    return worker.children


def _worker_process(
    url: str,
    worker_id: int,
    max_children: int | None,
    deadline: float | None,
    events: Any,
    verbose: bool,
    parent_pid: int | None = None,
    env: dict | None = None,
) -> None:
    """A spawned worker: a user-caused error goes to the parent as one message, not a traceback.

    It exits by itself when its parent is gone; SIGINT asks it to stop between children.
    """
    if env:  # its own chip or cores (evojax_nas.devices), set before anything opens a device
        apply(env)
    if parent_pid is not None:
        watch_parent(parent_pid)
    stop = GracefulStop().install()
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)  # its own process
    try:
        worker_main(url, worker_id, max_children, deadline, events, verbose, stop=stop)
    except EvojaxNasError as exc:
        events.put({"action": "error", "worker": worker_id, "message": str(exc)})
        sys.exit(2)
    except KeyboardInterrupt:
        pass  # stopped (SIGTERM, or a second SIGINT) before its loop started


def split_budget(total: int | None, workers: int) -> list[int | None]:
    if total is None:
        return [None] * workers
    return [total // workers + (i < total % workers) for i in range(workers)]


@dataclasses.dataclass
class _Slot:
    """One local worker process, the share of the budget it was started with, its environment."""

    proc: Any
    worker_id: int
    share: int | None
    env: dict = dataclasses.field(default_factory=dict)
    finished: bool = False  # died after its whole share was in the store: nothing to redo


def evolve(
    url: str,
    cfg: EvolutionConfig,
    *,
    verbose: bool = False,
    out: Any = "stdout",
    checked: bool = False,
    worker_envs: list[dict] | None = None,
) -> Progress:
    """Creates (or joins) the run at `url` and runs `cfg.workers` local worker processes.

    However this ends — the budget, Ctrl-C, SIGTERM, SIGHUP, a closed stdout, an error — its
    workers end too; on a stop request each first finishes a child the population needs
    (up to `STOP_GRACE` seconds). A worker that dies unexpectedly is restarted, at most
    `MAX_RESTARTS` times in `RESTART_WINDOW` seconds. The budget counts the whole run, so a
    second `evolve` on the same run continues it rather than adding a budget.

    Args:
        url: the run's store.
        cfg: the run's config (must equal the stored one when the run exists).
        verbose: workers log at INFO level.
        out: where progress lines go: "stdout" (the current one), a file, or None (nowhere).
        checked: `check_run_inputs(url, cfg)` was already called.
        worker_envs: each worker's own environment (`evojax_nas.devices.plan`), e.g. its own
            chip; there are then as many workers as environments.
    """
    if not checked:
        check_run_inputs(url, cfg)
    store = open_store(url)
    cfg = create_or_join(store, cfg)
    budget = run_budget(store, cfg)
    out = sys.stdout if out == "stdout" else out
    progress = Progress(cfg.max_children, out=out, offset=budget.done)
    if budget.spent:
        progress.say(f"run {url} is finished ({budget.spent}): nothing to do")
        return progress
    if budget.done:
        progress.say(
            f"continuing run {url}: {budget.done} children trained already; the budget "
            f"({budget.describe(cfg)}) counts the whole run"
        )
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    slots: list[_Slot] = []
    with interrupts_end_the_process():
        try:
            envs = worker_envs if worker_envs is not None else [{}] * cfg.workers
            envs = with_cpu_shares(envs, discover().platform)
            shares = split_budget(budget.children_left, len(envs))
            for share, env in zip(shares, envs, strict=True):
                if share == 0:
                    continue
                wid = claim_worker_id(store)
                p = ctx.Process(
                    target=_worker_process,
                    args=(url, wid, share, budget.deadline, events, verbose, os.getpid(), env),
                    name=f"evojax-nas-worker-{wid}",
                )
                p.start()
                slots.append(_Slot(p, wid, share, env))
            _supervise(store, ctx, slots, events, progress, budget.deadline, verbose)
        except BaseException:
            _stop(slots, events, progress)
            _settle_quietly(store, cfg)
            raise
    failed = [s.proc.name for s in slots if s.proc.exitcode not in (0, None) and not s.finished]
    if failed:
        raise EvojaxNasError(f"worker processes failed: {failed} (run with -v for their logs)")
    settle(store, cfg)
    return progress


def _drain(events: Any, progress: Progress, timeout: float) -> None:
    """Shows every queued worker event, waiting up to `timeout` for the first."""
    try:
        progress.update(events.get(timeout=timeout))
        while True:
            progress.update(events.get_nowait())
    except queue_lib.Empty:
        pass


def _supervise(store, ctx, slots, events, progress, deadline, verbose) -> None:
    """Shows progress until every worker has stopped; restarts one that died unexpectedly."""
    restarts: list[float] = []
    while True:  # until every worker has stopped, the last one too (it may need a restart)
        _drain(events, progress, 0.5)
        if progress.errors:  # a user error in the run's config: every worker would hit it
            raise EvojaxNasError(progress.errors[0])
        for i, slot in enumerate(slots):
            code = slot.proc.exitcode
            if code is None or code in (0, 2) or slot.finished:  # running, done, user error
                continue
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            _recount_from_store(store, progress, slot.worker_id)
            left = (
                None
                if slot.share is None
                else slot.share - progress.by_worker.get(slot.worker_id, 0)
            )
            if left is not None and left <= 0:
                slot.finished = True
                progress.say(
                    f"worker {slot.worker_id} died ({how}) after its last child was in the "
                    "store: nothing lost, nothing to redo"
                )
                continue
            now = time.time()
            restarts = [t for t in restarts if now - t < RESTART_WINDOW]
            if len(restarts) >= MAX_RESTARTS:
                raise EvojaxNasError(
                    f"worker processes keep dying ({len(restarts)} restarts in the last "
                    f"{RESTART_WINDOW / 60:.0f} minutes, last exit code {code}); "
                    "run with -v for their logs"
                )
            restarts.append(now)
            # It wrote no final heartbeat: mark it stopped, so that its child in flight is
            # resumed at once (evojax_nas/resume.py) rather than once its heartbeat is old.
            with contextlib.suppress(Exception):
                store.heartbeat(slot.worker_id, {"stopped": now, "reason": "died", "time": now})
            wid = claim_worker_id(store)
            p = ctx.Process(
                target=_worker_process,
                args=(store.url, wid, left, deadline, events, verbose, os.getpid(), slot.env),
                name=f"evojax-nas-worker-{wid}",
            )
            p.start()
            slots[i] = _Slot(p, wid, left, slot.env)
            progress.say(f"worker {slot.worker_id} died ({how}); restarted as worker {wid}")
        if not any(s.proc.is_alive() for s in slots) and events.empty():
            return


def _recount_from_store(store: Store, progress: Progress, worker_id: int) -> None:
    """Counts a worker that died by what it left in the store, not by what it reported.

    It may have reported a child it was still publishing in the background
    (`Worker.background_publish`: at most its last one); if the store lacks it, it does not
    count, and a restarted worker trains it again. It may also have published a child whose
    report died with it (killed before the queue's feeder thread flushed it); that one counts,
    so the restarted worker's share is not one child too large.
    """
    try:
        ids = {i for i in store.individual_ids() if worker_of(i) == worker_id}
    except Exception as exc:  # cannot tell (e.g. the store is down): keep the reported counts
        log.warning("could not count worker %s's children in the store: %s", worker_id, exc)
        return
    last = progress.last_by_worker.get(worker_id)
    if last is not None and last not in ids:
        progress.forget(worker_id, last)
        progress.say(f"worker {worker_id} died before {last} was in the store: it does not count")
    unreported = len(ids) - progress.by_worker.get(worker_id, 0)
    if unreported > 0:
        progress.count_unreported(worker_id, unreported)
        progress.say(
            f"worker {worker_id} died after publishing {unreported} more "
            f"{'child' if unreported == 1 else 'children'} than it reported: counted"
        )


def _stop(slots: list[_Slot], events: Any, progress: Progress, grace: float = STOP_GRACE) -> None:
    """Stops every worker: asks (SIGINT: finish a child the population needs), then after
    `grace` seconds, or at a second Ctrl-C, terminates; kills what is still left."""
    live = [s.proc for s in slots if s.proc.is_alive()]
    for p in live:
        try:
            os.kill(p.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    if live:
        try:
            progress.say(
                "stopping workers: each finishes its child in flight if the population needs "
                f"it (at most {grace:.0f} s; Ctrl-C again drops it) …"
            )
        except OSError:
            progress.out = None
    end = time.time() + grace
    try:
        while any(p.is_alive() for p in live) and time.time() < end:
            try:
                _drain(events, progress, 0.2)  # also keeps their queue from filling up
            except OSError:  # stdout is gone (closed pipe, hung-up terminal)
                progress.out = None
    except KeyboardInterrupt:
        pass
    for attempt in (lambda p: p.terminate(), lambda p: p.kill()):
        for p in live:
            try:
                if p.is_alive():
                    attempt(p)
                p.join(timeout=5)
            except KeyboardInterrupt:
                continue  # a further Ctrl-C must not leave a worker behind


def _settle_quietly(store: Store, cfg: EvolutionConfig) -> None:
    try:
        settle(store, cfg)
    except Exception:  # the run is being interrupted: the next session settles it
        pass


SETTLE_WORKER = 999_999  # the key stream of the end-of-run settling kills


def settle(store: Store, cfg: EvolutionConfig) -> int:
    """Kills down to the set-point with the run's own selection rule once all workers stopped.

    Workers that reproduce at the same moment can leave a few more than the set-point alive.
    """
    kills = 0
    while len(members := store.population()) > cfg.population:
        from evojax_nas.evolution import decide, event_key  # JAX: only when there is work

        decision = decide(members, event_key(cfg.seed, SETTLE_WORKER, kills), cfg)
        try:
            store.kill(decision.target)
        except (ConcurrencyError, NotFoundError):
            pass
        kills += 1
    return kills


def run_status(store: Store, now: float | None = None) -> dict:
    """A summary of a run, live or finished. Reads records, never the test split.

    `state` is "live" (a worker's heartbeat was renewed within `lifecycle.LIVE_SECONDS` and it
    has not stopped), "finished" (no live worker, budget spent) or "idle" (no live worker,
    budget left). Rates: children per minute over the last 10 minutes of the run (ending now
    while live, else at the last birth; at least one minute), and overall per minute of
    training time (pauses between sessions excluded).
    """
    now = time.time() if now is None else now
    cfg = stored_config(store.read_config())
    members = store.population()
    records = store.records()
    done = sorted(trained(records), key=lambda r: r["born"])
    best = max(done, key=lambda r: r.get("val_accuracy", 0.0), default=None)
    live = [w for w in store.workers(LIVE_SECONDS) if is_live(w, now)]
    budget = run_budget(store, cfg, done, now)
    state = "live" if live else ("finished" if budget.spent else "idle")
    recent_rate, overall_rate, active = 0.0, None, active_seconds(done)
    if done:
        end = now if live else done[-1]["born"]
        first = done[0]["born"] - float(done[0].get("train_seconds") or 0.0)
        recent = [r for r in done if end - 600 < r["born"] <= end]
        recent_rate = len(recent) / (min(600.0, max(end - first, 60.0)) / 60)
        overall_rate = len(done) / (max(active, 60.0) / 60)
    return {
        "store": store.url,
        "config": cfg.to_dict(),
        "state": state,
        "budget": budget.describe(cfg),
        "budget_spent": budget.spent or None,
        "population": len(members),
        "set_point": cfg.population,
        "individuals_trained": len(done),
        "best_id": best["id"] if best else None,
        "best_val_accuracy": best["val_accuracy"] if best else None,
        "best_architecture_detail": best.get("architecture") if best else None,
        "best_alive_val_accuracy": max((m.fitness for m in members), default=None),
        "children_per_minute_last_10min": recent_rate,
        "children_per_minute_overall": overall_rate,
        "training_minutes": active / 60,
        "total_flops": math.fsum(r.get("flops", 0.0) for r in done),
        "workers_live": len(live),
        "workers_seen_recently": len(live),  # the same count (older name)
        "workers": live,
        "workers_per_device": workers_per_device(done),
        "stall": stall_diagnosis(records, cfg, store.url, now if live else None),
    }


def stall_diagnosis(records: list[dict], cfg: EvolutionConfig, run: str, now=None) -> dict:
    """`stall.diagnose` of a run's records, with the advice naming this run (a JSON dict)."""
    from evojax_nas import stall

    d = stall.diagnose(records, cfg.population, now, run=run, steps=cfg.steps, command=command())
    return d.to_dict()


def workers_per_device(records: list[dict]) -> dict[str, int]:
    """How many workers trained on each kind of device (from the records' "device")."""
    workers: dict[str, set] = {}
    for r in records:
        device = r.get("device") if isinstance(r.get("device"), dict) else {}
        label = f"{device.get('platform', '?')} {device.get('kind', '?')}".strip()
        workers.setdefault(label, set()).add(r.get("worker"))
    return {label: len(ids) for label, ids in sorted(workers.items())}

"""The asynchronous worker loop of the paper (§3.1) with a population set-point.

Each step a worker lists the population once, picks two individuals at random, and — at or
above the set-point — kills the worse, or — below it — reproduces the better: loads its DNA and
weights, mutates, trains, evaluates on validation, and publishes the child. Workers share
nothing but the store; a lost race (the individual is already dead, a create-only write lost)
abandons the step. Every random choice comes from `event_key(seed, worker, event)`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from evojax_nas import dna as dna_lib
from evojax_nas.config import EvolutionConfig
from evojax_nas.devices import device_info
from evojax_nas.errors import (
    CheckpointError,
    ConcurrencyError,
    CorruptObjectError,
    DNAError,
    NotFoundError,
    StoreError,
)
from evojax_nas.model import init_variables
from evojax_nas.mutations import mutate
from evojax_nas.store import Member, Store
from evojax_nas.train import CompileCache, TrainConfig, TrainResult, train_and_evaluate

log = logging.getLogger(__name__)

# Purposes folded into an event's key, so that each kind of random choice has its own stream.
SELECT, MUTATE, INIT, TRAIN = 0, 1, 2, 3
CONTROL = "control"  # meta file that `adjust` writes and workers read each step
SEEDED = "seeded"  # meta file: the initial population has been created


def event_key(seed: int, worker_id: int, event: int) -> jax.Array:
    """The key of one worker event: derived from the run seed, the worker, the event count."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), worker_id), event)


def child_id(worker_id: int, event: int) -> str:
    return f"w{worker_id:03d}-e{event:06d}"


@dataclasses.dataclass(frozen=True)
class Decision:
    action: str  # "initial", "kill" or "reproduce"
    target: str | None = None  # the individual killed or reproduced
    pair: tuple[str, ...] = ()


def _uniforms(key: jax.Array, n: int) -> np.ndarray:
    return np.asarray(jax.random.uniform(jax.random.fold_in(key, SELECT), (n,)))


def _pick_distinct(u: Sequence[float], n: int, k: int) -> list[int]:
    """k distinct indices out of n from k uniforms (sampling without replacement)."""
    pool = list(range(n))
    return [pool.pop(min(int(x * len(pool)), len(pool) - 1)) for x in u[:k]]


def decide(
    members: Sequence[Member], key: jax.Array, cfg: EvolutionConfig, seeded: bool = True
) -> Decision:
    """The selection rule: a pure function of the listing, the event key and the config.

    Until the population first reaches its set-point (`seeded` False), workers create initial
    individuals: the paper starts from a full population of them. Later, too few individuals
    to pick a pair also gives a fresh initial one.
    """
    members = sorted(members, key=lambda m: m.id)  # listing order must not matter
    n = len(members)
    if n < 2 or (not seeded and n < cfg.population):
        return Decision("initial")
    sample = max(2, min(cfg.aging_sample, n)) if cfg.selection == "aging" else 2
    u = _uniforms(key, sample + 1)
    chosen = [members[i] for i in _pick_distinct(u, n, sample)]
    ids = tuple(m.id for m in chosen)
    full = n >= cfg.population
    if cfg.selection == "tournament":
        a, b = chosen
        better, worse = (a, b) if a.fitness >= b.fitness else (b, a)
        return Decision("kill", worse.id, ids) if full else Decision("reproduce", better.id, ids)
    if cfg.selection == "random":  # the paper's random-search control: fitness is ignored
        victim = chosen[int(u[-1] * 2) % 2]
        return Decision("kill" if full else "reproduce", victim.id, ids)
    # aging (regularized evolution): the oldest dies; the best of a random sample reproduces
    if full:
        oldest = min(members, key=lambda m: (m.birth, m.id))
        return Decision("kill", oldest.id, ids)
    best = max(chosen, key=lambda m: (m.fitness, m.id))
    return Decision("reproduce", best.id, ids)


Evaluator = Callable[[dna_lib.DNA, Any, jax.Array], TrainResult]


@dataclasses.dataclass
class Worker:
    """One worker's context: its store, config, data and compiled-program cache.

    `evaluate` trains and validates a child; tests replace it with a synthetic fitness.
    """

    store: Store
    cfg: EvolutionConfig
    worker_id: int
    evaluate: Evaluator
    input_channels: int
    num_classes: int
    event: int = 0
    children: int = 0
    seeded: bool = False  # the population has reached its set-point once (meta SEEDED)

    def step(self) -> dict:
        """One event; returns a summary dict (also what the progress display shows)."""
        event, key = self.event, event_key(self.cfg.seed, self.worker_id, self.event)
        self.event += 1
        control = self._control()
        members = self.store.population()
        decision = decide(members, key, self.cfg, self._seeded(len(members)))
        self.store.heartbeat(
            self.worker_id,
            {
                "event": event,
                "action": decision.action,
                "target": decision.target,
                "time": time.time(),
            },
        )
        try:
            if decision.action == "kill":
                self.store.kill(decision.target)
                return {"action": "kill", "id": decision.target, "population": len(members)}
            if decision.action == "initial":
                record = self._create_initial(key, event)
            else:
                birth = next(m.birth for m in members if m.id == decision.target) / 1e9
                record = self._reproduce(decision.target, key, event, control, birth)
        except (ConcurrencyError, NotFoundError) as exc:
            log.info("worker %d event %d abandoned: %s", self.worker_id, event, exc)
            return {"action": "abandoned", "reason": str(exc), "population": len(members)}
        except (CorruptObjectError, CheckpointError, DNAError) as exc:
            # A damaged individual must not stop the run: drop it from the population.
            log.warning(
                "worker %d: %s is damaged (%s); killing it", self.worker_id, decision.target, exc
            )
            self._kill_quietly(decision.target)
            return {"action": "abandoned", "reason": str(exc), "population": len(members)}
        return {"action": decision.action, "population": len(members) + 1, **record}

    def _kill_quietly(self, ind_id: str | None) -> None:
        if ind_id is None:
            return
        try:
            self.store.kill(ind_id)
        except StoreError:
            pass  # someone else killed it, or it cannot be killed: either way it is out

    def _seeded(self, population: int) -> bool:
        if not self.seeded:
            self.seeded = self.store.read_meta(SEEDED)[0] is not None
        if not self.seeded and population >= self.cfg.population:
            try:
                self.store.write_meta(SEEDED, {"time": time.time(), "worker": self.worker_id})
            except ConcurrencyError:
                pass  # another worker marked it first
            self.seeded = True
        return self.seeded

    def _control(self) -> dict:
        value, _ = self.store.read_meta(CONTROL)
        return value or {}

    def _create_initial(self, key: jax.Array, event: int) -> dict:
        dna = dna_lib.initial_dna(
            self.input_channels, self.num_classes, self.cfg.initial_learning_rate
        )
        params = init_variables(dna, jax.random.fold_in(key, INIT))
        ind_id = f"init-{self.worker_id:03d}-{event:06d}"
        return self._train_and_publish(
            ind_id,
            dna,
            params,
            key,
            event,
            parent=None,
            mutation={"names": [], "touched": [], "reinitialised": ["*"]},
        )

    def _reproduce(
        self, parent_id: str, key: jax.Array, event: int, control: dict, parent_birth: float
    ) -> dict:
        parent = dna_lib.from_dict(self.store.read_dna(parent_id))
        params = self.store.read_params(parent_id)
        weights, count = self.cfg.mutation_weights, self.cfg.mutations_per_child
        if control.get("mutations_per_child") and time.time() < control.get(
            "mutations_until", math.inf
        ):
            count = int(control["mutations_per_child"])  # a period of higher mutation rate
        # A population-wide weight reset: an individual born before it is replaced, once, by
        # the same architecture retrained from fresh weights (paper §5, supplementary S3).
        replace = bool(control.get("reset_at")) and parent_birth < control["reset_at"]
        if replace:
            weights, count = {"reset_weights": 1.0}, 1
        inherit = self.cfg.inheritance
        child, child_params, report = mutate(
            parent,
            params,
            jax.random.fold_in(key, MUTATE),
            weights=weights,
            count=count,
            inherit=inherit,
        )
        mutation = {
            **report.to_dict(),
            "count": count,
            "inherit": inherit,
            "weights": weights,
            "replaces_parent": replace,
        }
        record = self._train_and_publish(
            child_id(self.worker_id, event),
            child,
            child_params,
            key,
            event,
            parent=parent_id,
            mutation=mutation,
        )
        if replace:
            self._kill_quietly(parent_id)
        return record

    def _train_and_publish(self, ind_id, dna, params, key, event, *, parent, mutation) -> dict:
        start = time.time()
        result = self.evaluate(dna, params, jax.random.fold_in(key, TRAIN))
        record = {
            "id": ind_id,
            "parent": parent,
            "mutation": mutation,
            "worker": self.worker_id,
            "event": event,
            "key": [int(x) for x in np.asarray(jax.random.key_data(key)).ravel()]
            if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
            else [int(x) for x in np.asarray(key).ravel()],
            "seed": self.cfg.seed,
            "learning_rate": dna.learning_rate,
            "architecture": dna_lib.describe(dna),
            "architecture_key": dna_lib.architecture_key(dna),
            "val_accuracy": result.val_accuracy,
            "diverged": result.diverged,
            "steps": result.steps_run,
            "flops": result.flops,
            "flops_train_step": result.flops_train_step,
            "flops_eval_batch": result.flops_eval_batch,
            "params": result.param_count,
            "train_seconds": time.time() - start,
            "timings": result.timings,
            "device": device_info(),  # platform and device kind that trained it
            "born": time.time(),
        }
        self.store.publish(
            ind_id, dna_lib.to_dict(dna), record, result.val_accuracy, result.variables
        )
        self.children += 1
        return record


def training_evaluator(dataset, cfg: EvolutionConfig, cache: CompileCache) -> Evaluator:
    """The real fitness: train on the dataset's train split, accuracy on its validation split."""
    train_cfg = TrainConfig(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        eval_batch_size=cfg.eval_batch_size,
    )

    def evaluate(dna, params, key):
        return train_and_evaluate(dna, params, dataset, key, train_cfg, cache)

    return evaluate


def run_worker(
    worker: Worker,
    *,
    max_children: int | None,
    deadline: float | None,
    on_event: Callable[[dict], None] | None = None,
    gc_every: int = 25,
) -> int:
    """Steps until this worker has trained `max_children` or the deadline passes."""
    while (max_children is None or worker.children < max_children) and (
        deadline is None or time.time() < deadline
    ):
        summary = worker.step()
        summary["worker"] = worker.worker_id
        if on_event is not None:
            on_event(summary)
        if worker.event % gc_every == 0:
            worker.store.gc(worker.cfg.gc_grace_seconds)
    return worker.children

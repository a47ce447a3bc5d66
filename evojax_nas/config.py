"""Run configurations: the `quick` default, the `paper` settings, or a user's JSON file.

A config is a flat JSON object; a run stores the config it used in its store (`config.json`),
so a worker joining the run needs only the store's address.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from importlib import resources
from typing import Any

from evojax_nas.errors import ConfigError
from evojax_nas.mutation_names import MUTATION_NAMES as MUTATIONS

SELECTIONS = ("tournament", "random", "aging")
COMPILE_CACHES = ("store", "worker")
BUILTIN = ("quick", "paper")
TRAIN_IMPLS = ("auto", "whole", "layerwise")  # `evolution.resolve_train_impl` resolves "auto"


@dataclasses.dataclass(frozen=True)
class EvolutionConfig:
    """Everything that decides what a run does. Field comments give the paper's values."""

    dataset: str = "mnist5k"  # paper: cifar10
    data_dir: str | None = None
    population: int = 20  # set-point; paper: 1,000
    workers: int = 2  # local worker processes started by `evolve`; paper: population / 4
    steps: int = 200  # training steps per individual; paper: 25,600
    batch_size: int = 50  # paper: 50
    eval_batch_size: int = 250
    momentum: float = 0.9  # paper: 0.9
    weight_decay: float = 1e-4  # paper: 1e-4
    initial_learning_rate: float = 0.1  # paper: 0.1
    selection: str = "tournament"  # tournament (paper) | random (control) | aging
    aging_sample: int = 5  # aging: the parent is the best of this many random individuals
    inheritance: bool = True  # False: the paper's no-weight-inheritance control
    mutations_per_child: int = 1
    mutation_weights: dict[str, float] | None = None  # None: all eleven, uniform (paper)
    max_children: int | None = 60  # children trained in all, across workers; None: no limit
    max_minutes: float | None = None
    seed: int = 0
    gc_grace_seconds: float = 600.0
    # Compiled programs shared by all workers through the run's store ("store"), or kept by
    # each worker process for itself ("worker"): see evojax_nas/programs.py.
    compile_cache: str = "store"
    # Compile the next child's programs while the current child trains: true, false, or null
    # for automatic (on where the worker has an accelerator; off on a CPU).
    background_compile: bool | None = None
    # A child still training after this many seconds saves its training state into the store
    # (again every as many seconds, at a chunk boundary); a worker restarted after a preemption
    # finishes it from there, bit for bit (evojax_nas/resume.py). 0 or null: off.
    resume_interval_seconds: float | None = 300.0
    # How a child's training runs: "whole" (one compiled program per architecture),
    # "layerwise" (small programs per layer signature, compiled once for the whole run:
    # evojax_nas/layerwise.py), or "auto": layerwise on a CPU for up to 1,000 steps per child
    # and on a GPU up to 500, whole otherwise (README, "Layer-wise training", "GPU"). The two
    # agree to float rounding, not bit for bit; a replay resolves "auto" as the run did (same
    # platform and steps).
    train_impl: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate_config(cfg: EvolutionConfig) -> EvolutionConfig:
    """Raises ConfigError naming the first bad field."""
    for name in (
        "population",
        "workers",
        "steps",
        "batch_size",
        "eval_batch_size",
        "aging_sample",
        "mutations_per_child",
    ):
        value = getattr(cfg, name)
        _check(
            isinstance(value, int) and not isinstance(value, bool) and value >= 1,
            f"config field {name!r} must be a positive integer, got {value!r}",
        )
    _check(cfg.population >= 2, f"population must be at least 2, got {cfg.population}")
    for name in ("momentum", "weight_decay", "initial_learning_rate", "gc_grace_seconds"):
        value = getattr(cfg, name)
        _check(
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value >= 0,
            f"config field {name!r} must be a finite number >= 0, got {value!r}",
        )
    _check(cfg.initial_learning_rate > 0, "initial_learning_rate must be > 0")
    _check(
        cfg.selection in SELECTIONS,
        f"selection must be one of {', '.join(SELECTIONS)}, got {cfg.selection!r}",
    )
    _check(isinstance(cfg.inheritance, bool), "inheritance must be true or false")
    _check(
        cfg.compile_cache in COMPILE_CACHES,
        f"compile_cache must be one of {', '.join(COMPILE_CACHES)}, got {cfg.compile_cache!r}",
    )
    _check(
        cfg.train_impl in TRAIN_IMPLS,
        f"train_impl must be one of {', '.join(TRAIN_IMPLS)}, got {cfg.train_impl!r}",
    )
    _check(
        cfg.background_compile in (True, False, None),
        f"background_compile must be true, false or null, got {cfg.background_compile!r}",
    )
    _check(
        cfg.resume_interval_seconds is None
        or (
            isinstance(cfg.resume_interval_seconds, (int, float))
            and not isinstance(cfg.resume_interval_seconds, bool)
            and math.isfinite(cfg.resume_interval_seconds)
            and cfg.resume_interval_seconds >= 0
        ),
        "resume_interval_seconds must be a finite number >= 0 (0: off) or null, "
        f"got {cfg.resume_interval_seconds!r}",
    )
    _check(isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool), "seed must be an int")
    if cfg.max_children is not None:
        _check(
            isinstance(cfg.max_children, int) and cfg.max_children >= 0,
            f"max_children must be a non-negative integer or null, got {cfg.max_children!r}",
        )
    if cfg.max_minutes is not None:
        _check(
            isinstance(cfg.max_minutes, (int, float)) and cfg.max_minutes > 0,
            f"max_minutes must be > 0 or null, got {cfg.max_minutes!r}",
        )
    if cfg.mutation_weights is not None:
        _check(isinstance(cfg.mutation_weights, dict), "mutation_weights must be an object")
        unknown = set(cfg.mutation_weights) - set(MUTATIONS)
        _check(
            not unknown,
            f"unknown mutations in mutation_weights: {sorted(unknown)}; "
            f"valid: {', '.join(MUTATIONS)}",
        )
        _check(
            all(
                isinstance(w, (int, float)) and w >= 0 and math.isfinite(w)
                for w in cfg.mutation_weights.values()
            ),
            "mutation_weights must be finite numbers >= 0",
        )
        _check(sum(cfg.mutation_weights.values()) > 0, "mutation_weights are all zero")
    return cfg


def from_dict(data: Any) -> EvolutionConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(EvolutionConfig)}
    unknown = sorted(set(data) - names - {"_doc"})
    if unknown:
        raise ConfigError(f"unknown config fields {unknown}; valid: {sorted(names)}")
    return validate_config(EvolutionConfig(**{k: v for k, v in data.items() if k in names}))


# Fields added after runs were first stored, with the value such a run used: a stored config
# without one is read with that value, not today's default (replay must train as the run did).
STORED_BEFORE = {"train_impl": "whole"}


def stored_config(data: Any) -> EvolutionConfig:
    """The config a run stored in its store (`Store.read_config`), as that run used it."""
    if isinstance(data, dict):
        data = {**STORED_BEFORE, **data}
    return from_dict(data)


def load_config(spec: str) -> EvolutionConfig:
    """`quick`, `paper`, or the path of a JSON file (copy a built-in one to start)."""
    if spec in BUILTIN:
        text = resources.files("evojax_nas.configs").joinpath(f"{spec}.json").read_text()
        return from_dict(json.loads(text))
    if not os.path.exists(spec):
        raise ConfigError(f"no config {spec!r}: use {' or '.join(BUILTIN)} or a JSON file path")
    try:
        with open(spec, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read config {spec}: {exc}") from None
    return from_dict(data)


def with_overrides(cfg: EvolutionConfig, **overrides: Any) -> EvolutionConfig:
    """The config with every non-None override applied, validated."""
    changes = {k: v for k, v in overrides.items() if v is not None}
    return validate_config(dataclasses.replace(cfg, **changes))


XLA_CACHE_MAX_MB = 2048.0  # default bound of the persistent XLA cache (evojax_nas.train)


def xla_cache_max_bytes(value: str | None = None) -> int:
    """The persistent XLA cache's bound in bytes: `value`, else `$EVOJAX_NAS_XLA_CACHE_MAX_MB`.

    In MiB, default `XLA_CACHE_MAX_MB`; -1 means no bound. Anything else but a positive number
    raises ConfigError naming the variable (the CLI checks it before any worker starts).
    `evojax_nas.train.enable_compilation_cache` trims the cache to it.
    """
    if value is None:
        value = os.environ.get("EVOJAX_NAS_XLA_CACHE_MAX_MB", "")
    if not value.strip():
        return int(XLA_CACHE_MAX_MB * 2**20)
    try:
        mb = float(value)
    except ValueError:
        mb = math.nan
    if mb == -1:
        return -1
    if not 0 < mb < math.inf:
        raise ConfigError(
            f"EVOJAX_NAS_XLA_CACHE_MAX_MB={value!r}: give the persistent XLA cache's bound in MiB "
            "(a positive number), or -1 for no bound"
        )
    return max(1, int(mb * 2**20))

"""Training and evaluation of one individual: compiled programs, data resident on the device.

The data is uploaded to the device once per worker (`DeviceData`), not once per child; the
programs come from a `ProgramCache` (`evojax_nas.programs`), so a child whose architecture was
seen before — by this worker or by any other worker of the run — compiles nothing. Training
runs `steps_per_dispatch` steps per compiled call and checks for divergence between calls.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from evojax_nas.config import xla_cache_max_bytes
from evojax_nas.dna import DNA
from evojax_nas.errors import DataError
from evojax_nas.model import Variables, count_params
from evojax_nas.programs import Layout, ProgramCache, Programs, chunk_length
from evojax_nas.steps import (  # noqa: F401  (re-exported: the training API lives here)
    TrainConfig,
    TrainState,
    make_batches,
    make_eval_step,
    make_optimizer,
    make_predict,
    make_train_step,
)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    variables: Variables  # host (numpy) variables after training; the inputs if it diverged
    val_accuracy: float  # fitness; 0.0 when diverged
    diverged: bool
    steps_run: int
    flops_train_step: float
    flops_eval_batch: float
    eval_batches: int
    param_count: int
    # seconds: "compile" (obtaining or waiting for the compiled programs), "train" (with the
    # upload of the variables), "eval", "download" (the trained variables to the host)
    timings: dict[str, float]
    programs: str = "compiled"  # "memory", "shared", "compiled" or "layers" (Programs.source)

    @property
    def flops(self) -> float:
        """The paper's cost of an individual: Ft·Nt + Fv·Nv."""
        return self.flops_train_step * self.steps_run + self.flops_eval_batch * self.eval_batches


def enable_compilation_cache(min_compile_seconds: float = 0.5) -> str | None:
    """Turns on XLA's persistent compilation cache for this process (entry points only).

    A repeated architecture then compiles in a fraction of the time in a new process (DESIGN §6).
    Processes that share compiled programs through a run's store do without it (see
    `evojax_nas.programs.SharedPrograms.save`). Programs that compiled faster than
    `min_compile_seconds` are not kept (0 keeps all: the small layer programs of
    `train_impl: "layerwise"`).
    The directory is `$EVOJAX_NAS_XLA_CACHE` (empty turns the cache off), by default
    `~/.cache/evojax_nas/xla`. It is trimmed here, once per process, to
    `$EVOJAX_NAS_XLA_CACHE_MAX_MB` (default 2048; -1: unbounded) by `trim_compilation_cache`,
    so it outgrows the bound by at most what the processes started since add. (JAX's own bound,
    `jax_compilation_cache_max_size`, scans the whole directory on every write: 0.16 s per new
    program at 2,000 entries, as long as a layer program takes to compile.) Returns the
    directory used, or None.
    """
    default = os.path.join(os.path.expanduser("~"), ".cache", "evojax_nas", "xla")
    path = os.environ.get("EVOJAX_NAS_XLA_CACHE", default)
    if not path:
        return None
    max_bytes = xla_cache_max_bytes()
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    trim_compilation_cache(path, max_bytes)
    return path


def trim_compilation_cache(path: str, max_bytes: int) -> tuple[int, int]:
    """Deletes the least recently used entries (by the files' access times) of a JAX cache
    directory until it holds at most `max_bytes` (-1: nothing is deleted). Safe while other
    processes use the directory: JAX recompiles an entry it cannot read. Returns (entries
    deleted, bytes kept)."""
    entries = []
    try:
        with os.scandir(path) as it:
            for e in it:
                if e.name.endswith("-cache") and e.is_file():
                    try:
                        st = e.stat()
                    except FileNotFoundError:  # another process trimmed it
                        continue
                    entries.append((max(st.st_atime, st.st_mtime), st.st_size, e.path))
    except FileNotFoundError:
        return 0, 0
    kept = sum(size for _, size, _ in entries)
    deleted = 0
    if max_bytes < 0:
        return 0, kept
    for _, size, file in sorted(entries):  # oldest first
        if kept <= max_bytes:
            break
        for name in (file, file[: -len("-cache")] + "-atime"):
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass
        kept, deleted = kept - size, deleted + 1
    return deleted, kept


@dataclasses.dataclass(frozen=True)
class DeviceData:
    """A dataset's train and validation splits on the device, uploaded once per worker.

    The validation split is padded to whole evaluation batches, with a mask.
    """

    layout: Layout
    x_train: jax.Array
    y_train: jax.Array
    val_batches: tuple[tuple[jax.Array, jax.Array, jax.Array], ...]  # (x, y, mask) each
    n_val: int

    @classmethod
    def upload(cls, dataset, eval_batch_size: int, device=None) -> DeviceData:
        put = functools.partial(jax.device_put, device=device)
        x, y, n = dataset.x_val, np.asarray(dataset.y_val, np.int32), len(dataset.y_val)
        batches = max(1, math.ceil(n / eval_batch_size))
        pad = batches * eval_batch_size - n
        xp = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        yp = np.concatenate([y, np.zeros(pad, np.int32)])
        mask = np.arange(batches * eval_batch_size) < n
        val = tuple(
            tuple(put(a[b * eval_batch_size : (b + 1) * eval_batch_size]) for a in (xp, yp, mask))
            for b in range(batches)
        )
        return cls(
            Layout.of(dataset),
            put(dataset.x_train),
            put(np.asarray(dataset.y_train, np.int32)),
            val,
            n,
        )


@functools.partial(jax.jit, static_argnums=1)
def _permutation(key: jax.Array, n: int) -> jax.Array:
    # One compiled program per training-set size for the whole process.
    return jax.random.permutation(key, n).astype(jnp.int32)


@functools.cache
def input_pipeline(layout: Layout, batch_size: int, count: int):
    """The compiled `steps.make_batches` of a dataset: one per worker process, every child."""
    return jax.jit(make_batches(layout.meta, batch_size, count))


# Called after each chunk that leaves training unfinished and finite: (steps done, state).
OnChunk = Callable[[int, TrainState], None]


def initial_state(variables: Variables, config: TrainConfig) -> TrainState:
    """The training state before the first step (fresh optimizer state), on the device."""
    params = jax.device_put(variables["params"])
    stats = jax.device_put(variables["batch_stats"])
    # optax's `init` makes its zeros with one device op per new shape, each a compile (32-53 ms
    # on 2 cores): every new architecture paid them. The same zeros made on the host compile
    # nothing (tests/test_train.py checks they are optax's state).
    shapes = jax.eval_shape(make_optimizer(config).init, params)
    opt_state = jax.device_put(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes))
    return TrainState(params, stats, opt_state, jnp.asarray(False))


def run_training(
    programs: Programs,
    variables: Variables,
    data: DeviceData,
    key: jax.Array,
    learning_rate: float,
    config: TrainConfig,
    *,
    start: tuple[int, TrainState] | None = None,
    on_chunk: OnChunk | None = None,
) -> tuple[TrainState, int, bool]:
    """Runs `config.steps` steps in compiled chunks; stops early once the loss is not finite.

    A chunk never crosses an epoch boundary (each epoch has its own shuffle). The chunks, each
    epoch's shuffle and each step's augmentation depend only on the step and `key`, so training
    resumed from the state an earlier run reached at a chunk boundary (`start`: steps done,
    state) ends bit for bit where the uninterrupted run ends.

    Args:
        start: (steps done, training state) to continue from, e.g. what `on_chunk` was given;
            None starts from `variables` with a fresh optimizer state.
        on_chunk: called with (steps done, state) after every chunk that leaves training
            unfinished and finite (`evojax_nas.resume` saves the state there).
    """
    n_train = data.layout.train_shape[0]
    if n_train < config.batch_size:
        raise DataError(
            f"{n_train} training examples is fewer than one batch of {config.batch_size}"
        )
    step, state = start if start is not None else (0, initial_state(variables, config))
    state = jax.device_put(state)
    shuffle_key, aug_key = jax.random.split(key)
    per_epoch = n_train // config.batch_size
    k = chunk_length(data.layout, config)
    batches = input_pipeline(data.layout, config.batch_size, k)
    lr, perm = np.float32(learning_rate), None
    while step < config.steps:
        if perm is None or step % per_epoch == 0:
            perm = _permutation(jax.random.fold_in(shuffle_key, step // per_epoch), n_train)
        n = min(k, per_epoch - step % per_epoch, config.steps - step)
        xb, yb = batches(data.x_train, data.y_train, perm, np.int32(step), aug_key)
        state = programs.train_chunk(state, xb, yb, np.int32(n), lr)
        step += n
        if bool(state.bad):
            return state, step, True
        if on_chunk is not None and step < config.steps:
            on_chunk(step, state)
    return state, step, False


def evaluate(programs: Programs, params, batch_stats, data: DeviceData) -> tuple[float, int]:
    """Validation accuracy; returns (accuracy, number of batches)."""
    correct = [programs.eval_batch(params, batch_stats, x, y, m) for x, y, m in data.val_batches]
    total = int(sum(int(c) for c in correct))
    return total / max(data.n_val, 1), len(correct)


def train_and_evaluate(
    dna: DNA,
    variables: Variables,
    data,
    key: jax.Array,
    config: TrainConfig,
    cache: ProgramCache | None = None,
    *,
    start: tuple[int, TrainState] | None = None,
    on_chunk: OnChunk | None = None,
) -> TrainResult:
    """Trains one individual and measures its fitness (validation accuracy) and cost.

    Args:
        data: a `DeviceData` (a worker uploads it once), or a `Dataset`, uploaded here.
        cache: where compiled programs come from; a new in-memory one if None.
        start, on_chunk: resume from a saved state; see each chunk's state (`run_training`).
            `variables` stays the child's untrained variables (returned if it diverges).

    A diverged run (non-finite loss) ends early with fitness 0 and `diverged=True`, returning
    the variables it started from; it never raises.
    """
    if not isinstance(data, DeviceData):
        data = DeviceData.upload(data, config.eval_batch_size)
    cache = cache if cache is not None else ProgramCache()
    t0 = time.perf_counter()
    programs = cache.get(dna, data.layout, config)
    t1 = time.perf_counter()
    state, steps_run, diverged = run_training(
        programs, variables, data, key, dna.learning_rate, config, start=start, on_chunk=on_chunk
    )
    jax.block_until_ready(state)
    t2 = time.perf_counter()
    accuracy, batches = 0.0, 0
    out = variables
    if not diverged:
        accuracy, batches = evaluate(programs, state.params, state.batch_stats, data)
    t3 = time.perf_counter()
    if not diverged:
        out = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    t4 = time.perf_counter()
    return TrainResult(
        variables=out,
        val_accuracy=accuracy,
        diverged=diverged,
        steps_run=steps_run,
        flops_train_step=programs.flops_train_step,
        flops_eval_batch=programs.flops_eval_batch,
        eval_batches=batches,
        param_count=count_params(variables),
        timings={"compile": t1 - t0, "train": t2 - t1, "eval": t3 - t2, "download": t4 - t3},
        programs=programs.source,
    )

"""Training and evaluation of one individual: compiled steps, data resident on the device.

One training step is one compiled XLA program dispatched from Python with its state donated.
With XLA's stock convolution, a step inside `lax.scan`/`fori_loop` on CPU runs many times
slower (DESIGN §6, jax-ml/jax#12868); `evojax_nas.conv` (the CPU default) removes that gap, but
per-step dispatch costs a few percent at most and keeps the host-side divergence check simple.

The learning rate is an argument of the compiled step, so a learning-rate mutation never
recompiles, and compiled programs are cached by architecture key in a `CompileCache` that the
caller owns (one per worker), so identity / learning-rate / reset-weights children reuse their
parent's program.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from evojax_nas.augment import preprocess
from evojax_nas.conv import compiler_options, resolve_impl
from evojax_nas.dna import DNA, architecture_key
from evojax_nas.errors import DataError
from evojax_nas.model import DNANet, Variables, count_params


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How one individual is trained. Defaults are the paper's (25,600 steps of batch 50)."""

    steps: int = 25_600
    batch_size: int = 50
    momentum: float = 0.9
    weight_decay: float = 1e-4
    eval_batch_size: int = 250
    check_every: int = 100  # steps between host-side checks for a diverged (NaN/inf) loss
    conv_impl: str = "auto"  # evojax_nas.conv.IMPLS; "auto" picks the fastest on the backend


class TrainState(NamedTuple):
    params: Any  # pytree of float32 arrays, as in Variables["params"]
    batch_stats: Any  # pytree of float32 arrays, as in Variables["batch_stats"]
    opt_state: Any  # optax state: momentum buffers shaped like params
    bad: jax.Array  # bool scalar: a non-finite loss was seen


class Programs(NamedTuple):
    """The compiled programs of one architecture on one dataset layout."""

    train_step: Callable  # (state, x, y, perm, step, key, lr) -> state
    eval_step: Callable  # (params, batch_stats, x, y, mask) -> number correct
    predict: Callable  # (params, batch_stats, x) -> class probabilities
    flops_train_step: float  # Ft
    flops_eval_batch: float  # Fv
    compile_seconds: float


@dataclasses.dataclass
class CompileCache:
    """Compiled programs by (architecture, data layout); `traces` counts programs traced."""

    programs: dict = dataclasses.field(default_factory=dict)
    traces: int = 0


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
    timings: dict[str, float]  # seconds: init, compile, train, eval

    @property
    def flops(self) -> float:
        """The paper's cost of an individual: Ft·Nt + Fv·Nv."""
        return self.flops_train_step * self.steps_run + self.flops_eval_batch * self.eval_batches


def enable_compilation_cache() -> str | None:
    """Turns on XLA's persistent compilation cache for this process (entry points only).

    A repeated architecture then compiles in a fraction of the time in a new process (DESIGN §6).
    The directory is `$EVOJAX_NAS_XLA_CACHE` (empty turns the cache off), by default
    `~/.cache/evojax_nas/xla`. Returns the directory used, or None.
    """
    default = os.path.join(os.path.expanduser("~"), ".cache", "evojax_nas", "xla")
    path = os.environ.get("EVOJAX_NAS_XLA_CACHE", default)
    if not path:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def _decay_mask(params: Any) -> Any:
    # L2 weight decay on convolution kernels only (DESIGN §2).
    return {
        m: {n: m.startswith("conv_") and n == "kernel" for n in leaves}
        for m, leaves in params.items()
    }


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Weight decay then momentum; the step scales by the learning rate given at run time."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=_decay_mask),
        optax.trace(decay=config.momentum),
    )


def make_train_step(
    model: DNANet,
    tx: optax.GradientTransformation,
    data_meta: dict,
    batch_size: int,
    on_trace: Callable[[], None],
) -> Callable:
    """A jittable step: gathers its batch from device-resident data, augments, updates."""

    def step(state: TrainState, x, y, perm, step_index, key, lr):
        on_trace()  # runs once per trace: the recompile counter
        start = (step_index % (perm.shape[0] // batch_size)) * batch_size
        idx = jax.lax.dynamic_slice(perm, (start,), (batch_size,))
        key = jax.random.fold_in(key, step_index)
        xb = preprocess(x[idx], key, train=True, **data_meta)
        yb = y[idx]

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                xb,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree_util.tree_map(lambda p, u: p - lr * u, state.params, updates)
        return TrainState(params, batch_stats, opt_state, state.bad | ~jnp.isfinite(loss))

    return step


def make_eval_step(model: DNANet, data_meta: dict) -> Callable:
    def eval_step(params, batch_stats, x, y, mask):
        xb = preprocess(x, None, train=False, **data_meta)
        logits = model.apply({"params": params, "batch_stats": batch_stats}, xb, train=False)
        return jnp.sum((jnp.argmax(logits, -1) == y) & mask)

    return eval_step


def make_predict(model: DNANet, data_meta: dict) -> Callable:
    def predict(params, batch_stats, x):
        xb = preprocess(x, None, train=False, **data_meta)
        logits = model.apply({"params": params, "batch_stats": batch_stats}, xb, train=False)
        return jax.nn.softmax(logits, axis=-1)

    return predict


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX returns one dict per device
        analysis = analysis[0]
    return float((analysis or {}).get("flops", 0.0))


def _data_meta(dataset) -> dict:
    return {"mean": tuple(dataset.mean), "std": tuple(dataset.std), "augment": dataset.augment}


def compile_programs(dna: DNA, dataset, config: TrainConfig, cache: CompileCache) -> Programs:
    """The compiled train/eval/predict programs for this architecture, from `cache` if there."""
    n_train = dataset.x_train.shape[0]
    meta = _data_meta(dataset)
    key = (
        architecture_key(dna),
        dataset.name,
        dataset.x_train.shape,
        meta["augment"],
        meta["mean"],
        meta["std"],
        config.batch_size,
        config.eval_batch_size,
        config.momentum,
        config.weight_decay,
        resolve_impl(config.conv_impl),
    )
    if key in cache.programs:
        return cache.programs[key]
    start = time.perf_counter()
    model = DNANet(dna, conv_impl=config.conv_impl)
    tx = make_optimizer(config)

    def count() -> None:
        cache.traces += 1

    step = make_train_step(model, tx, meta, config.batch_size, count)
    shapes = jax.eval_shape(lambda: _abstract_variables(dna))
    params, stats = shapes["params"], shapes["batch_stats"]
    state = TrainState(
        params, stats, jax.eval_shape(tx.init, params), jax.ShapeDtypeStruct((), jnp.bool_)
    )
    sds = jax.ShapeDtypeStruct
    x = sds(dataset.x_train.shape, dataset.x_train.dtype)
    y = sds((n_train,), jnp.int32)
    perm = sds((n_train,), jnp.int32)
    i32, f32 = sds((), jnp.int32), sds((), jnp.float32)
    rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    opts = compiler_options()
    train_c = jax.jit(step, donate_argnums=0, compiler_options=opts)
    train_c = train_c.lower(state, x, y, perm, i32, rng, f32).compile()
    eb = (config.eval_batch_size, *dataset.x_train.shape[1:])
    xe, ye, me = sds(eb, dataset.x_train.dtype), sds(eb[:1], jnp.int32), sds(eb[:1], jnp.bool_)
    eval_c = jax.jit(make_eval_step(model, meta), compiler_options=opts)
    eval_c = eval_c.lower(params, stats, xe, ye, me).compile()
    predict = jax.jit(make_predict(model, meta), compiler_options=opts)
    programs = Programs(
        train_c, eval_c, predict, _flops(train_c), _flops(eval_c), time.perf_counter() - start
    )
    cache.programs[key] = programs
    return programs


def _abstract_variables(dna: DNA) -> Variables:
    from evojax_nas.model import variable_shapes

    out: Variables = {"params": {}, "batch_stats": {}}
    for (coll, module, leaf), shape in variable_shapes(dna).items():
        out[coll].setdefault(module, {})[leaf] = jnp.zeros(shape, jnp.float32)
    return out


def _permutations(key: jax.Array, n: int):
    permute = jax.jit(lambda k: jax.random.permutation(k, n).astype(jnp.int32))
    epoch = 0
    while True:
        yield permute(jax.random.fold_in(key, epoch))
        epoch += 1


def run_training(
    programs: Programs,
    variables: Variables,
    dataset,
    key: jax.Array,
    learning_rate: float,
    config: TrainConfig,
) -> tuple[TrainState, int, bool]:
    """Runs `config.steps` compiled steps; stops early when the loss stops being finite."""
    n_train = dataset.x_train.shape[0]
    if n_train < config.batch_size:
        raise DataError(
            f"{n_train} training examples is fewer than one batch of {config.batch_size}"
        )
    params = jax.device_put(variables["params"])
    stats = jax.device_put(variables["batch_stats"])
    state = TrainState(params, stats, make_optimizer(config).init(params), jnp.asarray(False))
    x, y = jax.device_put(dataset.x_train), jax.device_put(dataset.y_train.astype(np.int32))
    shuffle_key, aug_key = jax.random.split(key)
    steps_per_epoch = n_train // config.batch_size
    perms = _permutations(shuffle_key, n_train)
    lr = np.float32(learning_rate)
    for step in range(config.steps):
        if step % steps_per_epoch == 0:
            perm = next(perms)
        state = programs.train_step(state, x, y, perm, np.int32(step), aug_key, lr)
        if (step + 1) % config.check_every == 0 and bool(state.bad):
            return state, step + 1, True
    return state, config.steps, bool(state.bad)


def evaluate(
    programs: Programs, params, batch_stats, x: np.ndarray, y: np.ndarray, batch_size: int
) -> tuple[float, int]:
    """Accuracy on (x, y) in padded batches; returns (accuracy, number of batches)."""
    n = x.shape[0]
    batches = math.ceil(n / batch_size)
    pad = batches * batch_size - n
    xp = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    yp = np.concatenate([y.astype(np.int32), np.zeros(pad, np.int32)])
    mask = np.arange(batches * batch_size) < n
    correct = 0
    for b in range(batches):
        s = slice(b * batch_size, (b + 1) * batch_size)
        correct += int(programs.eval_step(params, batch_stats, xp[s], yp[s], mask[s]))
    return correct / max(n, 1), batches


def train_and_evaluate(
    dna: DNA,
    variables: Variables,
    dataset,
    key: jax.Array,
    config: TrainConfig,
    cache: CompileCache | None = None,
) -> TrainResult:
    """Trains one individual and measures its fitness (validation accuracy) and cost.

    A diverged run (non-finite loss) ends early with fitness 0 and `diverged=True`, returning
    the variables it started from; it never raises.
    """
    cache = cache if cache is not None else CompileCache()
    t0 = time.perf_counter()
    programs = compile_programs(dna, dataset, config, cache)
    t1 = time.perf_counter()
    compile_s = t1 - t0
    state, steps_run, diverged = run_training(
        programs, variables, dataset, key, dna.learning_rate, config
    )
    jax.block_until_ready(state)
    t2 = time.perf_counter()
    accuracy, batches = 0.0, 0
    out = variables
    if not diverged:
        accuracy, batches = evaluate(
            programs,
            state.params,
            state.batch_stats,
            dataset.x_val,
            dataset.y_val,
            config.eval_batch_size,
        )
        out = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    t3 = time.perf_counter()
    return TrainResult(
        variables=out,
        val_accuracy=accuracy,
        diverged=diverged,
        steps_run=steps_run,
        flops_train_step=programs.flops_train_step,
        flops_eval_batch=programs.flops_eval_batch,
        eval_batches=batches,
        param_count=count_params(variables),
        timings={"compile": compile_s, "train": t2 - t1, "eval": t3 - t2},
    )

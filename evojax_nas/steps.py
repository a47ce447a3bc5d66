"""The jittable functions of training and evaluation, and how one individual is trained.

Everything here is pure and traced by `evojax_nas.programs`, which compiles it once per
architecture. The learning rate is an argument of the compiled programs, so a learning-rate
mutation never recompiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from evojax_nas.augment import preprocess
from evojax_nas.model import DNANet


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How one individual is trained. Defaults are the paper's (25,600 steps of batch 50)."""

    steps: int = 25_600
    batch_size: int = 50
    momentum: float = 0.9
    weight_decay: float = 1e-4
    eval_batch_size: int = 250
    # Training steps per compiled call (a `fori_loop`); the divergence (NaN/inf) check runs
    # between calls. Measured on CPU: as fast as one step per call or faster (DESIGN §6 notes
    # the loop-body layout pitfall, which `evojax_nas.conv` avoids); on TPU/GPU it removes the
    # per-step dispatch and host round trip.
    steps_per_dispatch: int = 100
    conv_impl: str = "auto"  # evojax_nas.conv.IMPLS; "auto" picks the fastest on the target
    # "whole": one XLA program per architecture (fastest steps, a compile per architecture);
    # "layerwise": small programs per layer signature, shared by all architectures
    # (evojax_nas/layerwise.py: few compiles, slower steps; for short training per child).
    train_impl: str = "whole"


class TrainState(NamedTuple):
    params: Any  # pytree of float32 arrays, as in Variables["params"]
    batch_stats: Any  # pytree of float32 arrays, as in Variables["batch_stats"]
    opt_state: Any  # optax state: momentum buffers shaped like params
    bad: jax.Array  # bool scalar: a non-finite loss was seen


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


def make_batches(data_meta: dict, batch_size: int, count: int) -> Callable:
    """A jittable input pipeline: `count` consecutive training batches, augmented.

    It depends on the data and the batch size only, never on the architecture, so a worker
    compiles it once for the whole run; per-architecture programs then hold no augmentation
    (on CPU that is a third to a half of a small net's compile time).
    Returns `(images (count, batch, H, W, C) float32 normalised, labels (count, batch))`.
    """

    def batches(x, y, perm, first, key):
        def one(i):
            step_index = first + i
            start = (step_index % (perm.shape[0] // batch_size)) * batch_size
            idx = jax.lax.dynamic_slice(perm, (start,), (batch_size,))
            k = jax.random.fold_in(key, step_index)
            return preprocess(x[idx], k, train=True, **data_meta), y[idx]

        return jax.vmap(one)(jnp.arange(count, dtype=jnp.int32))

    return batches


def make_train_step(
    model: DNANet,
    tx: optax.GradientTransformation,
    on_trace: Callable[[], None] = lambda: None,
) -> Callable:
    """A jittable step on one prepared batch (see `make_batches`): forward, backward, update."""

    def step(state: TrainState, xb, yb, lr):
        on_trace()  # runs once per trace: the recompile counter

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


def make_train_chunk(step: Callable) -> Callable:
    """The first `n` of a chunk's prepared batches, one step each, in one compiled call.

    `n` is a runtime value: one program serves every chunk length (the last chunk of an epoch
    or of the run is shorter), so a child never compiles twice.
    """

    def chunk(state: TrainState, xbs, ybs, n, lr):
        body = lambda i, s: step(s, xbs[i], ybs[i], lr)  # noqa: E731
        return jax.lax.fori_loop(0, n, body, state)

    return chunk


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

"""Training and evaluation as sequences of small compiled programs shared by all architectures.

With `train_impl: "layerwise"` a child's training step is not one XLA program per architecture
but ~2-4 calls per layer of small programs, each compiled once per *signature* (operation,
static numbers, argument shapes) and reused by every later architecture that has a layer of
the same signature. A new architecture then compiles only the layers no earlier one had: on the
default job's architectures compiling took 65 s instead of 389 s, while training took 1.2x as
long (`scripts/bench_layerwise.py`; README, "Layer-wise training"). `train_impl: "auto"` picks
this on a CPU or GPU for short training (`evolution.resolve_train_impl`). Each worker keeps the
layer programs it used (`programs.ProgramCache.layers`), and shares those it compiled with the
other workers of the run through the run's store (`programs.SharedLayers`): a signature is
compiled once per run, not once per worker.

A step, for a DNA resolved by `evojax_nas.architecture`:

- forward in topological order: one program per convolution edge (`evojax_nas.conv`), one per
  input a vertex merges beyond its first (`model.resolve_inputs` one input at a time: one
  program per pair of shapes, not per combination), one per BN+ReLU (train mode: batch
  statistics, and the new running averages as outputs); activations are kept;
- the head (global average pool, dense layer, softmax cross-entropy), forward and backward and
  the update of its parameters in one call;
- backward in reverse order: each operation's VJP recomputed from its kept inputs, fused with
  the update of its own parameters (`steps.make_optimizer`: SGD with momentum 0.9, weight decay
  on convolution kernels only), and one more call per fan-out to sum gradients.

Depths above 4 are padded with zero channels to a multiple of 8 inside the layer programs
(`CHANNEL_PADDING`, `stored_depths`): a merge zeroes the channels beyond the vertex's true
depth in what it adds, and beyond the input's own in the gradient it sends back (`_merged`), so
every padded channel of every activation, variable, momentum and gradient stays exactly zero,
and architectures whose depths differ by a few channels share their programs. Variables go in
and come out in their true shapes (padded and cut on the host, which compiles nothing).

Evaluation runs the training step's forward programs, BN+ReLU in eval mode (the running
averages; the mode is a runtime argument of one program), on the evaluation batch cut into
parts of the training batch size where it divides: besides a cut and the head's count it
compiles nothing of its own (separate evaluation programs at batch 250 were ~30 % of a default
job's layer signatures). The numbers agree with the
whole-program path (`steps.make_train_step`) to float rounding (~1e-7; tests/test_layerwise.py),
not bit for bit: the implementation is part of a run's config, so a replay uses the same one.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from evojax_nas import xla_backend
from evojax_nas.architecture import OUTPUT, bn_name, conv_name, resolve
from evojax_nas.augment import preprocess
from evojax_nas.conv import compiler_options as conv_compiler_options
from evojax_nas.conv import conv2d, conv2d_vjp, host_cpu_flags, xla_conv2d
from evojax_nas.model import BN_EPSILON, BN_MOMENTUM, resolve_inputs
from evojax_nas.steps import TrainState

BN_LEAVES = (
    ("params", "scale"),
    ("params", "bias"),
    ("batch_stats", "mean"),
    ("batch_stats", "var"),
)


# XLA:CPU's options for layer programs. Its legacy fusion emitters instead of the MLIR ones: on
# a 10-minute default job's layer programs compiling was 1.45-1.55x and training 1.16x faster,
# results equal to float rounding, measured with `python scripts/bench_layerwise.py --run RUN
# --compare-options emitters` (README, "Layer-wise training"). Whole programs gain nothing from it
# (bench_train_step: conv4/conv8 +-4 %).
CPU_LAYER_OPTIONS: dict[str, Any] = {"xla_cpu_use_fusion_emitters": False}


# XLA:CPU's LLVM options for layer programs on a CPU without AVX-512 (`xla_backend`): no loop
# unrolling. Their tensors are small, and LLVM unrolled their fixed-count loops in full, which
# cost much of a program's compile and bought no speed: on a default job's architectures
# compiling was 1.58x faster and training 0.98x (architectures 100-159), 1.32x and 1.06x
# (330-369), the same answers to float rounding, measured with
# `python scripts/bench_layerwise.py --run RUN --start 100 --limit 60 --compare-options`
# (README, "Layer-wise training"). Newer XLA turns LLVM's unrolling off itself on AVX2 hosts
# without AVX-512. Not measured with AVX-512, so left as it was there.
CPU_LAYER_BACKEND_OPTIONS = ("xla_cpu_disable_loop_unrolling",)


# (multiple, above): layer programs hold activations and variables with depths above `above`
# padded with zero channels to a multiple of `multiple` (`stored_depths`), so architectures
# whose depths differ by a few channels share their layer programs. Over the three 10-minute
# default jobs of session 15 this leaves 649 / 921 / 307 distinct layer signatures of 878 /
# 1,124 / 307 (`python scripts/bench_layerwise.py --run RUN --limit 100000 --signatures`), and
# trains as fast: 0.99x / 1.00x the unpadded training seconds on two windows of a run
# (`--compare-options padding`, README "Layer-wise training"). Depths 1-4 stay as they are: the
# few-channel convolutions at full resolution that early architectures are made of cost several
# times more when padded to 8 (all depths padded: compiling 2.03x faster, training 0.73x).
CHANNEL_PADDING = (8, 4)


def compiler_options(platform: str | None = None) -> dict[str, Any]:
    """The XLA options layer programs compile with on `platform` (default: JAX's backend).

    On a CPU with AVX-512, XLA's default YNNPACK convolutions: with the whole programs' Eigen
    convolutions (`conv.compiler_options`) a default job's small nets trained layer-wise ~5 %
    slower there (`bench_layerwise.py --run RUN --start 300 --limit 100 --layers-only`, 100
    architectures: 51.1 / 51.4 s against 53.1 / 55.5 s). Elsewhere the whole programs' options
    (YNNPACK's convolutions measured ~10x slower on kernel gradients on AMD Zen 3), and no LLVM
    loop unrolling (`CPU_LAYER_BACKEND_OPTIONS`) where `xla_backend.install` works.
    """
    platform = platform or jax.default_backend()
    if platform != "cpu":
        return conv_compiler_options(platform)
    # Those this jaxlib still has (`xla_backend.known_options`): the rest compile as XLA's default.
    layer = xla_backend.known_options(CPU_LAYER_OPTIONS)
    if "avx512f" in host_cpu_flags():
        return layer
    options = {**conv_compiler_options(platform), **layer}
    if xla_backend.install():
        options[xla_backend.EXTRA_OPTIONS] = ",".join(CPU_LAYER_BACKEND_OPTIONS)
    return options


def options_before_legacy_emitters(platform: str | None = None) -> dict[str, Any]:
    """`compiler_options` without `CPU_LAYER_OPTIONS`: what layer programs compiled with before
    XLA:CPU's legacy fusion emitters (`bench_layerwise.py --compare-options emitters`)."""
    return {k: v for k, v in compiler_options(platform).items() if k not in CPU_LAYER_OPTIONS}


def options_before_backend_options(platform: str | None = None) -> dict[str, Any]:
    """`compiler_options` without `CPU_LAYER_BACKEND_OPTIONS`: what layer programs compiled with
    before them (`bench_layerwise.py --compare-options unrolling`)."""
    options = compiler_options(platform)
    options.pop(xla_backend.EXTRA_OPTIONS, None)
    return options


class OpCache:
    """Compiled per-operation programs by signature, least recently used out. Thread-safe.

    With `shared` (`programs.SharedLayers`: the run's store), a signature this cache has not
    seen is first looked up there: a program another worker compiled is loaded, not compiled
    again, and each program compiled here is shared there.

    Attributes:
        compiles: programs compiled so far; loads: programs loaded from `shared`;
        seconds: time spent compiling and loading them.
    """

    def __init__(self, options: dict, capacity: int = 4096, shared: Any = None):
        self.options = options
        self.capacity = capacity
        self.shared = shared
        self.compiles = 0
        self.loads = 0
        self.seconds = 0.0
        self._ops: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ops)

    def get(self, factory: Callable, statics: tuple, args: list) -> Any:
        """The compiled program of `factory(*statics)` for abstract `args`.

        A factory's arguments are everything its function depends on besides the argument
        shapes: with them, they are the signature.
        """
        sig = (factory.__name__, statics, tuple((tuple(a.shape), str(a.dtype)) for a in args))
        with self._lock:  # one compile at a time: a prefetch thread may build too
            found = self._ops.get(sig)
            if found is not None:
                self._ops.move_to_end(sig)
                return found
            t0 = time.perf_counter()
            if self.shared is not None:
                found = self.shared.load(sig, self.options, tuple(args))
                self.loads += found is not None
            if found is None:
                jitted = jax.jit(factory(*statics), compiler_options=self.options)
                found, from_disk = _compile(jitted, args)
                self.compiles += 1
                if self.shared is not None and not from_disk:
                    self.shared.save(sig, self.options, found)
            self.seconds += time.perf_counter() - t0
            self._ops[sig] = found
            while len(self._ops) > self.capacity:
                self._ops.popitem(last=False)
            return found


def _compile(jitted, args: list) -> tuple[Any, bool]:
    """Compiles `jitted` for `args`; also whether JAX's persistent compilation cache handed the
    executable back (such an executable serializes incompletely on XLA:CPU, jaxlib 0.10.2: it
    must not be shared; one compiled afresh with the cache on serializes fine)."""
    from jax._src import monitoring

    me, hits = threading.get_ident(), []

    def listen(event: str, **_: Any) -> None:
        if event == "/jax/compilation_cache/cache_hits" and threading.get_ident() == me:
            hits.append(event)

    monitoring.register_event_listener(listen)
    try:
        return jitted.trace(*args).lower().compile(), bool(hits)
    finally:
        monitoring.unregister_event_listener(listen)


# ------------------------------------------------------------------ the per-operation functions
# Factories of pure functions; every argument of a factory is part of the op's signature.


def _sgd(p, g, m, lr, momentum: float, decay: float):
    """`optax.add_decayed_weights` then `optax.trace`, then p - lr * update (steps.py)."""
    g = g + decay * p if decay else g
    m = g + momentum * m
    return p - lr * m, m


def _batch_stats(h):
    """Per-channel mean and variance over batch and space, as `nn.BatchNorm` computes them
    (float32, E[x^2] - E[x]^2 clipped at 0)."""
    mean = jnp.mean(h, (0, 1, 2))
    return mean, jnp.maximum(0.0, jnp.mean(h * h, (0, 1, 2)) - mean * mean)


def _bn_relu(h, scale, bias, mean, var, train: jax.Array):
    """BN+ReLU and the new running averages, as `nn.BatchNorm` then `nn.relu` compute them, in
    the mode `train` (a traced boolean) chooses at run time: true, train mode (batch
    statistics); false, eval mode (the running averages; the new averages are returned anyway
    and evaluation ignores them). Written out rather than through `nn.BatchNorm`, which in a
    runtime mode normalises twice and selects: the statistics are selected before the one
    normalisation, and the program compiles faster (README, "Layer-wise training")."""
    batch_mean, batch_var = _batch_stats(h)
    m, v = jnp.where(train, batch_mean, mean), jnp.where(train, batch_var, var)
    y = (h - m) * (jax.lax.rsqrt(v + BN_EPSILON) * scale) + bias
    new_mean = BN_MOMENTUM * mean + (1 - BN_MOMENTUM) * batch_mean
    new_var = BN_MOMENTUM * var + (1 - BN_MOMENTUM) * batch_var
    return jnp.maximum(y, 0.0), new_mean, new_var


def _bn_relu_vjp(h, scale, bias, dy):
    """The gradients (dh, dscale, dbias) of train-mode BN+ReLU at `h` for the output's `dy`:
    the closed form of autodiff's, with ReLU's derivative 0 at 0 as `jax.nn.relu`'s."""
    mean, var = _batch_stats(h)
    rstd = jax.lax.rsqrt(var + BN_EPSILON)
    xhat = (h - mean) * rstd
    g = jnp.where(xhat * scale + bias > 0, dy, 0.0)
    n = h.shape[0] * h.shape[1] * h.shape[2]
    dbias, dscale = jnp.sum(g, (0, 1, 2)), jnp.sum(g * xhat, (0, 1, 2))
    dh = (scale * rstd) * (g - dbias / n - xhat * (dscale / n))
    return dh, dscale, dbias


def _conv(impl: str) -> Callable:
    return conv2d if impl == "custom" else xla_conv2d


def conv_fwd(impl: str, stride: int) -> Callable:
    conv = _conv(impl)
    return lambda x, w: conv(x, w, stride)


def conv_bwd(impl: str, stride: int, need_dx: bool, momentum: float, decay: float) -> Callable:
    conv = _conv(impl)

    def f(x, w, m, dy, lr):
        if impl == "custom":  # its backward rule, without tracing the forward
            dx, dw = conv2d_vjp(x, w, dy, stride)
        else:
            dx, dw = jax.vjp(lambda x, w: conv(x, w, stride), x, w)[1](dy)
        w, m = _sgd(w, dw, m, lr, momentum, decay)
        return (dx, w, m) if need_dx else (w, m)

    return f


def _below(x, depth):
    """`x` with every channel from `depth` (a runtime scalar) on set to zero."""
    return jnp.where(jnp.arange(x.shape[-1]) < depth, x, 0.0)


def _merged(acc, x, depth_x, depth):
    """`acc` plus `x` in `acc`'s size and depth (`model.resolve_inputs`, one input at a time),
    with the channels from the vertex's true `depth` on zero: an input deeper than the vertex
    is truncated to the padded depth only, and would leave its extra channels there. `x` is
    first cut to its own true depth `depth_x`: its padding is zero already, so this changes no
    value, but the gradient it gets back stays zero there too (the vertex's deeper true
    channels would otherwise flow into the padding of a shallower input)."""
    return _below(resolve_inputs(acc, [_below(x, depth_x)]), depth)


def merge_fwd() -> Callable:
    """One more input of a merging vertex added to the sum so far (`_merged`): one program per
    pair of shapes, whatever else the vertex merges or applies."""
    # a new function on each call, as every factory makes: of one shared function JAX would
    # reuse its own in-memory compile, which neither its persistent cache nor the store sees
    return lambda acc, x, depth_x, depth: _merged(acc, x, depth_x, depth)


def merge_bwd() -> Callable:
    """The gradient `_merged` sends the input `x` for the sum's gradient `dy` (which has the
    sum's shape)."""

    def f(x, dy, depth_x, depth):
        _, vjp = jax.vjp(lambda x: _merged(jnp.zeros_like(dy), x, depth_x, depth), x)
        return vjp(dy)[0]

    return f


def vertex_fwd() -> Callable:
    """A BN+ReLU vertex's forward on its (merged) input, for training and evaluation alike: its
    last argument says which mode (one program instead of two; evaluation runs at the training
    batch size)."""

    def f(h, scale, bias, mean, var, train):
        return _bn_relu(h, scale, bias, mean, var, train=train)

    return f


def vertex_bwd(momentum: float) -> Callable:
    """A BN+ReLU vertex's backward and the update of its scale and bias."""

    def f(h, scale, bias, m_scale, m_bias, dy, lr):
        dh, dscale, dbias = _bn_relu_vjp(h, scale, bias, dy)
        scale, m_scale = _sgd(scale, dscale, m_scale, lr, momentum, 0.0)
        bias, m_bias = _sgd(bias, dbias, m_bias, lr, momentum, 0.0)
        return dh, scale, bias, m_scale, m_bias

    return f


def _pool_dense(x, kernel, bias):
    """The head's global average pool and logits, as `DNANet`'s pool and `nn.Dense`."""
    pooled = jnp.mean(x, (1, 2))
    return pooled, pooled @ kernel + bias


def head_train(classes: int, momentum: float) -> Callable:
    """The head's training step: softmax cross-entropy (optax's, mean over the batch) and its
    gradients in closed form, the SGD update of the dense layer, the divergence flag."""

    def f(x, kernel, bias, m_kernel, m_bias, y, lr, bad):
        batch, height, width, _ = x.shape
        pooled, logits = _pool_dense(x, kernel, bias)
        top = jnp.max(logits, -1, keepdims=True)
        e = jnp.exp(logits - top)
        total = jnp.sum(e, -1, keepdims=True)
        onehot = y[:, None] == jnp.arange(classes)
        picked = jnp.sum(jnp.where(onehot, logits, 0.0), -1, keepdims=True)
        loss = jnp.mean(jnp.log(total) + top - picked)
        dlogits = (e / total - onehot) / batch
        dx = jnp.broadcast_to((dlogits @ kernel.T / (height * width))[:, None, None], x.shape)
        kernel, m_kernel = _sgd(kernel, pooled.T @ dlogits, m_kernel, lr, momentum, 0.0)
        bias, m_bias = _sgd(bias, jnp.sum(dlogits, 0), m_bias, lr, momentum, 0.0)
        return bad | ~jnp.isfinite(loss), dx, kernel, bias, m_kernel, m_bias

    return f


def head_eval(classes: int) -> Callable:
    del classes  # in the kernel's shape (and in the signature, as the factory's argument)

    def f(x, kernel, bias, y, mask, correct):
        logits = _pool_dense(x, kernel, bias)[1]
        return correct + jnp.sum((jnp.argmax(logits, -1) == y) & mask, dtype=correct.dtype)

    return f


def prep(meta: tuple) -> Callable:
    mean, std, augment = meta
    return lambda x: preprocess(x, None, train=False, mean=mean, std=std, augment=augment)


def add() -> Callable:
    return lambda a, b: a + b


def unstack(count: int) -> Callable:
    return lambda xs, ys: (tuple(xs[i] for i in range(count)), tuple(ys[i] for i in range(count)))


def split(count: int) -> Callable:
    """An evaluation batch as `count` batches of the training batch size."""

    def f(*arrays):
        return tuple(tuple(jnp.split(a, count)) for a in arrays)

    return f


# ---------------------------------------------------------------------------------- the driver


def stored_depths(arch, padding: tuple[int, int]) -> dict[int, int]:
    """Vertex ID → the channels its activation array has, for `padding` (multiple, above): a
    convolution's output deeper than `above` is padded with zero channels to a multiple of
    `multiple`, a vertex stores its primary input's depth, the input vertex the data's. Every
    extra channel of every activation, variable, momentum and gradient is exactly zero
    throughout training, so the true channels compute what unpadded programs compute (to float
    rounding), while architectures whose depths differ by a few channels share their layer
    programs (`CHANNEL_PADDING`)."""
    multiple, above = padding
    first = arch.order[0]
    width = {first: arch.shapes[first].depth}
    for vid in arch.order[1:]:
        primary, depth = arch.inputs[vid][0], arch.shapes[vid].depth
        if not primary.is_conv:
            width[vid] = width[primary.src]
        elif depth > above:
            width[vid] = -(-depth // multiple) * multiple
        else:
            width[vid] = depth
    return width


def _stored_shape(arch, width: dict[int, int], name: tuple, shape) -> tuple[int, ...]:
    """A variable's shape in padded channels (`stored_depths`)."""
    _, module, leaf = name
    if module == OUTPUT:
        return (width[arch.output_id], shape[1]) if leaf == "kernel" else tuple(shape)
    edge = arch.conv_modules.get(module)
    if edge is not None:
        return (*shape[:2], width[edge.src], width[edge.dst])
    vid = next(v for v in arch.order if bn_name(v) == module)
    return (width[vid],)


# An instruction: (compiled program, or None for an alias; input slots; output slots).
Instruction = tuple[Any, tuple[str, ...], tuple[str, ...]]


class LayerwiseNet:
    """One architecture's training step and evaluation batch as instruction lists over slots.

    Slots hold activations (`a<vertex>`, `e<edge>`), variables (`params/<module>/<leaf>`,
    `batch_stats/...`), momenta (`m:params/...`) and gradients (`g:...`).
    """

    def __init__(
        self,
        dna,
        *,
        image: tuple[int, ...],
        image_dtype: str,
        batch_size: int,
        eval_batch_size: int,
        impl: str,
        momentum: float,
        weight_decay: float,
        meta: tuple,
        ops: OpCache,
        sharding=None,
        channel_padding: tuple[int, int] = CHANNEL_PADDING,
    ):
        arch = resolve(dna)
        self.train_ops: list[Instruction] = []
        self.eval_ops: list[Instruction] = []
        self.slots: dict[str, tuple[str, str, str]] = {}  # variable slot → (coll, module, leaf)
        self._ops = ops
        self._sharding = sharding
        shapes: dict[str, jax.ShapeDtypeStruct] = {}

        def sds(shape, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)

        self._sds = sds
        width = stored_depths(arch, channel_padding)
        self.padded: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # slot → true, stored
        for name, shape in arch.variables.items():
            coll, module, leaf = name
            slot = f"{coll}/{module}/{leaf}"
            self.slots[slot] = name
            stored = _stored_shape(arch, width, name, shape)
            shapes[slot] = sds(stored)
            if coll == "params":
                shapes["m:" + slot] = sds(stored)
            if stored != tuple(shape):
                self.padded[slot] = (tuple(shape), stored)
                if coll == "params":
                    self.padded["m:" + slot] = self.padded[slot]
        shapes.update(lr=sds(()), bad=sds((), jnp.bool_), train=sds((), jnp.bool_))
        shapes.update(eval=shapes["train"], correct=sds((), jnp.int32))
        put = lambda v: jax.device_put(v, sharding)  # noqa: E731
        self._constants = {"train": put(True), "eval": put(False), "correct": put(jnp.int32(0))}
        merging = [v for v in arch.order[1:] if len(arch.inputs[v]) > 1]
        identity = {e.src for v in merging for e in arch.inputs[v][1:] if not e.is_conv}
        for v in sorted({*merging, *identity}):  # true depths a merge needs (`_merged`)
            self._constants[f"depth{v}"] = put(jnp.int32(arch.shapes[v].depth))
            shapes[f"depth{v}"] = sds((), jnp.int32)
        self._memo: dict[int, tuple[Any, Any]] = {}  # id(true-shaped array) → (it, padded)

        def emit(train: bool, compiled, ins, outs) -> None:
            (self.train_ops if train else self.eval_ops).append((compiled, tuple(ins), tuple(outs)))
            if compiled is None:  # an alias
                for o in outs:
                    shapes[o] = shapes[ins[0]]
                return
            leaves = jax.tree_util.tree_leaves(compiled.out_info)
            for slot, info in zip(outs, leaves, strict=True):
                shapes[slot] = sds(info.shape, info.dtype)

        def op(train: bool, factory: Callable, statics: tuple, ins, outs) -> None:
            emit(train, ops.get(factory, statics, [shapes[s] for s in ins]), ins, outs)

        def depth_of(e) -> str:
            """The slot of the true depth of edge `e`'s output (a conv's is its vertex's)."""
            return f"depth{e.dst if e.is_conv else e.src}"

        def output_of(e) -> str:
            """The slot of edge `e`'s output: its convolution's, or its source's activation."""
            return f"e{e.id}" if e.is_conv else f"a{e.src}"

        def forward(train: bool) -> dict[int, str]:
            """Emits the forward; returns each vertex's merged input (BN's input, if any)."""
            merged = {}
            for vid in arch.order[1:]:
                ins = [output_of(e) for e in arch.inputs[vid]]
                for e in arch.inputs[vid]:
                    if e.is_conv:
                        stride = 2**e.stride_log2
                        w = f"params/{conv_name(e.id)}/kernel"
                        op(train, conv_fwd, (impl, stride), [f"a{e.src}", w], [output_of(e)])
                acc = ins[0]
                for k, e in enumerate(arch.inputs[vid][1:], 1):
                    out = f"s{vid}:{k}"
                    op(train, merge_fwd, (), [acc, ins[k], depth_of(e), f"depth{vid}"], [out])
                    acc = out
                merged[vid] = acc
                if arch.vertices[vid].kind != "bn_relu":
                    emit(train, None, [acc], [f"a{vid}"])
                    continue
                bn = [f"{c}/{bn_name(vid)}/{leaf}" for c, leaf in BN_LEAVES]
                # the new running averages: evaluation discards them
                outs = [f"a{vid}", *(bn[2:4] if train else ["discard", "discard"])]
                op(train, vertex_fwd, (), [acc, *bn, "train" if train else "eval"], outs)
            return merged

        # ---- the training step
        input_vid, out = arch.order[0], f"a{arch.output_id}"
        self.input_slot = f"a{input_vid}"
        shapes[self.input_slot] = sds((batch_size, *image))
        shapes["y"] = sds((batch_size,), jnp.int32)
        merged = forward(train=True)
        head = [f"params/{OUTPUT}/kernel", f"params/{OUTPUT}/bias"]
        moms = ["m:" + h for h in head]
        classes = dna.num_classes
        op(
            True,
            head_train,
            (classes, momentum),
            [out, *head, *moms, "y", "lr", "bad"],
            ["bad", "g:" + out, *head, *moms],
        )
        have_grad = {out}

        def accumulate(slot: str, grad: str) -> None:
            target = "g:" + slot
            if slot in have_grad:
                op(True, add, (), [target, grad], [target])
            else:
                emit(True, None, [grad], [target])
                have_grad.add(slot)

        for vid in reversed(arch.order[1:]):
            edges, acc = arch.inputs[vid], merged[vid]
            if arch.vertices[vid].kind == "bn_relu":
                p = [f"params/{bn_name(vid)}/{leaf}" for leaf in ("scale", "bias")]
                m = ["m:" + s for s in p]
                ins = [acc, *p, *m, f"g:a{vid}", "lr"]
                op(True, vertex_bwd, (momentum,), ins, [f"g:{vid}:0", *p, *m])
            else:
                emit(True, None, [f"g:a{vid}"], [f"g:{vid}:0"])
            # the merged sum's gradient is the primary input's as it is: zero in the padding,
            # as every gradient a vertex receives is (kernels' and the head's padded rows are
            # zero, BN's padded scale is, a merge cuts it to the input's depth)
            grads = [f"g:{vid}:0"] + [f"g:{vid}:{k}" for k in range(1, len(edges))]
            for k, e in enumerate(edges[1:], 1):
                ins = [output_of(e), f"g:{vid}:0", depth_of(e), f"depth{vid}"]
                op(True, merge_bwd, (), ins, [grads[k]])
            for e, g in zip(edges, grads, strict=True):
                need_dx = e.src != input_vid
                if e.is_conv:
                    w = f"params/{conv_name(e.id)}/kernel"
                    stride = 2**e.stride_log2
                    dx = [f"g:{vid}:{e.id}:dx"] if need_dx else []
                    op(
                        True,
                        conv_bwd,
                        (impl, stride, need_dx, momentum, weight_decay),
                        [f"a{e.src}", w, "m:" + w, g, "lr"],
                        dx + [w, "m:" + w],
                    )
                    if need_dx:
                        accumulate(f"a{e.src}", dx[0])
                elif need_dx:
                    accumulate(f"a{e.src}", g)

        # ---- the evaluation batch (raw images, normalised by the first program), in parts of
        # the training batch size where it divides: the forward programs are training's then
        # (with BN in eval mode), so evaluation compiles nearly nothing of its own
        parts = eval_batch_size // batch_size if eval_batch_size % batch_size == 0 else 1
        size = eval_batch_size // parts
        self._cut = None  # the evaluation batch as `parts` batches of `size`
        if parts > 1:
            batch = [(image, image_dtype), ((), jnp.int32), ((), jnp.bool_)]
            args = [sds((eval_batch_size, *shape), dtype) for shape, dtype in batch]
            self._cut = ops.get(split, (parts,), args)
        shapes[self.input_slot] = sds((size, *image), image_dtype)
        op(False, prep, (meta,), [self.input_slot], [self.input_slot])
        forward(train=False)
        shapes["y"] = sds((size,), jnp.int32)
        shapes["mask"] = sds((size,), jnp.bool_)
        op(
            False,
            head_eval,
            (classes,),
            [out, *head, "y", "mask", "correct"],
            ["correct"],
        )
        self.calls_per_step = sum(c is not None for c, _, _ in self.train_ops)

    @staticmethod
    def _run(ops: list[Instruction], env: dict) -> None:
        for compiled, ins, outs in ops:
            if compiled is None:
                for o in outs:
                    env[o] = env[ins[0]]
                continue
            res = compiled(*[env[s] for s in ins])
            if not isinstance(res, tuple):
                res = (res,)
            for o, r in zip(outs, res, strict=True):
                env[o] = r

    def _batches(self, xbs, ybs):
        """The chunk's prepared batches as one array per step (one call for the chunk)."""
        count = xbs.shape[0]
        args = [self._sds(xbs.shape, xbs.dtype), self._sds(ybs.shape, ybs.dtype)]
        return self._ops.get(unstack, (count,), args)(xbs, ybs)

    def train_chunk(self, state: TrainState, xbs, ybs, n, lr) -> TrainState:
        """The first `n` of the prepared batches, one step each: `steps.make_train_chunk`'s
        contract (state, batches x, batches y, n, lr) -> state."""
        env: dict[str, Any] = dict(self._constants)
        momenta = momentum_buffers(state.opt_state)
        for slot, (coll, module, leaf) in self.slots.items():
            tree = state.params if coll == "params" else state.batch_stats
            env[slot] = self._pad(slot, tree[module][leaf])
            if coll == "params":
                env["m:" + slot] = self._pad("m:" + slot, momenta[module][leaf])
        env["bad"], env["lr"] = state.bad, jnp.asarray(lr, jnp.float32)
        xs, ys = self._batches(xbs, ybs)
        for i in range(int(n)):
            env[self.input_slot], env["y"] = xs[i], ys[i]
            self._run(self.train_ops, env)
        params: dict = {}
        stats: dict = {}
        new_momenta: dict = {}
        memo: dict[int, tuple[Any, Any]] = {}
        for slot, (coll, module, leaf) in self.slots.items():
            names = [slot, "m:" + slot] if coll == "params" else [slot]
            out = [self._unpad(s, env[s], memo) for s in names]
            (params if coll == "params" else stats).setdefault(module, {})[leaf] = out[0]
            if coll == "params":
                new_momenta.setdefault(module, {})[leaf] = out[1]
        self._memo = memo  # the next chunk, and evaluation, start from these arrays
        opt_state = with_momentum_buffers(state.opt_state, new_momenta)
        return TrainState(params, stats, opt_state, env["bad"])

    def _pad(self, slot: str, x):
        """A variable as its slot stores it: zeros beyond its true channels (`stored_depths`)."""
        if slot not in self.padded:
            return x
        known = self._memo.get(id(x))
        if known is not None and known[0] is x:
            return known[1]
        true, stored = self.padded[slot]
        if tuple(np.shape(x)) != true:
            raise ValueError(f"{slot}: shape {tuple(np.shape(x))}, the architecture's is {true}")
        widths = [(0, s - d) for s, d in zip(stored, true, strict=True)]
        # on the host: a device op would compile once per shape
        return jax.device_put(np.pad(np.asarray(x), widths), self._sharding)

    def _unpad(self, slot: str, x, memo: dict):
        """A stored variable in its true shape; `memo` remembers the stored array for it."""
        if slot not in self.padded:
            return x
        true = self.padded[slot][0]
        cut = np.ascontiguousarray(np.asarray(x)[tuple(slice(0, d) for d in true)])
        cut = jax.device_put(cut, self._sharding)
        memo[id(cut)] = (cut, x)
        return cut

    def eval_batch(self, params, batch_stats, x, y, mask):
        """Correct predictions in one evaluation batch: `steps.make_eval_step`'s contract."""
        env: dict[str, Any] = dict(self._constants)
        for slot, (coll, module, leaf) in self.slots.items():
            env[slot] = self._pad(slot, (params if coll == "params" else batch_stats)[module][leaf])
        parts = [(x, y, mask)] if self._cut is None else zip(*self._cut(x, y, mask), strict=True)
        for xp, yp, mp in parts:
            env.update({self.input_slot: xp, "y": yp, "mask": mp})
            self._run(self.eval_ops, env)
        return env["correct"]


def momentum_buffers(opt_state) -> Any:
    """The momentum buffers (a pytree shaped like the params) of `steps.make_optimizer`'s state."""
    for part in opt_state:
        if isinstance(part, optax.TraceState):
            return part.trace
    raise TypeError(f"no momentum (optax.TraceState) in the optimizer state {opt_state!r}")


def with_momentum_buffers(opt_state, trace) -> Any:
    """`opt_state` with its momentum buffers replaced by `trace`."""
    return type(opt_state)(
        part._replace(trace=trace) if isinstance(part, optax.TraceState) else part
        for part in opt_state
    )


def build(
    dna,
    layout,
    cfg,
    impl: str,
    ops: OpCache,
    sharding=None,
    channel_padding: tuple[int, int] = CHANNEL_PADDING,
) -> LayerwiseNet:
    """The layer-wise net of `dna` for a data layout and training config (`programs.Layout`,
    `steps.TrainConfig`); compiles the signatures `ops` does not have yet."""
    return LayerwiseNet(
        dna,
        image=tuple(layout.train_shape[1:]),
        image_dtype=layout.dtype,
        batch_size=cfg.batch_size,
        eval_batch_size=cfg.eval_batch_size,
        impl=impl,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        meta=(layout.mean, layout.std, layout.augment),  # `Layout` holds them as tuples
        ops=ops,
        sharding=sharding,
        channel_padding=channel_padding,
    )

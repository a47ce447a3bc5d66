"""A 2-D convolution (NHWC, no bias, SAME padding) that is fast to train on XLA:CPU.

Three things decide the speed of a training step's convolutions on XLA:CPU (jaxlib 0.10):
- Which kernel runs them. By default XLA hands every convolution to its YNNPACK fusion, which
  is ~10x slower than its Eigen convolution on the large-window convolution of a kernel
  gradient (~1 s against ~70 ms for a 32x32, 64->64, batch-50 layer). `compiler_options`
  turns that fusion off for convolutions, per compiled program; it helps either
  implementation below, and is what most of the speed-up comes from.
- Their layout. Eigen runs only canonical convolutions (input NHWC, kernel HWIO, output NHWC).
  Autodiff's backward convolutions are not canonical (the kernel gradient contracts over the
  batch); XLA's layout pass makes them so with transposes, but not inside `lax.scan` loop
  bodies, where they run many times slower (DESIGN §6, jax-ml/jax#12868). `conv2d` states its
  backward pass explicitly in canonical form, so it does not depend on that pass:
      dx = conv(dilate(dy), flipped kernel with in/out swapped)   canonical NHWC/HWIO conv
      dW = conv(x as (C, H, W, N), dy as (Ho, Wo, N, O))          canonical, batch contracted
  and a 1x1 convolution is a matmul (after a strided slice for its stride) all the way through.
  A strided dx runs as stride**2 phase convolutions instead (`_strided_input_grad`): the
  dilated dy is mostly zeros, which Eigen multiplies (bench_conv4's step 1.10-1.16x faster).
  The kernel gradient's transpose of x reads the stored activation rather than recomputing
  BN+ReLU in transposed order when the ReLU is `stored_relu` (`relu_for`).
- Few channels: a convolution with few multiply-adds per output pixel, or few input channels,
  runs as a sum of shifted, scaled copies of its input (`uses_tap_sum`).

`Conv` is the Flax module with `nn.Conv`'s parameter (`kernel`, shaped (kh, kw, in, out)), so
either implementation reads the other's weights; `resolve_impl` picks one per backend.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from evojax_nas import xla_backend

IMPLS = ("auto", "xla", "custom")
_DN = ("NHWC", "HWIO", "NHWC")


def resolve_impl(impl: str, backend: str | None = None) -> str:
    """The concrete implementation for `impl` on `backend` (default: JAX's default backend).

    Args:
        impl: One of `IMPLS`; "auto" picks "custom" on CPU and XLA's own convolution elsewhere
            (TPU and GPU compilers handle the backward layouts themselves).
        backend: A JAX platform name such as "cpu" or "tpu"; None asks JAX.

    Returns:
        "xla" or "custom".
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown convolution implementation {impl!r} (valid: {IMPLS})")
    if impl != "auto":
        return impl
    return "custom" if (backend or jax.default_backend()) == "cpu" else "xla"


@functools.cache
def host_cpu_flags() -> frozenset[str]:
    """The feature flags of this host's CPU: x86's "flags" or ARM's "Features" line of
    /proc/cpuinfo (empty where it is not readable)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


# The CPU features that XLA:CPU's code generation can use (x86 and ARM), as /proc/cpuinfo names
# them: executables compiled on a host with one of them may not run on a host without it.
CODEGEN_FLAG_PREFIXES = (
    "sse", "ssse", "avx", "fma", "f16c", "bmi", "amx", "aes", "pclmul", "vpclmul", "sha", "gfni",
    "vaes", "popcnt", "movbe", "lzcnt", "abm", "adx", "asimd", "sve", "sme", "fphp", "bf16", "i8mm",
)  # fmt: skip


def host_instruction_set() -> str:
    """The code-generation features of this host's CPU, sorted and comma-joined: what a CPU
    executable compiled here may need of the host that runs it (part of every CPU program's
    key, so computed once per set of flags)."""
    return _instruction_set(host_cpu_flags())


@functools.cache
def _instruction_set(flags: frozenset[str]) -> str:
    codegen = (f for f in flags if f.startswith(CODEGEN_FLAG_PREFIXES))
    return ",".join(sorted(f for f in codegen if f != "smep"))  # smep: x86 kernel protection


# XLA:CPU's option that names the operations it hands to its YNNPACK library fusions.
YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"
# YNNPACK dots and reductions, XLA's Eigen convolutions (its YNNPACK convolution fusion off).
DOTS_AND_REDUCTIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
# Whole programs' XLA:CPU options (`compiler_options`).
CPU_OPTIONS: dict[str, str] = {YNN_FUSION_TYPE: DOTS_AND_REDUCTIONS}


def compiler_options(backend: str | None = None) -> dict[str, str]:
    """XLA options for whole training programs on `backend` (pass to `jax.jit` or `.compile()`).

    On a CPU: convolutions on XLA's Eigen path, dots and reductions in YNNPACK
    (`DOTS_AND_REDUCTIONS`). XLA's default sends convolutions to YNNPACK too, which is slower on
    a training step's backward convolutions: ~10x on a kernel gradient's large-window
    convolution on AMD Zen 3 (8-conv net 1.92 -> 0.66 s/step with Eigen convolutions), and on
    an AMD EPYC with AVX-512 the 4-conv net's step is 45.1 -> 26.3 ms and the 8-conv net's
    0.288 -> 0.209 s (`bench_train_step.py --impls custom-default custom`; README, "Speed").
    The reductions must stay in YNNPACK: XLA's own reduction emitter sums BN's batch
    statistics less exactly, and with Eigen convolutions alone the 8-conv net's kernel
    gradients were off by 1.2e-2 against float64 (batch 8), against 1.6e-6 with the
    reductions in YNNPACK and 2.2e-6 with XLA's defaults (tests/test_conv.py prints them).
    Only the AVX-512 host measured the reductions' speed. Layer-wise training keeps its own
    options (`layerwise.compiler_options`).
    Per program, unlike XLA_FLAGS, which binds the whole process and only when set before the
    backend starts. Only those this jaxlib has (`xla_backend.known_options`): XLA drops options
    between releases, and one it no longer has would fail every compile.
    """
    if (backend or jax.default_backend()) != "cpu":
        return {}
    return xla_backend.known_options(CPU_OPTIONS)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """(output size, padding before, padding after) of TensorFlow/Flax SAME padding.

    The padding after is negative when the last input rows are never read (e.g. a 1x1 kernel
    with stride 2 on an even size); `lax.pad` and `conv_general_dilated` accept that.
    """
    out = -(-size // stride)
    total = (out - 1) * stride + kernel - size
    before = max(total, 0) // 2
    return out, before, total - before


# A convolution with at most this many multiply-adds per output pixel (taps x in x out
# channels) runs as a sum of shifted, scaled copies of its input, which XLA:CPU fuses into one
# loop; its convolution kernel has a large fixed cost at the few channels evolution starts
# from. `scripts/bench_tap_conv.py` (batch 50, 28x28, forward + backward, tap sum faster by):
# 1->1 3x3 4.8x, 2->2 3x3 2.7x, 4->4 3x3 1.5x, 1->1 5x5 3.3x; but 2->2 5x5 0.86x, and outside
# the bound 4->8 3x3 1.1x, 4->4 5x5 0.7x, 8->8 3x3 0.3x.
TAP_SUM_MAX_TERMS = 160


def _tap_conv(x, w, stride: int, padding, dilation: int = 1) -> jax.Array:
    """`lax.conv_general_dilated(x, w, (stride,) * 2, padding, lhs_dilation=(dilation,) * 2)`
    as a sum over taps and input channels of strided slices times kernel rows."""
    kh, kw, cin, _ = w.shape
    (top, bottom), (left, right) = padding
    zero = jnp.zeros((), x.dtype)
    d = dilation - 1
    xp = lax.pad(x, zero, [(0, 0, 0), (top, bottom, d), (left, right, d), (0, 0, 0)])
    n, hp, wp, _ = xp.shape
    ho, wo = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            limit = (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, cin)
            tap = lax.slice(xp, (0, i, j, 0), limit, (1, stride, stride, 1))
            for c in range(cin):
                term = tap[..., c : c + 1] * w[i, j, c]
                out = term if out is None else out + term
    return out


# A convolution with at most this many input channels runs as a tap sum up to this many
# multiply-adds per output pixel: the loop is over taps x in channels, each term a vector over
# the out channels, so a wide output costs little. `scripts/bench_tap_conv.py` and the forward
# alone (batch 50, 32x32, AMD Zen 3, tap sum faster by): 3x3 3->32 1.9x (a CIFAR net's first
# layer), 1->128 1.9x, 4->32 1.1x, 5x5 1->32 3.3x, 4->8 2.0x; but 3x3 3->128 0.8x, 8->8 0.9x.
TAP_SUM_FEW_INPUTS = 4
TAP_SUM_FEW_INPUTS_MAX_TERMS = 1152


def uses_tap_sum(kh: int, kw: int, cin: int, cout: int) -> bool:
    """Whether a (kh, kw, cin, cout) convolution runs as a sum of shifted, scaled copies."""
    terms = kh * kw * cin * cout
    if cin <= TAP_SUM_FEW_INPUTS and terms <= TAP_SUM_FEW_INPUTS_MAX_TERMS:
        return True
    return terms <= TAP_SUM_MAX_TERMS


def _small(w: jax.Array) -> bool:
    return uses_tap_sum(*w.shape)


def _forward(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    _, h, wd, _ = x.shape
    kh, kw = w.shape[:2]
    _, top, bottom = same_padding(h, kh, stride)
    _, left, right = same_padding(wd, kw, stride)
    padding = [(top, bottom), (left, right)]
    if _small(w):
        return _tap_conv(x, w, stride, padding)
    return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=_DN)


def uses_phases(kh: int, kw: int, ho: int, wo: int, stride: int) -> bool:
    """Whether the input gradient of a strided convolution with a (kh, kw) kernel and an
    (ho, wo) output runs as phase convolutions (`_strided_input_grad`)."""
    return stride > 1 and (kh * kw > 9 or ho * wo >= 64)


def _strided_input_grad(dy, w, stride: int, size: tuple[int, int], pad: tuple[int, int]):
    """The input gradient of a strided convolution as stride**2 phase convolutions.

    Input row p (counted in the padded input) gets dy[o] w[t]^T over o*stride + t == p, so
    rows with p % stride == r see only the taps t = r + stride*k, at o = p // stride - k: for
    each phase (r, c) a stride-1 correlation of dy with the flipped sub-kernel w[r::s, c::s],
    without the zeros of a stride-dilated dy (a quarter of its multiply-adds at stride 2).
    The phases are interleaved and the padding cut off. On AMD Zen 3 (batch 50) this measured
    1.4-1.8x faster than the dilated convolution for 3x3 kernels on 32x32 inputs, 1.0-1.4x on
    16x16, 1.6-22x for 5x5 kernels; slower for 3x3 kernels on 4x4 outputs, which keep the
    dilated convolution.
    """
    n, ho, wo, _ = dy.shape
    kh, kw, cin, _ = w.shape
    (h, wd), (top, left) = size, pad
    qh, qw = -(-(top + h) // stride), -(-(left + wd) // stride)
    zero = jnp.zeros((), dy.dtype)
    rows = []
    for r in range(stride):
        phases = []
        for c in range(stride):
            sub = jnp.flip(w[r::stride, c::stride], (0, 1)).transpose(0, 1, 3, 2)
            a, b = sub.shape[:2]
            if a == 0 or b == 0:
                phases.append(jnp.zeros((n, qh, qw, cin), dy.dtype))
            elif a == b == 1:
                grown = lax.pad(dy, zero, [(0, 0, 0), (0, qh - ho, 0), (0, qw - wo, 0), (0, 0, 0)])
                phases.append(jnp.einsum("nhwo,oc->nhwc", grown, sub[0, 0]))
            else:
                padding = [(a - 1, qh - ho), (b - 1, qw - wo)]
                phases.append(
                    lax.conv_general_dilated(dy, sub, (1, 1), padding, dimension_numbers=_DN)
                )
        rows.append(jnp.stack(phases, axis=3))
    dx = jnp.stack(rows, axis=2).reshape(n, qh * stride, qw * stride, cin)
    return dx[:, top : top + h, left : left + wd, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_kxk(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    return _forward(x, w, stride)


def _conv_kxk_fwd(x, w, stride):
    return _forward(x, w, stride), (x, w)


def _conv_kxk_bwd(stride, residuals, dy):
    x, w = residuals
    _, h, wd, _ = x.shape
    kh, kw = w.shape[:2]
    ho, top, bottom = same_padding(h, kh, stride)
    wo, left, right = same_padding(wd, kw, stride)
    # dx: a full correlation of the stride-dilated dy with the flipped kernel, its in/out
    # channels swapped; the padding puts input row a at the sum over output rows o and taps t
    # with o*stride + t - top == a.
    w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    dx_pad = [
        (kh - 1 - top, h + top - (ho - 1) * stride - 1),
        (kw - 1 - left, wd + left - (wo - 1) * stride - 1),
    ]
    if _small(w_t):
        dx = _tap_conv(dy, w_t, 1, dx_pad, dilation=stride)
    elif uses_phases(kh, kw, ho, wo, stride):
        dx = _strided_input_grad(dy, w, stride, (h, wd), (top, left))
    else:
        dx = lax.conv_general_dilated(
            dy, w_t, (1, 1), dx_pad, lhs_dilation=(stride, stride), dimension_numbers=_DN
        )
    # dW: channels play the batch, the batch is contracted as the feature dimension and dy is
    # the (stride-dilated) window, so that the whole product is one canonical convolution.
    dw = lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0),
        dy.transpose(1, 2, 0, 3),
        (1, 1),
        [(top, bottom), (left, right)],
        rhs_dilation=(stride, stride),
        dimension_numbers=_DN,
    )
    return dx, dw.transpose(1, 2, 0, 3)


_conv_kxk.defvjp(_conv_kxk_fwd, _conv_kxk_bwd)


def _conv_1x1(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    # SAME padding of a 1x1 kernel is none: the stride only subsamples. Autodiff of a strided
    # slice and a dot gives a pad and two dots, all in standard layouts.
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    return jnp.einsum("nhwc,co->nhwo", x, w[0, 0])


def conv2d(x: jax.Array, w: jax.Array, stride: int = 1) -> jax.Array:
    """SAME-padded convolution of NHWC `x` with HWIO `w`, differentiable in both.

    Args:
        x: Input, (batch, height, width, in channels).
        w: Kernel, (kh, kw, in channels, out channels); kh and kw odd.
        stride: The same stride on both spatial axes.

    Returns:
        (batch, ceil(height / stride), ceil(width / stride), out channels), as
        `lax.conv_general_dilated(x, w, (stride, stride), "SAME")` computes it.
    """
    if w.shape[:2] == (1, 1):
        return _conv_1x1(x, w, stride)
    return _conv_kxk(x, w, stride)


def conv2d_vjp(x: jax.Array, w: jax.Array, dy: jax.Array, stride: int = 1):
    """The gradients (dx, dw) of `conv2d(x, w, stride)` for the output's `dy`: its backward
    rule called directly, without tracing the forward that `jax.vjp` would trace and then
    drop (a layer program's backward traces ~40 % faster: `layerwise.conv_bwd`)."""
    if w.shape[:2] == (1, 1):
        return jax.vjp(lambda x, w: _conv_1x1(x, w, stride), x, w)[1](dy)
    return _conv_kxk_bwd(stride, (x, w), dy)


def xla_conv2d(x: jax.Array, w: jax.Array, stride: int = 1) -> jax.Array:
    """XLA's own convolution with autodiff's backward: the reference and the TPU/GPU path."""
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=_DN)


@jax.custom_jvp
def stored_relu(x: jax.Array) -> jax.Array:
    """`jax.nn.relu` (the same values, NaNs and signed zeros; derivative 0 at 0), written so
    that XLA:CPU computes it once and stores it. (Subnormal inputs pass unchanged; XLA:CPU's
    maximum flushes them to zero.)

    `jnp.maximum(x, 0)` has one full-size operand, so XLA's fusion copies it, and the BN before
    it, into every consumer that can take it: `conv2d`'s kernel gradient then recomputes BN+ReLU
    inside its (N, H, W, C) -> (C, H, W, N) transpose, element by element in the transposed
    order. A select has two full-size operands (the mask and `x`), and XLA does not copy such
    an op into one consumer when another (the forward convolution) cannot fuse it: the
    activation is stored once and the transpose reads it. A training step 1.01-1.02x faster
    (paired medians; min/min 1.04-1.08x) on AMD Zen 3: `scripts/bench_train_step.py --impls
    custom-maxrelu custom`.
    """
    return jnp.where(x <= 0, jnp.zeros((), x.dtype), x)


@stored_relu.defjvp
def _stored_relu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return stored_relu(x), jnp.where(x > 0, t, jnp.zeros((), t.dtype))


def relu_for(impl: str) -> Callable[[jax.Array], jax.Array]:
    """The ReLU to use before convolutions of `impl` (`IMPLS`): `stored_relu` before `conv2d`."""
    return stored_relu if resolve_impl(impl) == "custom" else jax.nn.relu


_FUNCTIONS: dict[str, Callable[[jax.Array, jax.Array, int], jax.Array]] = {
    "xla": xla_conv2d,
    "custom": conv2d,
}


class Conv(nn.Module):
    """`nn.Conv(features, kernel_size, strides, padding="SAME", use_bias=False)`, same params.

    Attributes:
        features: Output channels.
        kernel_size: (kh, kw), each odd.
        stride: The stride on both spatial axes.
        impl: One of `IMPLS`, resolved at trace time by `resolve_impl`.
    """

    features: int
    kernel_size: tuple[int, int]
    stride: int = 1
    impl: str = "auto"
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        shape = (kh, kw, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        return _FUNCTIONS[resolve_impl(self.impl)](x, kernel.astype(x.dtype), self.stride)

"""The Flax module generated from a DNA, and cheap creation of its variables.

Variable names carry the IDs of the DNA elements they belong to, which is what weight
inheritance matches on; they and their shapes come from the DNA's resolved architecture
(`evojax_nas.architecture`, which lists them). Variables are created on the host from shapes
computed from the DNA alone (microseconds), never by tracing the module eagerly, which costs
seconds per architecture (DESIGN §6).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from evojax_nas.architecture import OUTPUT, bn_name, conv_name, resolve
from evojax_nas.conv import Conv, relu_for, resolve_impl
from evojax_nas.dna import DNA

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-3

Variables = dict[str, dict[str, dict[str, Any]]]


def nearest_resize(x: jax.Array, height: int, width: int) -> jax.Array:
    """Zeroth-order interpolation of an NHWC tensor to `height`×`width`.

    Output pixel i takes input pixel floor(i * in / out); integer ratios use strided slicing
    or repetition, which XLA runs much faster than a gather.
    """
    for axis, out in ((1, height), (2, width)):
        size = x.shape[axis]
        if size == out:
            continue
        if size % out == 0:
            x = jax.lax.slice_in_dim(x, 0, size, stride=size // out, axis=axis)
        elif out % size == 0:
            x = jnp.repeat(x, out // size, axis=axis)
        else:
            x = jnp.take(x, np.arange(out) * size // out, axis=axis)
    return x


def match_depth(x: jax.Array, depth: int) -> jax.Array:
    """Truncates or zero-pads the channel axis to `depth`."""
    have = x.shape[-1]
    if have >= depth:
        return x[..., :depth]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, depth - have)])


def resolve_inputs(primary: jax.Array, others: Sequence[jax.Array]) -> jax.Array:
    """Sums a vertex's inputs in the primary input's size and depth (paper §3.2)."""
    _, height, width, depth = primary.shape
    total = primary
    for x in others:
        total = total + match_depth(nearest_resize(x, height, width), depth)
    return total


class DNANet(nn.Module):
    """A classifier whose graph is the DNA's; `train` selects batch statistics for BN.

    `conv_impl` picks the convolution (`evojax_nas.conv.IMPLS`; "auto" resolves per backend
    at trace time) and the ReLU that suits it (`conv.relu_for`: the same values); every
    implementation has the same variables.
    """

    dna: DNA
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        arch = resolve(self.dna)
        acts: dict[int, jax.Array] = {}
        for vid in arch.order:
            vertex = arch.vertices[vid]
            if vertex.role == "input":
                h = x
            else:
                depth = arch.shapes[vid].depth
                inputs = [self._edge(e, acts[e.src], depth) for e in arch.inputs[vid]]
                h = resolve_inputs(inputs[0], inputs[1:])
            if vertex.kind == "bn_relu":
                h = nn.BatchNorm(
                    use_running_average=not train,
                    momentum=BN_MOMENTUM,
                    epsilon=BN_EPSILON,
                    name=bn_name(vid),
                )(h)
                h = relu_for(self.conv_impl)(h)
            acts[vid] = h
        pooled = jnp.mean(acts[arch.output_id], axis=(1, 2))
        return nn.Dense(self.dna.num_classes, name=OUTPUT)(pooled)

    def _edge(self, edge, x: jax.Array, depth: int) -> jax.Array:
        if not edge.is_conv:
            return x
        stride = 2**edge.stride_log2
        if resolve_impl(self.conv_impl) != "xla":
            conv = Conv(depth, edge.filter_shape, stride, self.conv_impl, name=conv_name(edge.id))
            return conv(x)
        return nn.Conv(
            depth,
            kernel_size=edge.filter_shape,
            strides=(stride, stride),
            padding="SAME",
            use_bias=False,
            name=conv_name(edge.id),
        )(x)


def variable_shapes(dna: DNA) -> dict[tuple[str, str, str], tuple[int, ...]]:
    """Every variable's shape, keyed by (collection, module, name), from the DNA alone."""
    return dict(resolve(dna).variables)


def _rng_for(key: jax.Array, name: tuple[str, ...]) -> np.random.Generator:
    """A host RNG seeded by the key and the variable's name: a variable's fresh value does not
    depend on which other variables exist."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = [int(w) for w in np.asarray(key).ravel()]
    return np.random.default_rng([*words, zlib.crc32("/".join(name).encode())])


def fresh_variable(dna: DNA, name: tuple[str, str, str], shape, key: jax.Array) -> np.ndarray:
    """The initial value of one variable: He-normal kernels, unit scale/var, zero bias/mean."""
    collection, module, leaf = name
    if leaf in ("scale", "var"):
        return np.ones(shape, np.float32)
    if leaf in ("bias", "mean"):
        return np.zeros(shape, np.float32)
    fan_in = int(np.prod(shape[:-1]))
    if module == OUTPUT:
        std = np.sqrt(1.0 / fan_in)
    else:
        arch = resolve(dna)
        edge = arch.conv_modules[module]
        # He init, scaled down when several edges are summed into the destination vertex.
        std = np.sqrt(2.0 / fan_in) / np.sqrt(len(arch.inputs[edge.dst]))
    return (_rng_for(key, name).standard_normal(shape) * std).astype(np.float32)


def init_variables(dna: DNA, key: jax.Array) -> Variables:
    """Fresh variables for a DNA, as nested dicts of numpy arrays (host memory)."""
    variables: Variables = {"params": {}, "batch_stats": {}}
    for name, shape in variable_shapes(dna).items():
        collection, module, leaf = name
        value = fresh_variable(dna, name, shape, key)
        variables[collection].setdefault(module, {})[leaf] = value
    return variables


def count_params(variables: Variables) -> int:
    """Number of trainable parameters."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(variables["params"])))


def flatten(variables: Variables) -> dict[tuple[str, str, str], Any]:
    return {
        (c, m, n): value
        for c, modules in variables.items()
        for m, leaves in modules.items()
        for n, value in leaves.items()
    }

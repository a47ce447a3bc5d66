"""The architecture a DNA encodes, resolved once: order, shapes, inputs and variable names.

`resolve(dna)` is the one place that derives, from a DNA, what the model, weight inheritance,
the compiled programs' abstract arguments and the exported model need: the vertices in
topological order, every vertex's scale and depth, each vertex's incoming edges (primary first),
and every variable's name and shape. The result is cached per DNA (the DNA is a frozen, hashable
dataclass; equal DNAs share one resolution), so one child's topology is derived once however many
readers ask. Variable names are built here and nowhere else, and never parsed back:

    params/conv_e{edge id}/kernel        (kh, kw, in depth, out depth), no bias
    params/bn_v{vertex id}/scale, bias   (depth,)
    batch_stats/bn_v{vertex id}/mean, var
    params/output/kernel, bias           (output vertex depth, classes), (classes,)

Plain Python (no JAX). `evojax_nas.dna` builds on this module, so it reads a DNA by its fields
(`vertices`, `edges`, `input_channels`, `num_classes`) and does not import `dna`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

from evojax_nas.errors import DNAError

Name = tuple[str, str, str]  # (collection, module, leaf)
OUTPUT = "output"  # the classifier head's module name
BN_VARIABLES = (
    ("params", "scale"),
    ("params", "bias"),
    ("batch_stats", "mean"),
    ("batch_stats", "var"),
)


def conv_name(edge_id: int) -> str:
    """The module name of a conv edge's kernel."""
    return f"conv_e{edge_id}"


def bn_name(vertex_id: int) -> str:
    """The module name of a BN+ReLU vertex's scale, bias and statistics."""
    return f"bn_v{vertex_id}"


@dataclasses.dataclass(frozen=True)
class VertexShape:
    """A vertex's activation shape relative to the input: 2**-scale_log2 of its size, `depth`."""

    scale_log2: int
    depth: int


@dataclasses.dataclass(frozen=True, eq=False)
class Architecture:
    """What a DNA resolves to. Build with `resolve`; every field is derived from the DNA alone.

    `order` is computed at once (it is `validate`'s cycle check); the rest on first use, since
    it assumes a DNA that passed `validate` (every non-input vertex has a primary input).
    Read the DNA itself (learning rate, IDs) from the caller's DNA, not from here.
    """

    _dna: Any = dataclasses.field(repr=False)  # the DNA resolved, or an equal one
    order: tuple[int, ...]  # vertex IDs, every edge going forward

    @functools.cached_property
    def vertices(self) -> Mapping[int, Any]:
        """Vertex ID → Vertex."""
        return {v.id: v for v in self._dna.vertices}

    @functools.cached_property
    def inputs(self) -> Mapping[int, tuple[Any, ...]]:
        """Vertex ID → its incoming edges, the primary (backbone) one first, then by ID."""
        into: dict[int, list] = {vid: [] for vid in self.order}
        for e in self._dna.edges:
            into[e.dst].append(e)
        return {
            vid: tuple(sorted(es, key=lambda e: (e.precedence, e.id))) for vid, es in into.items()
        }

    @functools.cached_property
    def shapes(self) -> Mapping[int, VertexShape]:
        """Vertex ID → its scale and depth, from its primary incoming edge (DESIGN §2)."""
        shapes: dict[int, VertexShape] = {}
        for vid in self.order:
            if self.vertices[vid].role == "input":
                shapes[vid] = VertexShape(0, self._dna.input_channels)
                continue
            primary = self.inputs[vid][0]
            src = shapes[primary.src]
            shapes[vid] = VertexShape(
                src.scale_log2 + primary.stride_log2, primary.out_depth(src.depth)
            )
        return shapes

    @functools.cached_property
    def output_id(self) -> int:
        return next(v.id for v in self._dna.vertices if v.role == "output")

    @functools.cached_property
    def variables(self) -> Mapping[Name, tuple[int, ...]]:
        """Every variable's shape, keyed by (collection, module, leaf)."""
        shapes = self.shapes
        out: dict[Name, tuple[int, ...]] = {}
        for e in self._dna.edges:
            if e.is_conv:
                kh, kw = e.filter_shape
                depths = (shapes[e.src].depth, shapes[e.dst].depth)
                out["params", conv_name(e.id), "kernel"] = (kh, kw, *depths)
        for v in self._dna.vertices:
            if v.kind == "bn_relu":
                d = (shapes[v.id].depth,)
                for collection, leaf in BN_VARIABLES:
                    out[collection, bn_name(v.id), leaf] = d
        classes = self._dna.num_classes
        out["params", OUTPUT, "kernel"] = (shapes[self.output_id].depth, classes)
        out["params", OUTPUT, "bias"] = (classes,)
        return out

    @functools.cached_property
    def conv_modules(self) -> Mapping[str, Any]:
        """Conv module name → its Edge (what a variable name refers to, without parsing it)."""
        return {conv_name(e.id): e for e in self._dna.edges if e.is_conv}


def topological_sort(dna: Any) -> tuple[int, ...]:
    """Vertex IDs in an order where every edge goes forward; DNAError on a cycle."""
    indegree = {v.id: 0 for v in dna.vertices}
    out_edges: dict[int, list[int]] = {vid: [] for vid in indegree}
    for e in dna.edges:
        indegree[e.dst] += 1
        out_edges.setdefault(e.src, []).append(e.dst)
    ready = sorted(v for v, d in indegree.items() if d == 0)
    order: list[int] = []
    while ready:
        vid = ready.pop(0)
        order.append(vid)
        for dst in sorted(out_edges[vid]):
            indegree[dst] -= 1
            if indegree[dst] == 0:
                ready.append(dst)
    if len(order) != len(indegree):
        stuck = sorted(set(indegree) - set(order))
        raise DNAError(f"the graph has a cycle through vertices {stuck}")
    return tuple(order)


def _build(dna: Any) -> Architecture:
    return Architecture(dna, topological_sort(dna))


_cached_build = functools.lru_cache(maxsize=1024)(_build)


def resolve(dna: Any) -> Architecture:
    """The architecture of `dna` (an `evojax_nas.dna.DNA`), derived once per distinct DNA.

    Raises:
        DNAError: the graph has a cycle.
    """
    try:
        hash(dna)
    except TypeError:  # leaves replaced by arrays (a DNA mapped as a pytree): not cached
        return _build(dna)
    return _cached_build(dna)


def multiply_adds(dna: Any, height: int, width: int) -> tuple[int, int]:
    """(multiply-adds of one image's forward pass, of its backward pass): convolutions and the
    dense layer, the layers whose cost grows with the product of their depths.

    Counted from the architecture, so the figure does not depend on how a program computes it
    (XLA's own count of a compiled program does: a layer-wise program, a convolution run as a
    sum of shifted copies, or a fused loop count differently). The backward pass computes each
    kernel's gradient and, except for layers reading the input image, its input's gradient.
    Elementwise work (BN, ReLU, merges, pooling) is left out, as is usual.
    """
    arch = resolve(dna)
    forward = backward = 0
    for e in dna.edges:
        if not e.is_conv:
            continue
        scale = 2 ** (arch.shapes[e.src].scale_log2 + e.stride_log2)  # before any resize
        kh, kw = e.filter_shape
        macs = -(-height // scale) * -(-width // scale) * kh * kw
        macs *= arch.shapes[e.src].depth * arch.shapes[e.dst].depth
        forward += macs
        backward += macs * (1 if arch.vertices[e.src].role == "input" else 2)
    dense = arch.shapes[arch.output_id].depth * dna.num_classes
    return forward + dense, backward + 2 * dense


def flops(dna: Any, height: int, width: int, batch: int, train: bool) -> float:
    """FLOPs (2 per multiply-add, `multiply_adds`) of a training step on `batch` images
    (forward and backward: the paper's Ft) or of evaluating them (forward: Fv per batch)."""
    forward, backward = multiply_adds(dna, height, width)
    return 2.0 * batch * (forward + backward if train else forward)

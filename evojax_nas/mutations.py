"""The paper's mutations (§3.2) and weight inheritance (§3.6).

Each mutation is a pure function `(dna, params, key) -> (child_dna, child_params)`, where
`params` is the whole variable tree (`model.Variables`: trainable weights and batch-norm
statistics). Internally a mutation is an *edit*, a DNA → DNA transform that also names the
tensors it forces to be re-initialised, followed by `inherit`, which copies every parent tensor
whose name (hence ID) and shape are unchanged and draws the rest fresh.

Keys: the edit of step `step` draws its uniforms from `fold_in(fold_in(key, 0), step)`, the
fresh weights come from `fold_in(key, 1)` and, in `mutate`, the choice of mutation from
`fold_in(fold_in(key, 2), step)`; so `mutate(..., weights={name: 1})` gives bit for bit the child
of `MUTATIONS[name]` called with the same key.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from evojax_nas import dna as dna_lib
from evojax_nas import model
from evojax_nas.architecture import Name
from evojax_nas.dna import BACKBONE, DNA, SKIP, Edge, Vertex
from evojax_nas.errors import EvojaxNasError

Draws = tuple[float, ...]  # uniforms in [0, 1) that decide an edit's random choices
Mutation = Callable[[DNA, model.Variables, jax.Array], tuple[DNA, model.Variables]]


class NotApplicable(EvojaxNasError):  # noqa: N818 - the paper's wording: "cannot apply"
    """A mutation cannot apply to this DNA (no conv to remove, no skip to delete, ...)."""


class MutationError(EvojaxNasError, ValueError):
    """`mutate` was asked for something impossible: unknown names, bad weights, no candidate."""


class _Everything:
    """A container holding every name: `reinit=EVERYTHING` re-initialises all tensors."""

    def __contains__(self, item: object) -> bool:
        return True

    def __repr__(self) -> str:
        return "EVERYTHING"


EVERYTHING: Container[Name] = _Everything()


@dataclasses.dataclass(frozen=True)
class Edit:
    """An edit's result: the child DNA, the IDs it added/removed/changed, forced re-inits."""

    dna: DNA
    touched: tuple[int, ...] = ()
    reinit: Container[Name] = frozenset()


@dataclasses.dataclass(frozen=True)
class MutationReport:
    """What `mutate` did.

    Attributes:
        names: the applied mutations, in order.
        touched: IDs of the vertices and edges added, removed or changed, sorted.
        reinitialised: tensors of the child not copied from the parent, as
            "collection/module/leaf", sorted.
    """

    names: tuple[str, ...]
    touched: tuple[int, ...]
    reinitialised: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "touched": list(self.touched),
            "reinitialised": list(self.reinitialised),
        }


# --------------------------------------------------------------------------- inheritance


def inherit(
    parent_vars: model.Variables | None,
    child_dna: DNA,
    key: jax.Array,
    reinit: Container[Name] = frozenset(),
) -> tuple[model.Variables, tuple[Name, ...]]:
    """The child's variables: the parent's tensor where name and shape match, else fresh.

    Args:
        parent_vars: the parent's variable tree (None: no parent, every tensor is fresh).
        child_dna: the child's DNA; its `model.variable_shapes` decide the tree.
        key: seeds the fresh tensors (`model.fresh_variable`, per tensor name).
        reinit: names to draw fresh even when the parent has them; `EVERYTHING` for all.

    Returns:
        The child's variables (inherited arrays are the parent's own objects, bit for bit) and
        the names drawn fresh, sorted.
    """
    parent = model.flatten(parent_vars) if parent_vars else {}
    child: model.Variables = {"params": {}, "batch_stats": {}}
    fresh: list[Name] = []
    for name, shape in model.variable_shapes(child_dna).items():
        old = parent.get(name)
        if old is not None and name not in reinit and tuple(np.shape(old)) == tuple(shape):
            value = old
        else:
            value = model.fresh_variable(child_dna, name, shape, key)
            fresh.append(name)
        collection, module, leaf = name
        child[collection].setdefault(module, {})[leaf] = value
    return child, tuple(sorted(fresh))


def name_str(name: Name) -> str:
    return "/".join(name)


# --------------------------------------------------------------------------- random draws

EDIT_DRAWS = 4  # uniforms an edit receives: [0] where, [1] vertex kind, [2] stride/axis, [3] value


@functools.partial(jax.jit, static_argnums=3)
def _uniforms(key: jax.Array, purpose: int, step: int, n: int) -> jax.Array:
    # One compiled call per draw site: eager fold_in/uniform dispatches cost ~1 ms each on CPU.
    return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, purpose), step), (n,))


def draws(key: jax.Array, purpose: int, step: int, n: int) -> tuple[float, ...]:
    """`n` uniforms in [0, 1) from `fold_in(fold_in(key, purpose), step)`, as Python floats."""
    return tuple(float(x) for x in np.asarray(_uniforms(key, purpose, step, n)))


_fold_in = jax.jit(jax.random.fold_in)


def _pick(u: float, items: Sequence[Any]) -> Any:
    return items[min(int(u * len(items)), len(items) - 1)]


def _between(u: float, low: float, high: float) -> float:
    # The draw is float32; the arithmetic is in Python floats, so the DNA keeps float64 values.
    return low + (high - low) * u


# --------------------------------------------------------------------------- edits


def _replace_edge(dna: DNA, new: Edge) -> DNA:
    return dna.replace(edges=tuple(new if e.id == new.id else e for e in dna.edges))


def _backbone_edges(dna: DNA) -> list[Edge]:
    return sorted((e for e in dna.edges if not e.is_skip), key=lambda e: e.id)


def _identity(dna: DNA, u: Draws) -> Edit:
    """IDENTITY: the child is the parent ("keep training")."""
    return Edit(dna)


def _alter_learning_rate(dna: DNA, u: Draws) -> Edit:
    """ALTER-LEARNING-RATE: multiplies the learning rate by 2**U(-1, 1)."""
    factor = 2.0 ** _between(u[3], -1.0, 1.0)
    return Edit(dna_lib.validate(dna.replace(learning_rate=dna.learning_rate * factor)))


def _reset_weights(dna: DNA, u: Draws) -> Edit:
    """RESET-WEIGHTS: the same DNA, every tensor drawn fresh (He init)."""
    return Edit(dna, reinit=EVERYTHING)


def _insert(dna: DNA, u: Draws, *, conv: bool) -> Edit:
    """Splits a random backbone edge u→w into a new edge u→x and the old edge, now x→w."""
    old = _pick(u[0], _backbone_edges(dna))
    kind = "bn_relu" if u[1] < 0.5 else "linear"
    (vid, eid), dna = dna.fresh_ids(2)
    if conv:
        stride_scale = 1.0 if u[2] < 0.5 else 0.0
        new = Edge(eid, old.src, vid, "conv", BACKBONE, 1.0, 1.0, 1.0, stride_scale)
    else:
        new = Edge(eid, old.src, vid, "identity", BACKBONE)
    # The old edge keeps its ID and numbers: x has u's depth, so its kernel keeps its shape.
    moved = dataclasses.replace(old, src=vid)
    child = dna.replace(
        vertices=(*dna.vertices, Vertex(vid, kind, "hidden")),
        edges=(*_replace_edge(dna, moved).edges, new),
    )
    return Edit(dna_lib.validate(child), touched=(vid, eid, old.id))


def _insert_convolution(dna: DNA, u: Draws) -> Edit:
    """INSERT-CONVOLUTION: a 3×3 conv, stride 1 or 2, depth as its input's, at a random place
    in the backbone; the new vertex is BN+ReLU or linear at random."""
    return _insert(dna, u, conv=True)


def _insert_one_to_one(dna: DNA, u: Draws) -> Edit:
    """INSERT-ONE-TO-ONE: as insert-convolution, with an identity edge."""
    return _insert(dna, u, conv=False)


def _remove_convolution(dna: DNA, u: Draws) -> Edit:
    """REMOVE-CONVOLUTION: excises a hidden backbone vertex x whose backbone in-edge u→x is a
    conv; x's backbone out-edge x→w keeps its ID and becomes u→w."""
    candidates = [
        v.id
        for v in sorted(dna.vertices, key=lambda v: v.id)
        if v.role == "hidden" and dna.in_edges(v.id)[0].is_conv
    ]
    if not candidates:
        raise NotApplicable("remove_convolution: no backbone convolution to remove")
    vid = _pick(u[0], candidates)
    into = dna.in_edges(vid)[0]
    out = next(e for e in dna.out_edges(vid) if not e.is_skip)
    u, w = into.src, out.dst
    dropped = {into.id}
    dropped |= {e.id for e in dna.edges if e.is_skip and vid in (e.src, e.dst)}
    dropped |= {e.id for e in dna.edges if e.is_skip and (e.src, e.dst) == (u, w)}
    edges = tuple(
        dataclasses.replace(e, src=u) if e.id == out.id else e
        for e in dna.edges
        if e.id not in dropped
    )
    vertices = tuple(v for v in dna.vertices if v.id != vid)
    child = dna.replace(vertices=vertices, edges=edges)
    return Edit(dna_lib.validate(child), touched=tuple(sorted({vid, out.id, *dropped})))


def _add_skip(dna: DNA, u: Draws) -> Edit:
    """ADD-SKIP: an identity edge from a backbone vertex to a later, non-adjacent one.

    Every edge goes forward along the backbone, so a forward skip never forms a cycle.
    """
    path = dna_lib.backbone(dna)
    pairs = {(e.src, e.dst) for e in dna.edges}
    candidates = [(a, b) for i, a in enumerate(path) for b in path[i + 2 :] if (a, b) not in pairs]
    if not candidates:
        raise NotApplicable("add_skip: no pair of non-adjacent backbone vertices left to join")
    src, dst = _pick(u[0], candidates)
    (eid,), dna = dna.fresh_ids(1)
    child = dna.replace(edges=(*dna.edges, Edge(eid, src, dst, "identity", SKIP)))
    return Edit(dna_lib.validate(child), touched=(eid,))


def _remove_skip(dna: DNA, u: Draws) -> Edit:
    """REMOVE-SKIP: deletes a random skip edge."""
    skips = sorted((e for e in dna.edges if e.is_skip), key=lambda e: e.id)
    if not skips:
        raise NotApplicable("remove_skip: the DNA has no skip connection")
    gone = _pick(u[0], skips)
    child = dna.replace(edges=tuple(e for e in dna.edges if e.id != gone.id))
    return Edit(dna_lib.validate(child), touched=(gone.id,))


def _alter_conv(dna: DNA, u: Draws, what: str, change: Callable[[Edge, Draws], Edge]) -> Edit:
    convs = sorted(dna.conv_edges(), key=lambda e: e.id)
    if not convs:
        raise NotApplicable(f"{what}: the DNA has no convolution")
    edge = _pick(u[0], convs)
    child = _replace_edge(dna, change(edge, u))
    return Edit(dna_lib.validate(child), touched=(edge.id,))


def _alter_number_of_channels(dna: DNA, u: Draws) -> Edit:
    """ALTER-NUMBER-OF-CHANNELS: a random conv's depth factor times U(1/2, 2)."""

    def change(e: Edge, u: Draws) -> Edge:
        return dataclasses.replace(e, depth_factor=e.depth_factor * _between(u[3], 0.5, 2.0))

    return _alter_conv(dna, u, "alter_number_of_channels", change)


def _alter_stride(dna: DNA, u: Draws) -> Edit:
    """ALTER-STRIDE: a random conv's log2 stride s becomes U(max(0, s - 1), s + 1), i.e.
    stride ½× to 2×, so a stride-1 conv can still grow."""

    def change(e: Edge, u: Draws) -> Edge:
        s = e.stride_scale
        return dataclasses.replace(e, stride_scale=_between(u[3], max(0.0, s - 1.0), s + 1.0))

    return _alter_conv(dna, u, "alter_stride", change)


def filter_half_range(half: float) -> tuple[float, float]:
    """Range of a new filter half-size: half to twice the filter, never stuck at 1×1 (half 0)."""
    return max(0.0, min(half / 2, half - 1.0)), max(2.0 * half, half + 1.0)


def _filter_size(dna: DNA, u: Draws) -> Edit:
    """FILTER-SIZE: a random conv's filter height or width (at random), odd sizes only."""

    def change(e: Edge, u: Draws) -> Edge:
        field = "filter_half_height" if u[2] < 0.5 else "filter_half_width"
        low, high = filter_half_range(getattr(e, field))
        return dataclasses.replace(e, **{field: _between(u[3], low, high)})

    return _alter_conv(dna, u, "filter_size", change)


EDITS: dict[str, Callable[[DNA, Draws], Edit]] = {
    "alter_learning_rate": _alter_learning_rate,
    "identity": _identity,
    "reset_weights": _reset_weights,
    "insert_convolution": _insert_convolution,
    "remove_convolution": _remove_convolution,
    "alter_stride": _alter_stride,
    "alter_number_of_channels": _alter_number_of_channels,
    "filter_size": _filter_size,
    "insert_one_to_one": _insert_one_to_one,
    "add_skip": _add_skip,
    "remove_skip": _remove_skip,
}
ARCHITECTURE_PRESERVING = ("identity", "alter_learning_rate", "reset_weights")


# --------------------------------------------------------------------------- mutations


_EDIT, _WEIGHTS, _CHOICE = 0, 1, 2  # purposes of the keys derived from a mutation's key


def _edit_draws(key: jax.Array, step: int) -> Draws:
    return draws(key, _EDIT, step, EDIT_DRAWS)


def _weights_key(key: jax.Array) -> jax.Array:
    return _fold_in(key, _WEIGHTS)


def _mutation(name: str, edit: Callable[[DNA, Draws], Edit]) -> Mutation:
    def mutation(dna: DNA, params: model.Variables, key: jax.Array) -> tuple[DNA, model.Variables]:
        result = edit(dna, _edit_draws(key, 0))
        child_vars, _ = inherit(params, result.dna, _weights_key(key), result.reinit)
        return result.dna, child_vars

    mutation.__name__ = mutation.__qualname__ = name
    mutation.__doc__ = edit.__doc__
    return mutation


MUTATIONS: dict[str, Mutation] = {name: _mutation(name, fn) for name, fn in EDITS.items()}
alter_learning_rate = MUTATIONS["alter_learning_rate"]
identity = MUTATIONS["identity"]
reset_weights = MUTATIONS["reset_weights"]
insert_convolution = MUTATIONS["insert_convolution"]
remove_convolution = MUTATIONS["remove_convolution"]
alter_stride = MUTATIONS["alter_stride"]
alter_number_of_channels = MUTATIONS["alter_number_of_channels"]
filter_size = MUTATIONS["filter_size"]
insert_one_to_one = MUTATIONS["insert_one_to_one"]
add_skip = MUTATIONS["add_skip"]
remove_skip = MUTATIONS["remove_skip"]


def _weight_table(weights: Mapping[str, float] | None) -> list[tuple[str, float]]:
    if weights is None:
        return [(name, 1.0) for name in EDITS]
    unknown = sorted(set(weights) - set(EDITS))
    if unknown:
        raise MutationError(f"unknown mutation(s) {unknown}; valid: {sorted(EDITS)}")
    table = []
    for name in EDITS:
        w = weights.get(name, 0.0)
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
            raise MutationError(f"mutation weight for {name} must be a finite number >= 0: {w!r}")
        if w > 0:
            table.append((name, float(w)))
    if not table:
        raise MutationError("every mutation weight is 0: give at least one a positive weight")
    return table


def _draw(u: float, table: Sequence[tuple[str, float]]) -> str:
    target = _between(u, 0.0, sum(w for _, w in table))
    for name, w in table:
        target -= w
        if target < 0:
            return name
    return table[-1][0]


def _draw_and_edit(
    dna: DNA, key: jax.Array, step: int, table: list[tuple[str, float]]
) -> tuple[str, Edit]:
    """Draws a mutation by weight; redraws among the others while the drawn one cannot apply."""
    choices = draws(key, _CHOICE, step, len(EDITS))  # one uniform per attempt
    edit_draws = _edit_draws(key, step)
    left = list(table)
    reasons = []
    for attempt in range(len(table)):
        name = _draw(choices[attempt], left)
        try:
            return name, EDITS[name](dna, edit_draws)
        except NotApplicable as exc:
            reasons.append(str(exc))
            left = [item for item in left if item[0] != name]
    raise MutationError(
        f"no allowed mutation applies to {dna_lib.describe(dna)}: {'; '.join(reasons)}"
    )


def mutate(
    dna: DNA,
    params: model.Variables | None,
    key: jax.Array,
    *,
    weights: Mapping[str, float] | None = None,
    count: int = 1,
    inherit: bool = True,
) -> tuple[DNA, model.Variables, MutationReport]:
    """Applies `count` random mutations in a row and builds the child's variables.

    Args:
        dna: the parent's DNA.
        params: the parent's variable tree (weights and batch-norm statistics); None means
            nothing to inherit.
        key: the only source of randomness: the same key gives the same child, bit for bit.
        weights: mutation name → relative probability; None draws uniformly, otherwise a
            missing name has weight 0. A drawn mutation that cannot apply is redrawn among
            the others.
        count: mutations applied in a row (the paper's "increased mutation rate").
        inherit: False is the paper's no-inheritance control: every child tensor is fresh.

    Returns:
        The child's DNA, its variables and a `MutationReport`.

    Raises:
        MutationError: bad `weights` or `count`, or no allowed mutation applies.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise MutationError(f"count must be a positive integer, got {count!r}")
    table = _weight_table(weights)
    names: list[str] = []
    touched: set[int] = set()
    reinit: Container[Name] = EVERYTHING if not inherit else frozenset()
    child = dna
    for step in range(count):
        name, edit = _draw_and_edit(child, key, step, table)
        names.append(name)
        touched.update(edit.touched)
        child = edit.dna
        # One `inherit` at the end, from the parent: a name forced fresh at any step stays so.
        if edit.reinit is EVERYTHING or reinit is EVERYTHING:
            reinit = EVERYTHING
        else:
            reinit = frozenset(reinit) | frozenset(edit.reinit)
    child_vars, fresh = _inherit_vars(params, child, key, reinit)
    report = MutationReport(tuple(names), tuple(sorted(touched)), tuple(map(name_str, fresh)))
    return child, child_vars, report


def _inherit_vars(
    params: model.Variables | None, child: DNA, key: jax.Array, reinit: Container[Name]
) -> tuple[model.Variables, tuple[Name, ...]]:
    # `mutate`'s `inherit` flag shadows the module-level function there.
    return inherit(params, child, _weights_key(key), reinit)

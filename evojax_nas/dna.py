"""The DNA: an immutable graph that encodes one architecture and its learning rate.

Vertices are activations (rank-3 tensors); edges are identity connections or convolutions.
Integer parameters of a convolution (filter half-sizes, log2 stride, output depth relative to
the input's) are stored as floats and rounded on use, so that small mutations accumulate (paper,
footnote 3). Every vertex and edge carries a stable integer ID that names its weights, and the DNA
keeps a counter of the next free ID so that an ID is never reused within a lineage.

The DNA is a JAX pytree: the float-stored numbers are leaves, the graph's structure is static.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import jax

from evojax_nas.architecture import VertexShape, resolve
from evojax_nas.errors import DNAError

VERTEX_KINDS = ("linear", "bn_relu")
VERTEX_ROLES = ("input", "hidden", "output")
EDGE_KINDS = ("identity", "conv")
BACKBONE, SKIP = 0, 1  # precedence of an incoming edge: the backbone edge is the primary one
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Vertex:
    """An activation. `role` input/output marks the protected ends of the graph."""

    id: int
    kind: str = "linear"  # "linear" or "bn_relu" (batch norm followed by ReLU)
    role: str = "hidden"  # "input", "hidden" or "output"

    @property
    def protected(self) -> bool:
        return self.role != "hidden"


@dataclasses.dataclass(frozen=True)
class Edge:
    """A connection from vertex `src` to vertex `dst`.

    For a conv edge the float fields hold the mutable numbers, rounded on use:
    output depth = round(depth_factor * input depth), filter size = 2 * round(half) + 1,
    stride = 2 ** round(stride_scale). For an identity edge they are unused and kept at their
    neutral values.
    """

    id: int
    src: int
    dst: int
    kind: str = "identity"
    precedence: int = BACKBONE
    depth_factor: float = 1.0
    filter_half_height: float = 0.0
    filter_half_width: float = 0.0
    stride_scale: float = 0.0

    @property
    def is_conv(self) -> bool:
        return self.kind == "conv"

    @property
    def is_skip(self) -> bool:
        return self.precedence != BACKBONE

    @property
    def filter_shape(self) -> tuple[int, int]:
        return (2 * round(self.filter_half_height) + 1, 2 * round(self.filter_half_width) + 1)

    @property
    def stride_log2(self) -> int:
        return round(self.stride_scale) if self.is_conv else 0

    def out_depth(self, in_depth: int) -> int:
        """Channels this edge delivers given the channels of its source vertex."""
        if not self.is_conv:
            return in_depth
        return max(1, round(self.depth_factor * in_depth))


_EDGE_FLOATS = ("depth_factor", "filter_half_height", "filter_half_width", "stride_scale")


@dataclasses.dataclass(frozen=True)
class DNA:
    """An individual's genome. Build with `initial_dna` or `from_json`; edit with `replace`."""

    vertices: tuple[Vertex, ...]
    edges: tuple[Edge, ...]
    learning_rate: float
    input_channels: int = 3
    num_classes: int = 10
    next_id: int = 0

    def replace(self, **changes: Any) -> DNA:
        return dataclasses.replace(self, **changes)

    def vertex(self, vid: int) -> Vertex:
        for v in self.vertices:
            if v.id == vid:
                return v
        raise DNAError(f"no vertex with id {vid}")

    def edge(self, eid: int) -> Edge:
        for e in self.edges:
            if e.id == eid:
                return e
        raise DNAError(f"no edge with id {eid}")

    @property
    def input_vertex(self) -> Vertex:
        return next(v for v in self.vertices if v.role == "input")

    @property
    def output_vertex(self) -> Vertex:
        return next(v for v in self.vertices if v.role == "output")

    def in_edges(self, vid: int) -> list[Edge]:
        """Incoming edges of a vertex, primary (backbone) first, then by ID."""
        return sorted((e for e in self.edges if e.dst == vid), key=lambda e: (e.precedence, e.id))

    def out_edges(self, vid: int) -> list[Edge]:
        return [e for e in self.edges if e.src == vid]

    def conv_edges(self) -> list[Edge]:
        return [e for e in self.edges if e.is_conv]

    def fresh_ids(self, n: int) -> tuple[list[int], DNA]:
        """Reserves `n` new IDs; returns them with the DNA whose counter has moved on."""
        ids = list(range(self.next_id, self.next_id + n))
        return ids, self.replace(next_id=self.next_id + n)


def _dna_flatten(dna: DNA):
    leaves = [dna.learning_rate]
    for e in dna.edges:
        leaves.extend(getattr(e, f) for f in _EDGE_FLOATS)
    structure = (
        dna.vertices,
        tuple(dataclasses.replace(e, **{f: None for f in _EDGE_FLOATS}) for e in dna.edges),
        dna.input_channels,
        dna.num_classes,
        dna.next_id,
    )
    return leaves, structure


def _dna_unflatten(structure, leaves) -> DNA:
    vertices, edges, in_ch, n_cls, next_id = structure
    it = iter(leaves)
    lr = next(it)
    full = tuple(dataclasses.replace(e, **{f: next(it) for f in _EDGE_FLOATS}) for e in edges)
    return DNA(vertices, full, lr, in_ch, n_cls, next_id)


jax.tree_util.register_pytree_node(DNA, _dna_flatten, _dna_unflatten)


def initial_dna(input_channels: int = 3, num_classes: int = 10, learning_rate: float = 0.1) -> DNA:
    """The paper's initial individual: input → global average pool → linear output, no conv."""
    dna = DNA(
        vertices=(Vertex(0, "linear", "input"), Vertex(1, "linear", "output")),
        edges=(Edge(2, 0, 1, "identity", BACKBONE),),
        learning_rate=learning_rate,
        input_channels=input_channels,
        num_classes=num_classes,
        next_id=3,
    )
    return validate(dna)


# --------------------------------------------------------------------------- validation


def _check_number(value: Any, what: str, *, minimum: float, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DNAError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise DNAError(f"{what} must be finite, got {value!r}")
    if value < minimum or (strict and value == minimum):
        op = ">" if strict else ">="
        raise DNAError(f"{what} must be {op} {minimum}, got {value!r}")


def _check_vertices(dna: DNA) -> dict[int, Vertex]:
    by_id: dict[int, Vertex] = {}
    for v in dna.vertices:
        if v.id in by_id:
            raise DNAError(f"duplicate vertex id {v.id}")
        if v.kind not in VERTEX_KINDS:
            raise DNAError(f"vertex {v.id}: unknown kind {v.kind!r} (valid: {VERTEX_KINDS})")
        if v.role not in VERTEX_ROLES:
            raise DNAError(f"vertex {v.id}: unknown role {v.role!r} (valid: {VERTEX_ROLES})")
        by_id[v.id] = v
    for role in ("input", "output"):
        count = sum(v.role == role for v in dna.vertices)
        if count != 1:
            raise DNAError(f"the DNA must have exactly one {role} vertex, found {count}")
    return by_id


def _check_edge(e: Edge, vertices: Mapping[int, Vertex]) -> None:
    where = f"edge {e.id} ({e.src}->{e.dst})"
    for end in (e.src, e.dst):
        if end not in vertices:
            raise DNAError(f"{where} is dangling: vertex {end} does not exist")
    if e.src == e.dst:
        raise DNAError(f"{where} is a self-loop")
    if e.kind not in EDGE_KINDS:
        raise DNAError(f"{where}: unknown kind {e.kind!r} (valid: {EDGE_KINDS})")
    if e.precedence not in (BACKBONE, SKIP):
        raise DNAError(f"{where}: precedence must be {BACKBONE} (backbone) or {SKIP} (skip)")
    if vertices[e.dst].role == "input":
        raise DNAError(f"{where} enters the input vertex")
    if vertices[e.src].role == "output":
        raise DNAError(f"{where} leaves the output vertex")
    _check_number(e.depth_factor, f"{where} depth_factor", minimum=0.0, strict=True)
    _check_number(e.filter_half_height, f"{where} filter_half_height", minimum=0.0)
    _check_number(e.filter_half_width, f"{where} filter_half_width", minimum=0.0)
    _check_number(e.stride_scale, f"{where} stride_scale", minimum=0.0)


def topological_order(dna: DNA) -> list[int]:
    """Vertex IDs in an order where every edge goes forward; DNAError on a cycle."""
    return list(resolve(dna).order)


def backbone(dna: DNA) -> list[int]:
    """Vertex IDs along the backbone path, input first, output last."""
    path = [dna.input_vertex.id]
    while path[-1] != dna.output_vertex.id:
        nxt = [e.dst for e in dna.out_edges(path[-1]) if not e.is_skip]
        if len(nxt) != 1:
            raise DNAError(
                f"vertex {path[-1]} must have exactly one outgoing backbone edge, found {len(nxt)}"
            )
        if nxt[0] in path:
            raise DNAError(f"the backbone has a cycle through vertex {nxt[0]}")
        path.append(nxt[0])
    return path


def _check_connectivity(dna: DNA) -> None:
    pairs = set()
    for e in dna.edges:
        if (e.src, e.dst) in pairs:
            raise DNAError(f"edge {e.id}: a second edge from {e.src} to {e.dst}")
        pairs.add((e.src, e.dst))
    for v in dna.vertices:
        if v.role != "input":
            primary = [e for e in dna.edges if e.dst == v.id and e.precedence == BACKBONE]
            if len(primary) != 1:
                raise DNAError(
                    f"vertex {v.id} must have exactly one backbone (primary) incoming edge, "
                    f"found {len(primary)}"
                )
    on_path = set(backbone(dna))
    for v in dna.vertices:
        if v.id not in on_path:
            raise DNAError(
                f"vertex {v.id} is not on the backbone path from the input to the output vertex"
            )


def validate(dna: DNA) -> DNA:
    """Checks every invariant of a DNA; returns it unchanged or raises DNAError naming the fault."""
    if not isinstance(dna, DNA):
        raise DNAError(f"expected a DNA, got {type(dna).__name__}")
    _check_number(dna.learning_rate, "learning_rate", minimum=0.0, strict=True)
    for name in ("input_channels", "num_classes", "next_id"):
        value = getattr(dna, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DNAError(f"{name} must be a positive integer, got {value!r}")
    if dna.num_classes < 2:
        raise DNAError(f"num_classes must be at least 2, got {dna.num_classes}")
    vertices = _check_vertices(dna)
    edge_ids = set()
    for e in dna.edges:
        if e.id in edge_ids or e.id in vertices:
            raise DNAError(f"edge id {e.id} is used twice")
        edge_ids.add(e.id)
        _check_edge(e, vertices)
    used = max([*vertices, *edge_ids])
    if dna.next_id <= used:
        raise DNAError(f"next_id {dna.next_id} must exceed every ID in use (max {used})")
    resolve(dna)  # the cycle check; the resolution is cached for the model and inheritance
    _check_connectivity(dna)
    return dna


# --------------------------------------------------------------------------- shapes


def vertex_shapes(dna: DNA) -> dict[int, VertexShape]:
    """Resolves every vertex's scale and depth from its primary incoming edge (DESIGN §2)."""
    return dict(resolve(dna).shapes)


def spatial_size(size: int, scale_log2: int) -> int:
    """Size of an axis after `scale_log2` halvings with SAME padding (ceil division)."""
    for _ in range(scale_log2):
        size = -(-size // 2)
    return size


def architecture_key(dna: DNA) -> str:
    """A hash of everything that changes the compiled program; the learning rate is excluded.

    Two DNAs whose float-stored numbers round to the same values share a key.
    """
    shapes = resolve(dna).shapes
    edges = []
    for e in sorted(dna.edges, key=lambda e: e.id):
        item = [e.id, e.src, e.dst, e.kind, e.precedence]
        if e.is_conv:
            item += [*e.filter_shape, e.stride_log2, shapes[e.dst].depth]
        edges.append(item)
    vertices = sorted([v.id, v.kind, v.role] for v in dna.vertices)
    canon = [FORMAT_VERSION, dna.input_channels, dna.num_classes, vertices, edges]
    return hashlib.sha256(json.dumps(canon, separators=(",", ":")).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- JSON


def to_dict(dna: DNA) -> dict[str, Any]:
    """A JSON-ready dict; floats survive a JSON round trip exactly (repr is shortest-exact)."""
    return {
        "format": FORMAT_VERSION,
        "learning_rate": dna.learning_rate,
        "input_channels": dna.input_channels,
        "num_classes": dna.num_classes,
        "next_id": dna.next_id,
        "vertices": [dataclasses.asdict(v) for v in dna.vertices],
        "edges": [dataclasses.asdict(e) for e in dna.edges],
    }


def to_json(dna: DNA, indent: int | None = 2) -> str:
    return json.dumps(to_dict(dna), indent=indent)


def _build(cls: type, item: Any, where: str):
    if not isinstance(item, dict):
        raise DNAError(f"{where} must be an object, got {type(item).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(item) - names
    if unknown:
        raise DNAError(f"{where} has unknown fields {sorted(unknown)}")
    if "id" not in item:
        raise DNAError(f"{where} has no 'id'")
    for key in ("id", "src", "dst", "precedence"):
        if key in item and (isinstance(item[key], bool) or not isinstance(item[key], int)):
            raise DNAError(f"{where}: {key} must be an integer, got {item[key]!r}")
    for key in ("kind", "role"):
        if key in item and not isinstance(item[key], str):
            raise DNAError(f"{where}: {key} must be a string, got {item[key]!r}")
    item = dict(item)
    for key in _EDGE_FLOATS:  # JSON writes 1.0 as 1 only if a user did; keep floats canonical
        if isinstance(item.get(key), int) and not isinstance(item[key], bool):
            item[key] = float(item[key])
    try:
        return cls(**item)
    except TypeError as exc:
        raise DNAError(f"{where}: {exc}") from None


def from_dict(data: Any) -> DNA:
    """Builds and validates a DNA from `to_dict`'s output; DNAError on anything malformed."""
    if not isinstance(data, dict):
        raise DNAError(f"a DNA must be a JSON object, got {type(data).__name__}")
    if data.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        raise DNAError(f"unsupported DNA format {data.get('format')!r} (this is {FORMAT_VERSION})")
    for key in ("vertices", "edges", "learning_rate"):
        if key not in data:
            raise DNAError(f"the DNA has no {key!r}")
    for key in ("vertices", "edges"):
        if not isinstance(data[key], list):
            raise DNAError(f"{key!r} must be a list")
    known = {
        "format",
        "vertices",
        "edges",
        "learning_rate",
        "input_channels",
        "num_classes",
        "next_id",
    }
    if set(data) - known:
        raise DNAError(f"the DNA has unknown fields {sorted(set(data) - known)}")
    vertices = tuple(_build(Vertex, v, f"vertex #{i}") for i, v in enumerate(data["vertices"]))
    edges = tuple(_build(Edge, e, f"edge #{i}") for i, e in enumerate(data["edges"]))
    ids = [x.id for x in (*vertices, *edges)]
    dna = DNA(
        vertices=vertices,
        edges=edges,
        learning_rate=data["learning_rate"],
        input_channels=data.get("input_channels", 3),
        num_classes=data.get("num_classes", 10),
        next_id=data.get("next_id", max(ids, default=0) + 1),
    )
    return validate(dna)


def from_json(text: str) -> DNA:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DNAError(f"the DNA is not valid JSON: {exc}") from None
    return from_dict(data)


def load(path: str) -> DNA:
    """Reads a DNA JSON file; DNAError (naming the file) when it is missing or malformed."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise DNAError(f"cannot read DNA file {path}: {exc.strerror}") from None
    try:
        return from_json(text)
    except DNAError as exc:
        raise DNAError(f"{path}: {exc}") from None


def for_data(dna: DNA, input_channels: int, num_classes: int) -> DNA:
    """The same architecture bound to a dataset's channel count and number of classes."""
    return validate(dna.replace(input_channels=input_channels, num_classes=num_classes))


def describe(dna: DNA) -> str:
    """The backbone as text: `Input → C3x3/2(32)+BN+R → … → Global Pool → Output`."""
    shapes = resolve(dna).shapes
    parts = ["Input"]
    path = backbone(dna)
    for vid in path[:-1]:
        e = next(x for x in dna.out_edges(vid) if not x.is_skip)
        label = (
            "I"
            if not e.is_conv
            else (
                f"C{e.filter_shape[0]}x{e.filter_shape[1]}"
                f"{'/' + str(2**e.stride_log2) if e.stride_log2 else ''}({shapes[e.dst].depth})"
            )
        )
        skips = [x for x in dna.in_edges(e.dst) if x.is_skip]
        if skips:
            label += "+skip(" + ",".join(str(x.src) for x in skips) + ")"
        if dna.vertex(e.dst).kind == "bn_relu":
            label += "+BN+R"
        parts.append(label)
    return " → ".join([*parts, "Global Pool", "Output"])

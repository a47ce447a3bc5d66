import dataclasses
import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evojax_nas import dna as D
from evojax_nas import model as M
from evojax_nas import mutations as MU
from evojax_nas.data import Dataset
from evojax_nas.programs import CompileCounter, ProgramCache
from evojax_nas.train import TrainConfig, train_and_evaluate

V, E = D.Vertex, D.Edge
NAMES = tuple(MU.MUTATIONS)
KEY = jax.random.PRNGKey(0)


def rich_dna() -> D.DNA:
    """Three convs (3×3 depth ×2, 3×3 stride 2 depth ×1.5, 1×1 stride 1), skips, BN vertices."""
    return D.validate(
        D.DNA(
            vertices=(
                V(0, "linear", "input"),
                V(1, "bn_relu"),
                V(2, "linear"),
                V(3, "bn_relu"),
                V(4, "linear", "output"),
            ),
            edges=(
                E(10, 0, 1, "conv", D.BACKBONE, 2.0, 1.0, 1.0, 0.0),
                E(11, 1, 2, "conv", D.BACKBONE, 1.5, 1.0, 1.0, 1.0),
                E(12, 2, 3, "conv", D.BACKBONE, 1.0, 0.0, 0.0, 0.0),
                E(13, 3, 4, "identity", D.BACKBONE),
                E(14, 0, 2, "identity", D.SKIP),
                E(15, 1, 4, "identity", D.SKIP),
            ),
            learning_rate=0.1,
            next_id=16,
        )
    )


def one_conv(half_h=0.0, half_w=0.0, stride_scale=0.0, depth_factor=1.0) -> D.DNA:
    return D.validate(
        D.DNA(
            vertices=(V(0, "linear", "input"), V(1, "bn_relu"), V(2, "linear", "output")),
            edges=(
                E(3, 0, 1, "conv", 0, depth_factor, half_h, half_w, stride_scale),
                E(4, 1, 2, "identity", 0),
            ),
            learning_rate=0.1,
            next_id=5,
        )
    )


def keys(n, seed=0):
    base = jax.random.PRNGKey(seed)
    return [jax.random.fold_in(base, i) for i in range(n)]


def flat(variables):
    return M.flatten(variables)


def assert_inheritance_rule(parent_vars, child_dna, child_vars, reinitialised, forced=False):
    """Every child tensor is the parent's (same object) iff the name and shape match."""
    parent, child = flat(parent_vars), flat(child_vars)
    shapes = M.variable_shapes(child_dna)
    assert set(child) == set(shapes)
    expected_fresh = set()
    for name, value in child.items():
        assert value.shape == shapes[name]
        old = parent.get(name)
        if not forced and old is not None and old.shape == value.shape:
            assert value is old, f"{name} must be inherited"
        else:
            expected_fresh.add("/".join(name))
            assert old is None or value is not old
    assert set(reinitialised) == expected_fresh


def assert_same_bits(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        assert fa[name].dtype == fb[name].dtype and fa[name].tobytes() == fb[name].tobytes(), name


def edge_diff(parent: D.DNA, child: D.DNA) -> dict[int, set[str]]:
    """Changed fields of the edges both DNAs have."""
    old, new = {e.id: e for e in parent.edges}, {e.id: e for e in child.edges}
    out = {}
    for i in old.keys() & new.keys():
        a, b = dataclasses.asdict(old[i]), dataclasses.asdict(new[i])
        fields = {f for f in a if a[f] != b[f]}
        if fields:
            out[i] = fields
    return out


def forward(dna, variables, hw=8):
    x = np.linspace(-1, 1, hw * hw * dna.input_channels, dtype=np.float32)
    return M.DNANet(dna).apply(variables, x.reshape(1, hw, hw, dna.input_channels), train=False)


def check_child(dna, variables):
    assert D.validate(dna) is dna
    D.topological_order(dna)  # acyclic
    assert D.from_json(D.to_json(dna)) == dna  # exact JSON round trip
    assert D.from_json(D.to_json(dna, indent=None)).learning_rate == dna.learning_rate
    x = jax.ShapeDtypeStruct((1, 8, 8, dna.input_channels), np.float32)
    out = jax.eval_shape(lambda v, x: M.DNANet(dna).apply(v, x, train=False), variables, x)
    assert out.shape == (1, dna.num_classes)


# --------------------------------------------------------------------------- chains


CHAINS, STEPS, CHUNKS = 200, 32, 8


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_random_chains_stay_valid_and_run(chunk):
    """Hundreds of 32-mutation chains from the initial DNA: always a valid, runnable model."""
    d0 = D.initial_dna()
    v0 = M.init_variables(d0, KEY)
    for i, chain in enumerate(range(chunk, CHAINS, CHUNKS)):
        dna, variables = d0, v0
        for step in range(STEPS):
            key = jax.random.fold_in(jax.random.PRNGKey(1000 + chain), step)
            child, child_vars, report = MU.mutate(dna, variables, key)
            assert_inheritance_rule(
                variables,
                child,
                child_vars,
                report.reinitialised,
                forced=report.names == ("reset_weights",),
            )
            assert D.from_json(D.to_json(child)) == child
            dna, variables = child, child_vars
            if step % 16 == 15:  # an abstract forward pass (trace only, no compile)
                check_child(dna, variables)
        if i % 10 == 0:  # a real (eager) forward pass on a tenth of the chains
            y = forward(dna, variables)
            assert y.shape == (1, 10) and bool(np.all(np.isfinite(y)))


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(st.lists(st.sampled_from(NAMES), min_size=30, max_size=40), st.integers(0, 2**31 - 1))
def test_any_sequence_of_mutations_gives_a_valid_dna(names, seed):
    dna = D.initial_dna()
    variables = M.init_variables(dna, KEY)
    for i, name in enumerate(names):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        try:
            dna, variables = MU.MUTATIONS[name](dna, variables, key)
        except MU.NotApplicable:
            assert name in (
                "remove_convolution",
                "remove_skip",
                "add_skip",
                "alter_stride",
                "alter_number_of_channels",
                "filter_size",
            )
    check_child(dna, variables)


def test_same_key_same_child_bit_for_bit():
    dna, variables = rich_dna(), M.init_variables(rich_dna(), KEY)
    for key in keys(40):
        a = MU.mutate(dna, variables, key, count=3)
        b = MU.mutate(dna, variables, key, count=3)
        assert a[0] == b[0] and a[2] == b[2]
        assert_same_bits(a[1], b[1])
    # The same holds through a JSON round trip of the DNA (what a worker reads from the store).
    again = MU.mutate(D.from_json(D.to_json(dna)), variables, keys(1)[0], count=3)
    assert again[0] == MU.mutate(dna, variables, keys(1)[0], count=3)[0]


def test_mutate_with_one_name_is_that_mutation():
    dna, variables = rich_dna(), M.init_variables(rich_dna(), KEY)
    for name in NAMES:
        key = jax.random.PRNGKey(7)
        child, child_vars = MU.MUTATIONS[name](dna, variables, key)
        child2, child_vars2, report = MU.mutate(dna, variables, key, weights={name: 1.0})
        assert report.names == (name,)
        assert child == child2
        assert_same_bits(child_vars, child_vars2)


# --------------------------------------------------------------------------- mutate()


def test_mutate_redraws_when_the_drawn_mutation_cannot_apply():
    dna = D.initial_dna()  # no conv, no skip, two vertices: only 5 mutations can apply
    variables = M.init_variables(dna, KEY)
    seen = set()
    for key in keys(60):
        _, _, report = MU.mutate(dna, variables, key)
        seen.update(report.names)
    assert seen == {
        "alter_learning_rate",
        "identity",
        "reset_weights",
        "insert_convolution",
        "insert_one_to_one",
    }
    for key in keys(10):
        _, _, report = MU.mutate(dna, variables, key, weights={"remove_skip": 5, "identity": 1})
        assert report.names == ("identity",)


def test_mutate_rejects_impossible_requests():
    dna, variables = D.initial_dna(), M.init_variables(D.initial_dna(), KEY)
    with pytest.raises(MU.MutationError, match="no skip"):
        MU.mutate(dna, variables, KEY, weights={"remove_skip": 1})
    with pytest.raises(MU.MutationError, match="unknown"):
        MU.mutate(dna, variables, KEY, weights={"grow_wings": 1})
    with pytest.raises(MU.MutationError, match="every mutation weight is 0"):
        MU.mutate(dna, variables, KEY, weights={"identity": 0})
    with pytest.raises(MU.MutationError, match=">= 0"):
        MU.mutate(dna, variables, KEY, weights={"identity": -1})
    with pytest.raises(MU.MutationError, match="count"):
        MU.mutate(dna, variables, KEY, count=0)
    for name in (
        "remove_convolution",
        "remove_skip",
        "add_skip",
        "alter_stride",
        "alter_number_of_channels",
        "filter_size",
    ):
        with pytest.raises(MU.NotApplicable):
            MU.MUTATIONS[name](dna, variables, KEY)


def test_weights_bias_the_draw():
    dna, variables = rich_dna(), M.init_variables(rich_dna(), KEY)
    counts = {"identity": 0, "add_skip": 0}
    for key in keys(200):
        _, _, report = MU.mutate(dna, variables, key, weights={"identity": 3, "add_skip": 1})
        counts[report.names[0]] += 1
    assert 120 < counts["identity"] < 180


def test_count_applies_several_mutations_and_reports_them():
    dna, variables = rich_dna(), M.init_variables(rich_dna(), KEY)
    child, child_vars, report = MU.mutate(dna, variables, KEY, count=5)
    assert len(report.names) == 5
    assert_inheritance_rule(
        variables, child, child_vars, report.reinitialised, forced="reset_weights" in report.names
    )
    d = report.to_dict()
    assert d["names"] == list(report.names) and d["touched"] == list(report.touched)


def test_no_inheritance_control_reinitialises_every_tensor():
    dna, variables = rich_dna(), M.init_variables(rich_dna(), KEY)
    for key in keys(10):
        child, fresh_vars, report = MU.mutate(dna, variables, key, inherit=False)
        same_child, inherited, _ = MU.mutate(dna, variables, key)
        assert child == same_child  # the flag changes the weights only, never the DNA
        assert set(report.reinitialised) == {"/".join(n) for n in M.variable_shapes(child)}
        assert_inheritance_rule(variables, child, fresh_vars, report.reinitialised, forced=True)
        # ... and the fresh values are those a reset would give (the same single code path).
        expected, _ = MU.inherit(None, child, jax.random.fold_in(key, 1))
        assert_same_bits(fresh_vars, expected)


# --------------------------------------------------------------------------- each mutation


def test_identity_keeps_everything():
    dna, variables = rich_dna(), M.init_variables(rich_dna(), KEY)
    child, child_vars = MU.identity(dna, variables, KEY)
    assert child == dna
    assert_inheritance_rule(variables, child, child_vars, ())


def test_alter_learning_rate_changes_only_the_rate_within_half_to_twice():
    dna, variables = rich_dna(), M.init_variables(rich_dna(), KEY)
    logs = []
    for key in keys(300):
        child, child_vars = MU.alter_learning_rate(dna, variables, key)
        assert child.replace(learning_rate=dna.learning_rate) == dna
        assert_inheritance_rule(variables, child, child_vars, ())
        logs.append(math.log2(child.learning_rate / dna.learning_rate))
    assert -1 <= min(logs) < -0.95 and 0.95 < max(logs) <= 1
    assert 0.25 < np.mean(np.abs(logs)) < 0.75  # log-uniform, not clustered at an end
    low = MU.EDITS["alter_learning_rate"](dna, (0.0, 0.0, 0.0, 0.0)).dna.learning_rate
    assert low == pytest.approx(0.05)


def test_reset_weights_keeps_the_dna_and_redraws_every_tensor():
    dna, variables = rich_dna(), M.init_variables(rich_dna(), KEY)
    child, child_vars = MU.reset_weights(dna, variables, jax.random.PRNGKey(5))
    assert child == dna
    names = set(M.variable_shapes(dna))
    parent, new = flat(variables), flat(child_vars)
    assert set(new) == names
    for name in names:
        assert new[name] is not parent[name]
        if name[2] == "kernel":
            assert not np.array_equal(new[name], parent[name])


@pytest.mark.parametrize("conv", [True, False])
def test_insert_splits_a_backbone_edge(conv):
    dna, variables = rich_dna(), M.init_variables(rich_dna(), KEY)
    name = "insert_convolution" if conv else "insert_one_to_one"
    kinds, strides, places = set(), set(), set()
    for key in keys(60):
        child, child_vars, report = MU.mutate(dna, variables, key, weights={name: 1})
        (new_vertex,) = [v for v in child.vertices if v.id not in {x.id for x in dna.vertices}]
        (new_edge,) = [e for e in child.edges if e.id not in {x.id for x in dna.edges}]
        (moved_id,) = edge_diff(dna, child)
        assert edge_diff(dna, child)[moved_id] == {"src"}
        moved = child.edge(moved_id)
        assert moved.src == new_vertex.id and not moved.is_skip
        assert (new_edge.src, new_edge.dst) == (dna.edge(moved_id).src, new_vertex.id)
        assert new_edge.precedence == D.BACKBONE and new_vertex.role == "hidden"
        assert set(report.touched) == {new_vertex.id, new_edge.id, moved_id}
        assert child.next_id == dna.next_id + 2
        if conv:
            assert new_edge.is_conv and new_edge.filter_shape == (3, 3)
            assert new_edge.depth_factor == 1.0
            strides.add(new_edge.stride_scale)
        else:
            assert new_edge.kind == "identity"
        kinds.add(new_vertex.kind)
        places.add(moved_id)
        # The new vertex has its input's depth: every parent tensor keeps its shape.
        shapes = D.vertex_shapes(child)
        assert shapes[new_vertex.id].depth == shapes[new_edge.src].depth
        assert set(flat(variables)) <= set(flat(child_vars))
        assert_inheritance_rule(variables, child, child_vars, report.reinitialised)
        new_names = set(flat(child_vars)) - set(flat(variables))
        assert {"/".join(n) for n in new_names} == set(report.reinitialised)
    assert kinds == {"linear", "bn_relu"}
    assert places == {10, 11, 12, 13}
    if conv:
        assert strides == {0.0, 1.0}


def test_remove_convolution_excises_a_vertex_and_reconnects():
    dna, variables = rich_dna(), M.init_variables(rich_dna(), KEY)
    removed_vertices = set()
    for key in keys(40):
        child, child_vars, report = MU.mutate(
            dna, variables, key, weights={"remove_convolution": 1}
        )
        (gone,) = {v.id for v in dna.vertices} - {v.id for v in child.vertices}
        removed_vertices.add(gone)
        into = dna.in_edges(gone)[0]
        out = next(e for e in dna.out_edges(gone) if not e.is_skip)
        assert into.is_conv
        assert child.edge(out.id) == dataclasses.replace(out, src=into.src)
        assert not any(gone in (e.src, e.dst) for e in child.edges)
        assert edge_diff(dna, child) == {out.id: {"src"}}
        removed_edges = {e.id for e in dna.edges} - {e.id for e in child.edges}
        assert into.id in removed_edges and set(removed_edges) <= set(report.touched)
        assert len(child.vertices) == len(dna.vertices) - 1
        assert gone in report.touched and out.id in report.touched
        assert_inheritance_rule(variables, child, child_vars, report.reinitialised)
    assert removed_vertices == {1, 2, 3}
    # Removing vertex 1 turns 1→2 into 0→2, so drops skip 0→2 (a duplicate) and skip 1→4;
    # removing vertex 2 turns 2→3 into 1→3 and drops skip 0→2.
    child = MU.EDITS["remove_convolution"](dna, (0.0,) * 4).dna
    assert {e.id for e in child.edges} == {11, 12, 13} and child.edge(11).src == 0
    child = MU.EDITS["remove_convolution"](dna, (0.5,) * 4).dna
    assert {e.id for e in child.edges} == {10, 12, 13, 15} and child.edge(12).src == 1


def test_remove_convolution_drops_a_skip_that_the_reconnection_would_duplicate():
    d = D.validate(
        D.DNA(
            vertices=(V(0, "linear", "input"), V(1), V(2, "linear", "output")),
            edges=(
                E(3, 0, 1, "conv", 0, 1.0, 1.0, 1.0, 0.0),
                E(4, 1, 2),
                E(5, 0, 2, "identity", 1),
            ),
            learning_rate=0.1,
            next_id=6,
        )
    )
    edit = MU.EDITS["remove_convolution"](d, (0.0,) * 4)
    assert edit.dna.edges == (E(4, 0, 2),)
    assert edit.touched == (1, 3, 4, 5)


def test_add_skip_joins_non_adjacent_backbone_vertices_without_duplicates():
    dna, variables = rich_dna(), M.init_variables(rich_dna(), KEY)
    pairs = set()
    for key in keys(60):
        child, child_vars, report = MU.mutate(dna, variables, key, weights={"add_skip": 1})
        (new,) = [e for e in child.edges if e.id not in {x.id for x in dna.edges}]
        path = D.backbone(child)
        assert new.is_skip and new.kind == "identity"
        assert path.index(new.dst) >= path.index(new.src) + 2
        assert edge_diff(dna, child) == {} and child.vertices == dna.vertices
        assert report.touched == (new.id,)
        assert_inheritance_rule(variables, child, child_vars, ())
        pairs.add((new.src, new.dst))
    assert pairs == {(0, 3), (0, 4), (1, 3), (2, 4)}  # 0→2 and 1→4 exist already
    # Saturate: once every pair is joined, add_skip cannot apply.
    d = dna
    for _ in range(4):
        d = MU.EDITS["add_skip"](d, (0.0,) * 4).dna
    with pytest.raises(MU.NotApplicable):
        MU.EDITS["add_skip"](d, (0.0,) * 4)


def test_remove_skip_deletes_one_skip_only():
    dna, variables = rich_dna(), M.init_variables(rich_dna(), KEY)
    gone = set()
    for key in keys(30):
        child, child_vars, report = MU.mutate(dna, variables, key, weights={"remove_skip": 1})
        (removed,) = {e.id for e in dna.edges} - {e.id for e in child.edges}
        assert dna.edge(removed).is_skip and report.touched == (removed,)
        assert edge_diff(dna, child) == {} and len(child.edges) == len(dna.edges) - 1
        assert_inheritance_rule(variables, child, child_vars, ())
        gone.add(removed)
    assert gone == {14, 15}


def _numeric_children(name, dna, n=300):
    variables = M.init_variables(dna, KEY)
    out = []
    for key in keys(n):
        child, child_vars = MU.MUTATIONS[name](dna, variables, key)
        (eid,) = edge_diff(dna, child) or {None: None}
        if eid is not None:
            assert child.replace(edges=dna.edges) == dna  # nothing but that edge changed
        out.append((child, child_vars, eid))
    return variables, out


def test_alter_number_of_channels_scales_depth_half_to_twice():
    dna = rich_dna()
    variables, children = _numeric_children("alter_number_of_channels", dna)
    ratios, edges = [], set()
    for child, child_vars, eid in children:
        assert edge_diff(dna, child) == {eid: {"depth_factor"}}
        ratios.append(child.edge(eid).depth_factor / dna.edge(eid).depth_factor)
        edges.add(eid)
        _, fresh = MU.inherit(variables, child, KEY)
        assert_inheritance_rule(variables, child, child_vars, ["/".join(n) for n in fresh])
        # What changed shape is the altered conv, its BN and what lies downstream only.
        for name in fresh:
            assert name[1] != "conv_e10" or eid == 10
    assert edges == {10, 11, 12}
    assert 0.5 <= min(ratios) < 0.55 and 1.9 < max(ratios) <= 2.0


def test_alter_number_of_channels_only_redraws_tensors_whose_shape_changed():
    dna = rich_dna()
    variables = M.init_variables(dna, KEY)
    # Edge 11 (vertex 1 → 2) from 1.5 to 2.0 (× 4/3): vertex 2 goes from 9 to 12 channels.
    child = MU.EDITS["alter_number_of_channels"](dna, (0.5, 0.0, 0.0, 5 / 9)).dna
    assert child.edge(11).depth_factor == pytest.approx(2.0)
    assert D.vertex_shapes(child)[2].depth == 12
    child_vars, fresh = MU.inherit(variables, child, KEY)
    # Edge 12 keeps its factor, so vertex 3 grows too: its BN, the output layer follow.
    assert {"/".join(n) for n in fresh} == {
        "params/conv_e11/kernel",
        "params/conv_e12/kernel",
        "params/bn_v3/scale",
        "params/bn_v3/bias",
        "batch_stats/bn_v3/mean",
        "batch_stats/bn_v3/var",
        "params/output/kernel",
    }
    for name in ("conv_e10", "bn_v1"):
        for leaf, value in child_vars["params"][name].items():
            assert value is variables["params"][name][leaf]
    assert child_vars["params"]["output"]["bias"] is variables["params"]["output"]["bias"]


def test_alter_stride_acts_on_log2_and_can_grow_from_stride_one():
    dna = one_conv(stride_scale=0.0)
    variables, children = _numeric_children("alter_stride", dna, n=100)
    values = []
    for child, child_vars, eid in children:
        assert edge_diff(dna, child) in ({}, {eid: {"stride_scale"}})
        values.append(child.edge(3).stride_scale)
        assert_inheritance_rule(variables, child, child_vars, ())  # kernels ignore strides
    assert 0.0 <= min(values) < 0.05 and 0.95 < max(values) <= 1.0
    assert {2 ** child.edge(3).stride_log2 for child, _, _ in children} == {1, 2}
    # From stride 2 (log2 = 1): strides 1, 2 and 4, never beyond.
    dna = one_conv(stride_scale=1.0)
    _, children = _numeric_children("alter_stride", dna, n=100)
    values = [child.edge(3).stride_scale for child, _, _ in children]
    assert 0.0 <= min(values) < 0.1 and 1.9 < max(values) <= 2.0
    assert {2 ** c.edge(3).stride_log2 for c, _, _ in children} == {1, 2, 4}


def test_filter_size_changes_one_axis_to_odd_sizes_and_grows_from_one():
    dna = one_conv(half_h=0.0, half_w=0.0)  # a 1×1 conv
    variables, children = _numeric_children("filter_size", dna, n=100)
    shapes = set()
    for child, child_vars, eid in children:
        changed = edge_diff(dna, child).get(eid, set())
        assert changed <= {"filter_half_height"} or changed <= {"filter_half_width"}
        shapes.add(child.edge(3).filter_shape)
        _, fresh = MU.inherit(variables, child, KEY)
        assert_inheritance_rule(variables, child, child_vars, ["/".join(n) for n in fresh])
        assert {n[1] for n in fresh} <= {"conv_e3"}
    assert shapes == {(1, 1), (3, 1), (1, 3)}
    # From 5 (half 2): half in [1, 4], i.e. sizes 3 to 9, all odd.
    dna = one_conv(half_h=2.0, half_w=2.0)
    _, children = _numeric_children("filter_size", dna, n=200)
    halves = [
        h
        for c, _, _ in children
        for h in (c.edge(3).filter_half_height, c.edge(3).filter_half_width)
        if h != 2.0
    ]
    assert 1.0 <= min(halves) < 1.2 and 3.8 < max(halves) <= 4.0  # ends of [1, 4]
    sizes = {s for c, _, _ in children for s in c.edge(3).filter_shape}
    assert sizes == {3, 5, 7, 9}


def test_filter_size_on_one_conv_keeps_every_other_tensor_bitwise():
    dna = rich_dna()
    variables = M.init_variables(dna, KEY)
    # Edge 12 is 1×1; u[0] = 0.9 picks it (third conv), u[2] < .5 the height, u[3] = .9 → 3.
    edit = MU.EDITS["filter_size"](dna, (0.9, 0.0, 0.0, 0.9))
    child = edit.dna
    assert child.edge(12).filter_shape == (3, 1) and edit.touched == (12,)
    child_vars, fresh = MU.inherit(variables, child, KEY)
    assert fresh == (("params", "conv_e12", "kernel"),)
    parent = flat(variables)
    for name, value in flat(child_vars).items():
        if name != ("params", "conv_e12", "kernel"):
            assert value is parent[name] and value.tobytes() == parent[name].tobytes()


def test_numeric_values_never_leave_their_range_at_the_ends_of_the_draw():
    top = float(np.nextafter(np.float32(1.0), np.float32(0.0)))
    for u in (0.0, top):
        d = one_conv(half_h=0.0, stride_scale=0.0, depth_factor=1.0)
        e = MU.EDITS["alter_stride"](d, (0.0, 0.0, 0.0, u)).dna.edge(3)
        assert 0.0 <= e.stride_scale <= 1.0
        e = MU.EDITS["filter_size"](d, (0.0, 0.0, 0.0, u)).dna.edge(3)
        assert 0.0 <= e.filter_half_height <= 1.0
        e = MU.EDITS["alter_number_of_channels"](d, (0.0, 0.0, 0.0, u)).dna.edge(3)
        assert 0.5 <= e.depth_factor <= 2.0
        lr = MU.EDITS["alter_learning_rate"](d, (0.0, 0.0, 0.0, u)).dna.learning_rate
        assert 0.05 <= lr <= 0.2
    assert MU.filter_half_range(0.0) == (0.0, 1.0)
    assert MU.filter_half_range(1.0) == (0.0, 2.0)
    assert MU.filter_half_range(3.0) == (1.5, 6.0)


# --------------------------------------------------------------------------- inherit()


def test_inherit_copies_same_name_and_shape_and_draws_the_rest_from_the_key():
    dna = rich_dna()
    variables = M.init_variables(dna, KEY)
    child, fresh = MU.inherit(variables, dna, KEY, reinit={("params", "output", "kernel")})
    assert fresh == (("params", "output", "kernel"),)
    again, _ = MU.inherit(variables, dna, KEY, reinit={("params", "output", "kernel")})
    assert_same_bits(child, again)
    everything, fresh = MU.inherit(variables, dna, jax.random.PRNGKey(3), reinit=MU.EVERYTHING)
    assert len(fresh) == len(M.variable_shapes(dna))
    assert_same_bits(everything, M.init_variables(dna, jax.random.PRNGKey(3)))


# --------------------------------------------------------------------------- no new trace


def tiny_dataset(n=60, hw=8, c=3, classes=10) -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, hw, hw, c), dtype=np.uint8)
    y = rng.integers(0, classes, n).astype(np.int32)
    return Dataset("tiny", x, y, x[:10], y[:10], classes, (127.0,) * c, (74.0,) * c, "none")


def test_architecture_preserving_children_train_with_the_parents_program():
    data, cache = tiny_dataset(), ProgramCache()
    config = TrainConfig(steps=2, batch_size=20, eval_batch_size=10)
    dna = one_conv(half_h=1.0, half_w=1.0)
    parent = train_and_evaluate(dna, M.init_variables(dna, KEY), data, KEY, config, cache)
    assert cache.counts["compiled"] == 1
    for i, name in enumerate(MU.ARCHITECTURE_PRESERVING):
        key = jax.random.PRNGKey(i)
        child, child_vars = MU.MUTATIONS[name](dna, parent.variables, key)
        assert D.architecture_key(child) == D.architecture_key(dna)
        with CompileCounter() as compiles:  # XLA backend compiles, over the whole child
            result = train_and_evaluate(child, child_vars, data, key, config, cache)
        assert result.steps_run == 2
        assert compiles.count == 0, f"{name} must reuse the parent's compiled programs"
    assert cache.counts["compiled"] == 1
    # A structural mutation does compile anew (the guard above can fail).
    child, child_vars = MU.insert_convolution(dna, parent.variables, KEY)
    with CompileCounter() as compiles:
        train_and_evaluate(child, child_vars, data, KEY, config, cache)
    assert cache.counts["compiled"] == 2 and compiles.count >= 2

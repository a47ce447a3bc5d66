import json
import math

import jax
import pytest

from evojax_nas import dna as D
from evojax_nas.errors import DNAError

V, E = D.Vertex, D.Edge


def chain_with_skip() -> D.DNA:
    return D.DNA(
        vertices=(
            V(0, "linear", "input"),
            V(1, "bn_relu"),
            V(2, "bn_relu"),
            V(3, "linear", "output"),
        ),
        edges=(
            E(4, 0, 1, "conv", 0, 8.0, 1.0, 1.0, 0.0),
            E(5, 1, 2, "conv", 0, 2.0, 1.0, 0.0, 1.0),
            E(6, 2, 3, "identity", 0),
            E(7, 0, 2, "identity", 1),
        ),
        learning_rate=0.1,
        input_channels=3,
        num_classes=10,
        next_id=8,
    )


def test_initial_dna_is_the_papers():
    d = D.initial_dna(input_channels=1, num_classes=10)
    assert d.learning_rate == 0.1
    assert [v.role for v in d.vertices] == ["input", "output"]
    assert len(d.edges) == 1 and not d.edges[0].is_conv
    assert D.describe(d) == "Input → I → Global Pool → Output"
    assert d.input_vertex.protected and d.output_vertex.protected


@pytest.mark.parametrize("make", [D.initial_dna, chain_with_skip])
def test_json_round_trip_is_exact(make):
    d = D.validate(make())
    text = D.to_json(d)
    back = D.from_json(text)
    assert back == d
    assert D.to_json(back) == text


def test_round_trip_keeps_awkward_floats_bit_exact():
    d = chain_with_skip()
    e = d.edges[0]
    odd = D.validate(
        d.replace(
            learning_rate=0.1 + 1e-17 + 2**-40,
            edges=(
                e.__class__(**{**e.__dict__, "depth_factor": math.pi * 1e-3 + 7.123456789012345}),
                *d.edges[1:],
            ),
        )
    )
    back = D.from_json(D.to_json(odd, indent=None))
    assert back.learning_rate == odd.learning_rate
    assert back.edges[0].depth_factor == odd.edges[0].depth_factor


def test_dna_is_a_pytree_with_float_leaves():
    d = chain_with_skip()
    leaves, treedef = jax.tree_util.tree_flatten(d)
    assert leaves[0] == 0.1 and len(leaves) == 1 + 4 * len(d.edges)
    doubled = jax.tree_util.tree_map(lambda x: x * 2, d)
    assert doubled.learning_rate == 0.2 and doubled.edges[0].depth_factor == 16.0
    assert jax.tree_util.tree_unflatten(treedef, leaves) == d


def test_architecture_key_ignores_learning_rate_only():
    d = chain_with_skip()
    k = D.architecture_key(d)
    assert D.architecture_key(d.replace(learning_rate=0.003)) == k
    e = d.edges[1]
    # 2.0 → 2.1: 8 channels × 2.1 = 16.8 → 17, a different program.
    wider = d.replace(edges=(d.edges[0], E(**{**e.__dict__, "depth_factor": 2.1}), *d.edges[2:]))
    assert D.architecture_key(wider) != k
    # A float change that rounds to the same numbers is the same program.
    same = d.replace(
        edges=(d.edges[0], E(**{**e.__dict__, "filter_half_height": 1.2}), *d.edges[2:])
    )
    assert D.architecture_key(same) == k


def test_vertex_shapes_follow_primary_edges():
    s = D.vertex_shapes(chain_with_skip())
    assert s[0] == D.VertexShape(0, 3)
    assert s[1] == D.VertexShape(0, 24)
    assert s[2] == D.VertexShape(1, 48)
    assert s[3] == D.VertexShape(1, 48)
    assert D.spatial_size(32, 1) == 16 and D.spatial_size(7, 1) == 4


def _bad(mutate) -> dict:
    data = D.to_dict(chain_with_skip())
    mutate(data)
    return data


BAD_CASES = {
    "cycle": (
        lambda d: (
            d["edges"].append({"id": 8, "src": 2, "dst": 1, "kind": "identity", "precedence": 1})
            or d.update(next_id=9)
        ),
        "cycle",
    ),
    "dangling": (lambda d: d["edges"][0].update(dst=99), "dangling: vertex 99"),
    "no input": (lambda d: d["vertices"][0].update(role="hidden"), "exactly one input"),
    "no output": (lambda d: d["vertices"][3].update(role="hidden"), "exactly one output"),
    "two outputs": (lambda d: d["vertices"][2].update(role="output"), "exactly one output"),
    "negative": (lambda d: d["edges"][0].update(filter_half_width=-1.0), "filter_half_width"),
    "NaN": (lambda d: d["edges"][0].update(depth_factor=float("nan")), "finite"),
    "zero depth": (lambda d: d["edges"][0].update(depth_factor=0.0), "depth_factor must be >"),
    "negative stride": (lambda d: d["edges"][1].update(stride_scale=-0.5), "stride_scale"),
    "bad lr": (lambda d: d.update(learning_rate=-0.1), "learning_rate"),
    "inf lr": (lambda d: d.update(learning_rate=float("inf")), "learning_rate must be finite"),
    "string lr": (lambda d: d.update(learning_rate="fast"), "learning_rate must be a number"),
    "unknown vertex kind": (lambda d: d["vertices"][1].update(kind="tanh"), "unknown kind 'tanh'"),
    "unknown edge kind": (lambda d: d["edges"][0].update(kind="pool"), "unknown kind 'pool'"),
    "unknown role": (lambda d: d["vertices"][1].update(role="boss"), "unknown role"),
    "unknown field": (lambda d: d["edges"][0].update(colour="red"), "unknown fields"),
    "duplicate vertex": (lambda d: d["vertices"][2].update(id=1), "duplicate vertex id 1"),
    "duplicate edge": (lambda d: d["edges"][1].update(id=4), "edge id 4 is used twice"),
    "self loop": (lambda d: d["edges"][1].update(src=2), "self-loop"),
    "into input": (lambda d: d["edges"][3].update(src=2, dst=0), "enters the input"),
    "out of output": (lambda d: d["edges"][3].update(src=3, dst=1), "leaves the output"),
    "two primaries": (lambda d: d["edges"][3].update(precedence=0), "exactly one backbone"),
    "no primary": (lambda d: d["edges"][2].update(precedence=1), "backbone"),
    "bad precedence": (lambda d: d["edges"][3].update(precedence=7), "precedence must be"),
    "parallel edge": (lambda d: d["edges"][3].update(src=1), "a second edge from 1 to 2"),
    "id reuse": (lambda d: d.update(next_id=5), "next_id 5 must exceed"),
    "classes": (lambda d: d.update(num_classes=1), "num_classes"),
    "channels": (lambda d: d.update(input_channels=0), "input_channels"),
    "missing edges": (lambda d: d.pop("edges"), "no 'edges'"),
    "edges not list": (lambda d: d.update(edges={}), "'edges' must be a list"),
    "vertex not object": (lambda d: d["vertices"].append(3), "vertex #4 must be an object"),
    "float id": (lambda d: d["vertices"][1].update(id=1.5), "id must be an integer"),
    "format": (lambda d: d.update(format=99), "unsupported DNA format"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_validation_rejects_with_a_message_naming_the_fault(case):
    mutate, message = BAD_CASES[case]
    with pytest.raises(DNAError, match=message):
        D.from_dict(_bad(mutate))


def test_off_backbone_vertex_is_rejected():
    data = D.to_dict(chain_with_skip())
    data["vertices"].append({"id": 8, "kind": "linear", "role": "hidden"})
    data["edges"].append({"id": 9, "src": 0, "dst": 8, "kind": "identity", "precedence": 0})
    data["edges"].append({"id": 10, "src": 8, "dst": 3, "kind": "identity", "precedence": 1})
    data["next_id"] = 11
    with pytest.raises(DNAError, match="vertex 0 must have exactly one outgoing backbone"):
        D.from_dict(data)


def test_not_json_and_missing_file(tmp_path):
    with pytest.raises(DNAError, match="not valid JSON"):
        D.from_json("{nope")
    with pytest.raises(DNAError, match="cannot read DNA file"):
        D.load(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"vertices": []}))
    with pytest.raises(DNAError, match="bad.json"):
        D.load(str(bad))


def test_shipped_sample_is_valid():
    from evojax_nas.cli_train import read_dna

    d = read_dna("small_conv")
    assert len(d.conv_edges()) == 3
    assert "skip" in D.describe(d)

"""The architecture resolved once per DNA: what it holds, and that nothing derives it twice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evojax_nas import architecture as A
from evojax_nas import dna as D
from evojax_nas import model as M
from evojax_nas.cli_train import read_dna
from evojax_nas.errors import DNAError
from evojax_nas.mutations import mutate

V, E = D.Vertex, D.Edge


@pytest.fixture
def sorts(monkeypatch) -> list:
    """The DNAs whose topology is derived (each call of `topological_sort`), cache emptied."""
    calls, real = [], A.topological_sort

    def counted(dna):
        calls.append(dna)
        return real(dna)

    A._cached_build.cache_clear()
    monkeypatch.setattr(A, "topological_sort", counted)
    yield calls
    A._cached_build.cache_clear()


def small_conv() -> D.DNA:
    return D.for_data(read_dna("small_conv"), 1, 10)


def test_one_reproduce_step_resolves_each_dna_once(sorts):
    parent = D.from_dict(D.to_dict(small_conv()))  # as a worker reads it from the store
    params = M.init_variables(parent, jax.random.PRNGKey(0))
    weights = {"insert_convolution": 1.0, "alter_number_of_channels": 1.0, "add_skip": 1.0}
    child, child_vars, report = mutate(parent, params, jax.random.PRNGKey(1), weights=weights)
    assert report.names and child != parent
    # What the worker, the trainer and the record then ask of the child:
    shapes = M.variable_shapes(child)
    x = jnp.zeros((2, 8, 8, 1))
    out = jax.eval_shape(lambda v: M.DNANet(child).apply(v, x, train=False), child_vars)
    D.architecture_key(child), D.describe(child), D.vertex_shapes(parent)
    assert out.shape == (2, 10)
    assert {k: tuple(np.shape(a)) for k, a in M.flatten(child_vars).items()} == shapes
    assert sorts.count(parent) == 1 and sorts.count(child) == 1
    assert len(sorts) == 2, [D.describe(d) for d in sorts]


def test_several_mutations_derive_each_intermediate_once(sorts):
    parent = small_conv()
    child, _, report = mutate(parent, None, jax.random.PRNGKey(3), count=4)
    M.variable_shapes(child), M.init_variables(child, jax.random.PRNGKey(0))
    assert len(report.names) == 4
    assert len(sorts) == len(set(sorts)) <= 1 + 4  # the parent and at most one per step


def test_resolution_matches_the_dna():
    dna = small_conv()
    arch = A.resolve(dna)
    assert A.resolve(D.from_json(D.to_json(dna))) is arch  # equal DNAs share one resolution
    assert list(arch.order) == D.topological_order(dna)
    assert arch.order[0] == dna.input_vertex.id and arch.order[-1] == dna.output_vertex.id
    for v in dna.vertices:
        assert list(arch.inputs[v.id]) == dna.in_edges(v.id)
    convs = {e.id for e in dna.conv_edges()}
    assert {e.id for e in arch.conv_modules.values()} == convs
    for (_, module, _), shape in arch.variables.items():
        if module in arch.conv_modules:
            edge = arch.conv_modules[module]
            depths = (arch.shapes[edge.src].depth, arch.shapes[edge.dst].depth)
            assert shape == (*edge.filter_shape, *depths)
    assert arch.variables["params", A.OUTPUT, "bias"] == (dna.num_classes,)


def test_a_cycle_is_an_error_every_time():
    dna = D.DNA(
        vertices=(V(0, "linear", "input"), V(1), V(2), V(3, "linear", "output")),
        edges=(E(4, 0, 1), E(5, 1, 2), E(6, 2, 1, precedence=D.SKIP), E(7, 2, 3)),
        learning_rate=0.1,
        next_id=8,
    )
    for _ in range(2):  # a failed resolution is not cached
        with pytest.raises(DNAError, match="cycle"):
            D.validate(dna)


def test_an_unhashable_dna_is_resolved_without_the_cache():
    dna = small_conv()
    listed = dna.replace(vertices=list(dna.vertices))  # not hashable
    with pytest.raises(TypeError):
        hash(listed)
    assert A.resolve(listed).variables == A.resolve(dna).variables


def test_flops_count_convolutions_and_the_dense_layer_by_hand():
    import jax

    from evojax_nas import dna as D
    from evojax_nas import mutations as MU
    from evojax_nas.architecture import flops, multiply_adds, resolve

    dna = D.initial_dna(3, 10, 0.1)
    assert multiply_adds(dna, 8, 8) == (3 * 10, 2 * 3 * 10)  # the dense layer only
    child = MU.insert_convolution(dna, None, jax.random.PRNGKey(3))[0]
    (edge,) = [e for e in child.edges if e.is_conv]
    arch = resolve(child)
    kh, kw = edge.filter_shape
    side = -(-9 // 2**edge.stride_log2)
    conv = side * side * kh * kw * 3 * arch.shapes[edge.dst].depth
    dense = arch.shapes[arch.output_id].depth * 10
    reads_input = arch.vertices[edge.src].role == "input"
    assert multiply_adds(child, 9, 9) == (
        conv + dense,
        conv * (1 if reads_input else 2) + 2 * dense,
    )
    forward, backward = multiply_adds(child, 9, 9)
    assert flops(child, 9, 9, 50, train=False) == 2 * 50 * forward
    assert flops(child, 9, 9, 50, train=True) == 2 * 50 * (forward + backward)


def test_flops_agree_with_xlas_count_of_a_reference_program():
    """On a net of wide convolutions XLA's own count of its reference forward pass (stock
    convolution, no tap sums) is the multiply-adds times 2, less the taps on SAME padding."""
    import jax
    import jax.numpy as jnp

    from evojax_nas import dna as D
    from evojax_nas import samples
    from evojax_nas.architecture import flops
    from evojax_nas.model import DNANet, init_variables

    dna = D.for_data(samples.read_dna("small_conv"), 3, 10)
    variables = init_variables(dna, jax.random.PRNGKey(0))
    model = DNANet(dna, conv_impl="xla")
    x = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    ratio = analysis["flops"] / flops(dna, 32, 32, 8, train=False)
    assert 0.9 < ratio < 1.2, ratio  # XLA skips the zero padding at the borders

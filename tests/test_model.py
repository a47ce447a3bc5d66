import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evojax_nas import dna as D
from evojax_nas import model as M

V, E = D.Vertex, D.Edge


def conv_chain() -> D.DNA:
    """Input → C3x3/2(12)+BN+R → C5x3/2(24)+BN+R → C1x1(6) → output."""
    return D.validate(
        D.DNA(
            vertices=(
                V(0, "linear", "input"),
                V(1, "bn_relu"),
                V(2, "bn_relu"),
                V(3, "linear", "output"),
            ),
            edges=(
                E(4, 0, 1, "conv", 0, 4.0, 1.0, 1.0, 1.0),
                E(5, 1, 2, "conv", 0, 2.0, 2.0, 1.0, 1.0),
                E(6, 2, 3, "conv", 0, 0.25, 0.0, 0.0, 0.0),
            ),
            learning_rate=0.1,
            input_channels=3,
            num_classes=7,
            next_id=7,
        )
    )


def skip_mismatch() -> D.DNA:
    """A skip from the full-size 3-channel input into a half-size 24-channel vertex."""
    return D.validate(
        D.DNA(
            vertices=(V(0, "linear", "input"), V(1, "bn_relu"), V(2, "linear", "output")),
            edges=(
                E(3, 0, 1, "conv", 0, 8.0, 1.0, 1.0, 1.0),
                E(4, 1, 2, "conv", 0, 1.0),
                E(5, 0, 2, "identity", 1),
            ),
            learning_rate=0.1,
            input_channels=3,
            num_classes=10,
            next_id=6,
        )
    )


def _apply(d: D.DNA, x, train=False):
    variables = M.init_variables(d, jax.random.PRNGKey(0))
    if train:
        return M.DNANet(d).apply(variables, x, train=True, mutable=["batch_stats"])[0]
    return M.DNANet(d).apply(variables, x, train=False)


@pytest.mark.parametrize(
    "make,classes", [(D.initial_dna, 10), (conv_chain, 7), (skip_mismatch, 10)]
)
def test_output_shapes(make, classes):
    d = make()
    x = jnp.ones((3, 32, 32, 3))
    assert _apply(d, x).shape == (3, classes)
    assert _apply(d, x, train=True).shape == (3, classes)


def test_intermediate_shapes_of_strided_chain():
    d = conv_chain()
    variables = M.init_variables(d, jax.random.PRNGKey(0))
    _, inter = M.DNANet(d).apply(
        variables, jnp.ones((2, 32, 32, 3)), train=False, capture_intermediates=True
    )
    inter = inter["intermediates"]
    assert inter["conv_e4"]["__call__"][0].shape == (2, 16, 16, 12)
    assert inter["conv_e5"]["__call__"][0].shape == (2, 8, 8, 24)
    assert inter["conv_e6"]["__call__"][0].shape == (2, 8, 8, 6)
    assert variables["params"]["conv_e5"]["kernel"].shape == (5, 3, 12, 24)


@pytest.mark.parametrize("make", [D.initial_dna, conv_chain, skip_mismatch])
def test_host_side_shapes_match_flax_init(make):
    d = make()
    abstract = jax.eval_shape(
        lambda: M.DNANet(d).init(jax.random.PRNGKey(0), jnp.ones((1, 16, 16, 3)), train=False)
    )
    flax_shapes = {k: v.shape for k, v in M.flatten(abstract).items()}
    assert flax_shapes == M.variable_shapes(d)


def test_resolution_rule_against_hand_computed_numbers():
    # primary: 1×2×2×2; others: a 1×4×4×3 (downsampled by 2 with nearest, truncated to 2
    # channels) and a 1×1×1×1 (repeated to 2×2, zero-padded to 2 channels).
    primary = jnp.array([[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]])
    big = jnp.arange(48.0).reshape(1, 4, 4, 3)  # value = 12*row + 3*col + channel
    tiny = jnp.full((1, 1, 1, 1), 100.0)
    out = np.asarray(M.resolve_inputs(primary, [big, tiny]))
    # big sampled at rows/cols {0, 2}, channels {0, 1}:
    #   (0,0): [0, 1]   (0,2): [6, 7]   (2,0): [24, 25]   (2,2): [30, 31]
    expected = np.array(
        [
            [
                [[1 + 0 + 100, 2 + 1 + 0], [3 + 6 + 100, 4 + 7 + 0]],
                [[5 + 24 + 100, 6 + 25 + 0], [7 + 30 + 100, 8 + 31 + 0]],
            ]
        ]
    )
    np.testing.assert_array_equal(out, expected)


def test_nearest_resize_non_integer_ratio():
    x = jnp.arange(5.0).reshape(1, 5, 1, 1)
    out = M.nearest_resize(x, 3, 1)  # rows floor(i * 5 / 3) = 0, 1, 3
    np.testing.assert_array_equal(np.asarray(out).ravel(), [0.0, 1.0, 3.0])


def test_variable_names_carry_ids_and_init_is_he():
    d = skip_mismatch()
    v = M.init_variables(d, jax.random.PRNGKey(3))
    assert set(v["params"]) == {"conv_e3", "conv_e4", "bn_v1", "output"}
    assert set(v["batch_stats"]["bn_v1"]) == {"mean", "var"}
    k3, k4 = v["params"]["conv_e3"]["kernel"], v["params"]["conv_e4"]["kernel"]
    assert abs(k3.std() - np.sqrt(2 / 27)) < 0.15 * k3.std()
    # The output vertex sums two edges: He std sqrt(2/fan_in) scaled by 1/sqrt(2).
    assert abs(k4.std() - np.sqrt(2 / 24) / np.sqrt(2)) < 0.15 * k4.std()
    np.testing.assert_array_equal(v["params"]["bn_v1"]["scale"], 1.0)
    np.testing.assert_array_equal(v["batch_stats"]["bn_v1"]["var"], 1.0)


def test_init_is_deterministic_per_key_and_per_name():
    d = conv_chain()
    a = M.init_variables(d, jax.random.PRNGKey(5))
    b = M.init_variables(d, jax.random.PRNGKey(5))
    c = M.init_variables(d, jax.random.PRNGKey(6))
    for name, value in M.flatten(a).items():
        np.testing.assert_array_equal(value, M.flatten(b)[name])
    assert not np.array_equal(a["params"]["conv_e4"]["kernel"], c["params"]["conv_e4"]["kernel"])
    assert (
        M.count_params(a) == 3 * 3 * 3 * 12 + 12 * 2 + 5 * 3 * 12 * 24 + 24 * 2 + 24 * 6 + 6 * 7 + 7
    )

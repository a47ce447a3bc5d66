import jax
import numpy as np
import pytest

from evojax_nas import dna as D
from evojax_nas.data import load_dataset
from evojax_nas.model import init_variables
from evojax_nas.programs import CompileCounter, ProgramCache
from evojax_nas.train import TrainConfig, train_and_evaluate

V, E = D.Vertex, D.Edge


def two_convs(cin=3, classes=4, width=4.0) -> D.DNA:
    return D.validate(
        D.DNA(
            vertices=(V(0, "linear", "input"), V(1, "bn_relu"), V(2, "linear", "output")),
            edges=(
                E(3, 0, 1, "conv", 0, width, 1.0, 1.0, 0.0),
                E(4, 1, 2, "conv", 0, 1.0, 1.0, 1.0, 0.0),
            ),
            learning_rate=0.05,
            input_channels=cin,
            num_classes=classes,
            next_id=5,
        )
    )


def _train(d, data, steps, cache=None, seed=0, per_dispatch=100):
    cfg = TrainConfig(
        steps=steps, batch_size=50, eval_batch_size=50, steps_per_dispatch=per_dispatch
    )
    variables = init_variables(d, jax.random.PRNGKey(seed))
    return train_and_evaluate(d, variables, data, jax.random.PRNGKey(seed + 1), cfg, cache)


def test_learning_rate_change_compiles_nothing(random_dataset):
    data, d, cache = random_dataset(), two_convs(), ProgramCache()
    first = _train(d, data, 3, cache)
    assert cache.counts["compiled"] == 1 and first.programs == "compiled"
    with CompileCounter() as compiles:
        second = _train(d.replace(learning_rate=0.001), data, 3, cache)
        third = _train(d.replace(learning_rate=0.3), data, 5, cache, seed=4)
    assert compiles.count == 0, "a new learning rate must reuse the compiled programs"
    assert cache.counts["compiled"] == 1 and second.programs == "memory"
    assert second.timings["compile"] < first.timings["compile"]
    assert third.steps_run == 5
    # A different architecture does compile anew (the counter above can fail).
    with CompileCounter() as compiles:
        _train(two_convs(width=2.0), data, 1, cache)
    assert cache.counts["compiled"] == 2 and compiles.count >= 2


def test_training_is_deterministic_for_a_key(random_dataset):
    data, d = random_dataset(), two_convs()
    a, b = _train(d, data, 4), _train(d, data, 4)
    for x, y in zip(
        jax.tree_util.tree_leaves(a.variables), jax.tree_util.tree_leaves(b.variables), strict=True
    ):
        np.testing.assert_array_equal(x, y)


def test_nan_inducing_learning_rate_gives_fitness_zero_without_raising(random_dataset):
    data, d = random_dataset(), two_convs()
    result = _train(d.replace(learning_rate=1e30), data, 40, per_dispatch=5)
    assert result.diverged
    assert result.val_accuracy == 0.0
    assert result.steps_run < 40  # ended early
    # The variables it returns are the ones it started from, all finite.
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(result.variables))


def test_flops_agree_with_conv_shape_count(random_dataset):
    # 16×16×8 → conv3x3 → 64 → conv3x3 → 64: convolutions dominate everything else.
    data = random_dataset(n=100, hw=16, c=8)
    d = two_convs(cin=8, width=8.0)
    result = _train(d, data, 1)
    b, hw = 50, 16 * 16
    f1 = 2 * b * hw * 9 * 8 * 64  # forward FLOPs of conv 1 (multiply + add)
    f2 = 2 * b * hw * 9 * 64 * 64
    # Training: conv 1 forward + kernel gradient; conv 2 forward + kernel + input gradients.
    expected_train = 2 * f1 + 3 * f2
    assert result.flops_train_step == pytest.approx(expected_train, rel=0.15)
    assert result.flops_eval_batch == pytest.approx(f1 + f2, rel=0.15)
    assert result.flops == pytest.approx(
        result.flops_train_step * 1 + result.flops_eval_batch * result.eval_batches
    )


def test_small_conv_dna_beats_the_initial_individual_by_a_wide_margin():
    from evojax_nas.cli_train import read_dna

    data = load_dataset("mnist5k")
    c, k = data.image_shape[-1], data.num_classes
    initial = _train(D.initial_dna(c, k), data, 300)
    conv = _train(D.for_data(read_dna("small_conv"), c, k), data, 300)
    assert not conv.diverged
    assert conv.val_accuracy > initial.val_accuracy + 0.25, (
        conv.val_accuracy,
        initial.val_accuracy,
    )


def test_the_initial_optimizer_state_is_optax_s_and_compiles_nothing():
    """`initial_state` makes optax's initial state on the host: the same tree and zeros, and no
    compile for shapes never seen before (optax's `init` compiled one op per new shape)."""
    from evojax_nas.steps import make_optimizer
    from evojax_nas.train import initial_state

    cfg = TrainConfig(steps=1)
    d = two_convs(cin=5, width=7.4)  # shapes no other test uses
    variables = init_variables(d, jax.random.PRNGKey(0))
    with CompileCounter() as counter:
        state = initial_state(variables, cfg)
    assert counter.count == 0
    want = make_optimizer(cfg).init(variables["params"])
    assert jax.tree_util.tree_structure(state.opt_state) == jax.tree_util.tree_structure(want)
    for got, expected in zip(
        jax.tree_util.tree_leaves(state.opt_state), jax.tree_util.tree_leaves(want), strict=True
    ):
        assert got.dtype == expected.dtype and np.array_equal(got, expected)
    assert len(jax.tree_util.tree_leaves(want)) == len(
        jax.tree_util.tree_leaves(variables["params"])
    )

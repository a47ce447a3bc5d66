"""Tests of evojax_nas.augment: normalisation, random crop and flip, determinism, jit."""

import functools

import jax
import numpy as np
import pytest

from evojax_nas.augment import preprocess, random_crop
from evojax_nas.errors import DataError

IDENTITY = {"mean": (0.0,), "std": (1.0,)}


def _images(n, h=16, w=16, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def _matches(out, x, pad):
    """Boolean ``N×2×(2p+1)×(2p+1)``: out[i] equals window (dy, dx) of padded x[i] (or its flip)."""
    n, h, w, _ = x.shape
    padded = np.pad(x.astype(np.float32), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    size = 2 * pad + 1
    hits = np.zeros((n, 2, size, size), dtype=bool)
    for dy in range(size):
        for dx in range(size):
            window = padded[:, dy : dy + h, dx : dx + w]
            hits[:, 0, dy, dx] = np.all(out == window, axis=(1, 2, 3))
            hits[:, 1, dy, dx] = np.all(out == window[:, :, ::-1], axis=(1, 2, 3))
    return hits


@pytest.mark.parametrize("augment", ["cifar", "digits", "none"])
@pytest.mark.parametrize("train", [True, False])
def test_shape_and_dtype(augment, train):
    x = _images(5, 32, 32, 3)
    out = preprocess(
        x, jax.random.key(0), mean=(1, 2, 3), std=(4, 5, 6), augment=augment, train=train
    )
    assert out.shape == x.shape
    assert out.dtype == np.float32


def test_normalisation_by_hand():
    x = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    x[0, 0, 0] = (14, 28, 35)
    x[0, 1, 1] = (255, 0, 10)
    out = np.asarray(
        preprocess(x, None, mean=(10, 20, 30), std=(2, 4, 5), augment="cifar", train=False)
    )
    np.testing.assert_allclose(out[0, 0, 0], (2.0, 2.0, 1.0), rtol=1e-6)  # (14-10)/2, ...
    np.testing.assert_allclose(out[0, 1, 1], (122.5, -5.0, -4.0), rtol=1e-6)
    np.testing.assert_allclose(out[0, 0, 1], (-5.0, -5.0, -6.0), rtol=1e-6)


def test_single_value_mean_std_broadcasts():
    x = np.full((1, 2, 2, 3), 7, dtype=np.uint8)
    out = preprocess(x, None, mean=(3.0,), std=(2.0,), augment="none", train=True)
    np.testing.assert_allclose(out, 2.0)


def test_cifar_output_is_a_window_of_the_padded_input_or_its_flip():
    x = _images(300)
    out = np.asarray(preprocess(x, jax.random.key(1), augment="cifar", train=True, **IDENTITY))
    hits = _matches(out, x, pad=4)
    assert hits.any(axis=(1, 2, 3)).all(), "some output is not a shifted window of its input"
    # Random images match exactly one (flip, dy, dx): read the offsets back and check coverage.
    assert (hits.sum(axis=(1, 2, 3)) == 1).all()
    _, _, dy, dx = np.nonzero(hits)
    assert dy.min() == 0 and dy.max() == 8 and dx.min() == 0 and dx.max() == 8
    assert len(set(zip(dy, dx, strict=True))) > 40


def test_padding_is_the_mean_colour():
    x = np.full((64, 8, 8, 1), 100, dtype=np.uint8)
    out = np.asarray(
        preprocess(x, jax.random.key(2), mean=(100,), std=(3,), augment="cifar", train=True)
    )
    np.testing.assert_array_equal(out, 0.0)  # Normalised image 0 everywhere, border 0 too.


def test_digits_translates_by_at_most_two_and_never_flips():
    x = _images(300, 28, 28, 1)
    out = np.asarray(preprocess(x, jax.random.key(3), augment="digits", train=True, **IDENTITY))
    hits = _matches(out, x, pad=2)
    assert hits[:, 0].any(axis=(1, 2)).all()
    assert not hits[:, 1].any(), "digits augmentation must not flip"
    _, dy, dx = np.nonzero(hits[:, 0])
    assert set(dy) == set(dx) == set(range(5))


def test_flip_happens_in_about_half_of_the_examples():
    x = _images(1000, 8, 8, 1)
    out = np.asarray(preprocess(x, jax.random.key(4), augment="cifar", train=True, **IDENTITY))
    flipped = _matches(out, x, pad=4)[:, 1].any(axis=(1, 2))
    # Binomial(1000, 0.5): sd ≈ 16, so ±100 is ~6 sd.
    assert 400 < flipped.sum() < 600


def test_deterministic_for_a_key_and_varies_across_keys():
    x = _images(50, 32, 32, 3)
    run = functools.partial(preprocess, x, augment="cifar", train=True, **IDENTITY)
    a, b, c = run(jax.random.key(5)), run(jax.random.key(5)), run(jax.random.key(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("augment", ["cifar", "digits", "none"])
def test_eval_is_normalisation_only(augment):
    x = _images(20)
    out = preprocess(x, jax.random.key(7), mean=(5,), std=(2,), augment=augment, train=False)
    np.testing.assert_allclose(out, (x.astype(np.float32) - 5) / 2, rtol=1e-6)


def test_none_augmentation_is_normalisation_only_when_training():
    x = _images(20)
    out = preprocess(x, jax.random.key(8), augment="none", train=True, **IDENTITY)
    np.testing.assert_array_equal(out, x.astype(np.float32))


def test_jitted_matches_eager():
    x = _images(50, 32, 32, 3)
    kw = {"mean": (120.0, 115.0, 100.0), "std": (60.0, 61.0, 62.0), "augment": "cifar"}
    step = jax.jit(lambda x, key: preprocess(x, key, train=True, **kw))
    key = jax.random.key(9)
    np.testing.assert_allclose(step(x, key), preprocess(x, key, train=True, **kw), rtol=1e-6)


def test_random_crop_keeps_integer_dtype():
    x = _images(4)
    out = random_crop(x, jax.random.key(10), pad=4)
    assert out.dtype == np.uint8 and out.shape == x.shape


def test_errors():
    x = _images(2)
    with pytest.raises(DataError, match="unknown augmentation 'flip'"):
        preprocess(x, None, augment="flip", train=False, **IDENTITY)
    with pytest.raises(DataError, match="mean has 2 values for 3-channel images"):
        preprocess(x, None, mean=(1, 2), std=(1,), augment="none", train=False)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        preprocess(x, None, augment="cifar", train=True, **IDENTITY)

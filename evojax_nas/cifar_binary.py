"""CIFAR-10/100 from the official *binary* archives: numpy only, no TensorFlow, no pickle.

The archives (https://www.cs.toronto.edu/~kriz/cifar.html) hold fixed-size records: the label
byte(s) — CIFAR-10: the class; CIFAR-100: the coarse, then the fine class — followed by 3,072
pixel bytes (the red, green and blue 32×32 planes, row by row).

- CIFAR-10: ``cifar-10-binary.tar.gz`` → ``cifar-10-batches-bin/data_batch_{1..5}.bin``
  (10,000 records each) and ``test_batch.bin`` (10,000).
- CIFAR-100: ``cifar-100-binary.tar.gz`` → ``cifar-100-binary/train.bin`` (50,000) and
  ``test.bin`` (10,000); the label is the fine class, as in tensorflow-datasets.

The examples come back in the order tensorflow-datasets stores them (it sorts each split by the
MD5 of the split name followed by the record's index in the archive, see `tfds_order`), so the
fixed 45,000 / 5,000 train / validation split of `evojax_nas.data` holds the same images
whichever of the two a run reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tarfile
import zlib

import numpy as np

from evojax_nas.errors import DataError

PIXELS = 3 * 32 * 32


@dataclasses.dataclass(frozen=True)
class Layout:
    """One dataset's binary layout."""

    name: str
    archive: str  # the official binary archive's file name
    folder: str  # the folder inside it
    label_bytes: int  # bytes before the pixels of each record
    files: dict[str, tuple[str, ...]]  # split -> files, in archive order
    records: dict[str, int]  # file -> records it must hold
    pickle_names: tuple[str, ...]  # the python-pickle archive and folder, refused
    num_classes: int

    @property
    def record_bytes(self) -> int:
        return self.label_bytes + PIXELS


CIFAR10 = Layout(
    name="cifar10",
    archive="cifar-10-binary.tar.gz",
    folder="cifar-10-batches-bin",
    label_bytes=1,
    files={
        "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        "test": ("test_batch.bin",),
    },
    records={**{f"data_batch_{i}.bin": 10_000 for i in range(1, 6)}, "test_batch.bin": 10_000},
    pickle_names=("cifar-10-python.tar.gz", "cifar-10-batches-py"),
    num_classes=10,
)
CIFAR100 = Layout(
    name="cifar100",
    archive="cifar-100-binary.tar.gz",
    folder="cifar-100-binary",
    label_bytes=2,
    files={"train": ("train.bin",), "test": ("test.bin",)},
    records={"train.bin": 50_000, "test.bin": 10_000},
    pickle_names=("cifar-100-python.tar.gz", "cifar-100-python"),
    num_classes=100,
)
LAYOUTS = {"cifar10": CIFAR10, "cifar100": CIFAR100}


@dataclasses.dataclass(frozen=True)
class Found:
    """Where a dataset's binary files are: an archive (``.tar.gz``) or an extracted folder."""

    layout: Layout
    path: str
    is_archive: bool


def _holds(folder: str, layout: Layout) -> bool:
    return os.path.isfile(os.path.join(folder, layout.files["train"][0]))


def _looks_like_pickle_folder(folder: str) -> bool:
    names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    return "data_batch_1" in names or {"train", "meta"} <= names


def find(name: str, data_dir: str) -> Found | None:
    """Finds the official binary archive of `name` in `data_dir`.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_dir: A folder holding the archive or its extracted folder, such a folder itself,
            or the archive's path. ``gs://`` paths are left to tensorflow-datasets.

    Returns:
        Where the files are, or None when `data_dir` holds no CIFAR archive at all (it may then
        be a tensorflow-datasets ``data_dir``).

    Raises:
        DataError: `data_dir` does not exist, holds the python-pickle archive, or holds the
            other CIFAR.
    """
    layout = LAYOUTS[name]
    if "://" in data_dir:
        return None
    path = os.path.expanduser(data_dir)
    if not os.path.exists(path):
        raise DataError(f"--data-dir {data_dir}: no such file or directory")
    if os.path.isfile(path):
        base = os.path.basename(path)
        if base == layout.archive:
            return Found(layout, path, True)
        _refuse_pickle_or_other(base, layout, data_dir)
        raise DataError(
            f"{data_dir}: not the {name} binary archive; expected {layout.archive} or a folder "
            "holding it"
        )
    if _holds(path, layout):
        return Found(layout, path, False)
    if _holds(os.path.join(path, layout.folder), layout):
        return Found(layout, os.path.join(path, layout.folder), False)
    if os.path.isfile(os.path.join(path, layout.archive)):
        return Found(layout, os.path.join(path, layout.archive), True)
    for entry in [os.path.basename(os.path.normpath(path)), *sorted(os.listdir(path))]:
        _refuse_pickle_or_other(entry, layout, data_dir)
    if _looks_like_pickle_folder(path):
        _refuse_pickle_or_other(layout.pickle_names[1], layout, data_dir)
    for other in LAYOUTS.values():
        if other is not layout and _holds(path, other):
            _refuse_pickle_or_other(other.folder, layout, data_dir)
    return None


def _refuse_pickle_or_other(entry: str, layout: Layout, data_dir: str) -> None:
    for candidate in LAYOUTS.values():
        if entry in candidate.pickle_names:
            raise DataError(
                f"{data_dir}: {entry} is the python-pickle version of "
                f"{candidate.name}, which evojax-nas does not read (unpickling runs code); "
                f"download the binary version instead: {candidate.archive} from "
                "https://www.cs.toronto.edu/~kriz/cifar.html"
            )
        if candidate is not layout and entry in (candidate.archive, candidate.folder):
            raise DataError(
                f"{data_dir}: holds {entry}, the {candidate.name} archive, but the dataset is "
                f"{layout.name}; use --dataset {candidate.name} or put {layout.archive} there"
            )


def _read_files(found: Found, files: tuple[str, ...]) -> list[tuple[bytes, str]]:
    """The bytes of some files of the dataset (one pass over an archive), with their names."""
    if not found.is_archive:
        out = []
        for file in files:
            path = os.path.join(found.path, file)
            if not os.path.isfile(path):
                raise DataError(f"{path}: missing from the {found.layout.name} binary folder")
            with open(path, "rb") as f:
                out.append((f.read(), path))
        return out
    members = {f"{found.layout.folder}/{file}": file for file in files}
    data: dict[str, bytes] = {}
    try:
        with tarfile.open(found.path, "r:gz") as tar:
            for info in tar:
                if info.name in members and info.isfile():
                    handle = tar.extractfile(info)
                    data[info.name] = handle.read() if handle is not None else b""
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{found.path}: unreadable or truncated archive ({reason})") from e
    missing = [m for m in members if m not in data]
    if missing:
        raise DataError(
            f"{found.path}: has no {missing[0]}; is it the official {found.layout.archive}?"
        )
    return [(data[m], f"{found.path}:{m}") for m in members]


def parse_records(data: bytes, layout: Layout, where: str, expected: int | None = None):
    """Parses one binary file into uint8 ``N×32×32×3`` images and int32 labels.

    Args:
        data: The file's bytes.
        layout: Its dataset's layout.
        where: The file's name, for messages.
        expected: The number of records it must hold, if known.

    Returns:
        ``(images, labels)``; for CIFAR-100 the fine labels.

    Raises:
        DataError: A size that is not a whole number of records, the wrong count, a label out
            of range.
    """
    size = layout.record_bytes
    if len(data) == 0 or len(data) % size:
        raise DataError(
            f"{where}: {len(data)} bytes is not a whole number of {size}-byte {layout.name} "
            "records (truncated or not the binary version)"
        )
    count = len(data) // size
    if expected is not None and count != expected:
        raise DataError(f"{where}: holds {count} records; the official file holds {expected}")
    table = np.frombuffer(data, dtype=np.uint8).reshape(count, size)
    labels = table[:, layout.label_bytes - 1].astype(np.int32)
    if labels.max() >= layout.num_classes:
        raise DataError(
            f"{where}: label {int(labels.max())} out of range 0..{layout.num_classes - 1} "
            f"(is this the {layout.name} binary archive?)"
        )
    if layout.label_bytes == 2 and table[:, 0].max() >= 20:
        raise DataError(f"{where}: coarse label {int(table[:, 0].max())} out of range 0..19")
    images = table[:, layout.label_bytes :].reshape(count, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def tfds_order(n: int, split: str) -> np.ndarray:
    """The order tensorflow-datasets stores the records of a split in (index → archive index).

    tfds keys CIFAR's examples by their index in the archive and writes each split sorted by
    ``md5(split name + str(index))`` (``tensorflow_datasets.core.hashing``, salt = split name).
    """
    salted = hashlib.md5(split.encode())

    def digest(i: int) -> bytes:
        h = salted.copy()
        h.update(str(i).encode())
        return h.digest()

    return np.asarray(sorted(range(n), key=digest), dtype=np.int64)


def read_split(found: Found, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads the ``"train"`` or ``"test"`` split, in tensorflow-datasets' order.

    Args:
        found: From `find`.
        split: ``"train"`` or ``"test"``.

    Returns:
        uint8 ``N×32×32×3`` images and int32 labels.

    Raises:
        DataError: A missing, truncated or malformed file (named in the message).
    """
    images, labels = [], []
    files = found.layout.files[split]
    for file, (data, where) in zip(files, _read_files(found, files), strict=True):
        x, y = parse_records(data, found.layout, where, found.layout.records.get(file))
        images.append(x)
        labels.append(y)
    x, y = np.concatenate(images), np.concatenate(labels)
    order = tfds_order(len(y), split)
    return x[order], y[order]

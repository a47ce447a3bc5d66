"""CIFAR-10/100 from the official binary archives: layout, tfds order, checks, errors, CLI."""

import dataclasses
import io
import os
import tarfile

import numpy as np
import pytest

from evojax_nas import cifar_binary, data
from evojax_nas.errors import DataError

N_TRAIN, N_TEST = 40, 10  # small archives in the official layout; 5 CIFAR-10 batches of 8


@pytest.fixture
def small(monkeypatch):
    """Small record counts (the official ones are 10,000 per batch / 50,000 and 10,000)."""
    c10 = dataclasses.replace(
        cifar_binary.CIFAR10,
        records={**{f"data_batch_{i}.bin": N_TRAIN // 5 for i in range(1, 6)}},
    )
    c10.records["test_batch.bin"] = N_TEST
    c100 = dataclasses.replace(
        cifar_binary.CIFAR100, records={"train.bin": N_TRAIN, "test.bin": N_TEST}
    )
    monkeypatch.setitem(cifar_binary.LAYOUTS, "cifar10", c10)
    monkeypatch.setitem(cifar_binary.LAYOUTS, "cifar100", c100)
    return {"cifar10": c10, "cifar100": c100}


def records(layout, x, y, coarse=None):
    """The bytes of a binary file: label byte(s), then the R, G, B planes of each image."""
    planes = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
    labels = [y[:, None]] if layout.label_bytes == 1 else [coarse[:, None], y[:, None]]
    return np.concatenate([*labels, planes], axis=1).astype(np.uint8).tobytes()


def files_for(layout, splits):
    """{file name: bytes} for the layout, from {split: (x, y)} in archive order."""
    out = {}
    for split, (x, y) in splits.items():
        names = layout.files[split]
        for name, xs, ys in zip(
            names, np.array_split(x, len(names)), np.array_split(y, len(names)), strict=True
        ):
            out[name] = records(layout, xs, ys, coarse=ys % 20)
    return out


def write_folder(root, layout, files):
    folder = root / layout.folder
    folder.mkdir(parents=True)
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    return folder


def write_archive(root, layout, files):
    root.mkdir(parents=True, exist_ok=True)
    path = root / layout.archive
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"{layout.folder}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def random_split(rng, n, classes):
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, n)


def test_tfds_order_is_the_order_tfds_writes_a_split_in(tmp_path):
    shuffle = pytest.importorskip("tensorflow_datasets.core.shuffle")
    for split in ("train", "test"):
        shuffler = shuffle.Shuffler(tmp_path, hash_salt=split, disable_shuffling=False)
        for i in range(500):  # tfds keys CIFAR's examples by their index in the archive
            shuffler.add(i, str(i).encode())
        written = [int(blob) for _, blob in shuffler]
        assert written == cifar_binary.tfds_order(500, split).tolist()


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("form", ["archive", "folder", "parent-of-folder", "archive-path"])
def test_reads_back_a_small_archive_in_the_official_layout(small, tmp_path, name, form):
    layout = small[name]
    rng = np.random.default_rng(0)
    train, test = random_split(rng, N_TRAIN, layout.num_classes), random_split(rng, N_TEST, 10)
    files = files_for(layout, {"train": train, "test": test})
    if form in ("archive", "archive-path"):
        path = write_archive(tmp_path, layout, files)
        data_dir = str(path if form == "archive-path" else tmp_path)
    else:
        folder = write_folder(tmp_path, layout, files)
        data_dir = str(folder if form == "folder" else tmp_path)
    found = cifar_binary.find(name, data_dir)
    for split, (x, y) in (("train", train), ("test", test)):
        got_x, got_y = cifar_binary.read_split(found, split)
        order = cifar_binary.tfds_order(len(y), split)
        assert got_x.dtype == np.uint8 and got_y.dtype == np.int32
        np.testing.assert_array_equal(got_x, x[order])  # pixels: HWC from the R, G, B planes
        np.testing.assert_array_equal(got_y, y[order])  # CIFAR-100: the fine label
    ds = data.load_dataset(name, data_dir=data_dir)
    assert len(ds.y_train) == 36 and len(ds.y_val) == 4 and ds.num_classes == layout.num_classes
    x_test, _ = data.load_test_split(name, data_dir=data_dir)
    assert x_test.shape == (N_TEST, 32, 32, 3)


def test_the_pixel_layout_is_red_green_blue_planes(small, tmp_path):
    layout = small["cifar10"]
    blob = bytearray(layout.record_bytes)
    blob[0] = 7
    blob[1 + 0 * 1024 + 32 * 2 + 5] = 11  # red at row 2, column 5
    blob[1 + 2 * 1024 + 31] = 13  # blue at row 0, column 31
    x, y = cifar_binary.parse_records(bytes(blob), layout, "f")
    assert y.tolist() == [7] and x[0, 2, 5, 0] == 11 and x[0, 0, 31, 2] == 13 and x.sum() == 24


@pytest.fixture
def mock_tfds(monkeypatch):
    """As in test_data: tfds mock data, batched reads routed through __getitem__."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.core.data_sources import base

    monkeypatch.setattr(
        base.BaseDataSource, "__getitems__", lambda self, keys: [self[k] for k in keys]
    )
    with tfds.testing.mock_data(num_examples=N_TRAIN):
        yield


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_tfds_and_the_binary_archive_give_identical_arrays(small, mock_tfds, tmp_path, name):
    """The same images through both paths: the same train / validation / test arrays."""
    layout = dataclasses.replace(small[name], records={})  # tfds mock: 40 test examples too
    cifar_binary.LAYOUTS[name] = layout
    tfds_dir = tmp_path / "tfds"
    tfds_dir.mkdir()
    splits = {s: data._read_tfds_split(name, str(tfds_dir), s) for s in ("train", "test")}
    # Write the archive in the order tfds read it from: tfds' order applied to it gives it back.
    archive_order = {}
    for split, (x, y) in splits.items():
        inverse = np.argsort(cifar_binary.tfds_order(len(y), split))
        archive_order[split] = (x[inverse], y[inverse])
    write_archive(tmp_path / "bin", layout, files_for(layout, archive_order))
    via_tfds = data.load_dataset(name, data_dir=str(tfds_dir))
    via_binary = data.load_dataset(name, data_dir=str(tmp_path / "bin"))
    for field in ("x_train", "y_train", "x_val", "y_val"):
        np.testing.assert_array_equal(getattr(via_binary, field), getattr(via_tfds, field))
    assert via_binary.mean == via_tfds.mean and via_binary.num_classes == via_tfds.num_classes
    for a, b in zip(
        data.load_test_split(name, data_dir=str(tmp_path / "bin")),
        data.load_test_split(name, data_dir=str(tfds_dir)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def bad_data_dirs(root, layout):
    """{case: (data_dir, words the one-line message must hold)}."""
    rng = np.random.default_rng(1)
    files = files_for(
        layout, {"train": random_split(rng, N_TRAIN, 10), "test": random_split(rng, N_TEST, 10)}
    )
    cases = {"missing": (str(root / "nowhere"), ["no such file or directory"])}
    whole = write_archive(root / "whole", layout, files).read_bytes()
    (root / "truncated").mkdir()
    (root / "truncated" / layout.archive).write_bytes(whole[: len(whole) // 2])
    cases["truncated archive"] = (str(root / "truncated"), [layout.archive, "truncated"])
    (root / "pickle").mkdir()
    (root / "pickle" / "cifar-10-python.tar.gz").write_bytes(b"not read")
    cases["pickle archive"] = (str(root / "pickle"), ["python-pickle", "cifar-10-binary.tar.gz"])
    (root / "pickle-dir" / "cifar-10-batches-py").mkdir(parents=True)
    cases["pickle folder"] = (
        str(root / "pickle-dir" / "cifar-10-batches-py"),
        ["python-pickle", "cifar-10-binary.tar.gz"],
    )
    (root / "other").mkdir()
    (root / "other" / "cifar-100-binary.tar.gz").write_bytes(b"x")
    cases["wrong dataset"] = (str(root / "other"), ["cifar100", "--dataset cifar100"])
    short = dict(files)
    short["data_batch_3.bin"] = short["data_batch_3.bin"][:-100]
    write_folder(root / "short", layout, short)
    cases["truncated file"] = (
        str(root / "short"),
        ["data_batch_3.bin", "not a whole number of 3073-byte"],
    )
    extra = dict(files)
    extra["data_batch_2.bin"] += extra["data_batch_2.bin"][: layout.record_bytes]
    write_folder(root / "count", layout, extra)
    cases["wrong record count"] = (str(root / "count"), ["data_batch_2.bin", "holds 9 records"])
    bad_label = bytearray(files["test_batch.bin"])
    bad_label[0] = 12
    write_folder(root / "label", layout, {**files, "test_batch.bin": bytes(bad_label)})
    cases["label out of range"] = (str(root / "label"), ["test_batch.bin", "label 12 out of range"])
    return cases


def test_bad_data_dirs_raise_one_line_naming_the_file(small, tmp_path):
    for case, (data_dir, words) in bad_data_dirs(tmp_path, small["cifar10"]).items():
        with pytest.raises(DataError) as info:
            data.check_dataset("cifar10", data_dir)
        message = str(info.value)
        assert all(w in message for w in words), (case, message)
        assert "\n" not in message


@pytest.mark.parametrize(
    "case", ["missing", "truncated archive", "pickle archive", "wrong dataset"]
)
def test_evolve_with_a_bad_data_dir_exits_2_and_writes_nothing(tmp_path, case, run_cli):
    layout = cifar_binary.CIFAR10  # official counts: the CLI runs in its own process
    data_dir, words = bad_data_dirs(tmp_path / "data", layout)[case]
    out = run_cli(
        "evolve", "--out", str(tmp_path / "run"), "--dataset", "cifar10", "--data-dir", data_dir,
        "--max-children", "1", timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert all(w in out.stderr for w in words), out.stderr
    assert sorted(os.listdir(tmp_path)) == ["data"]  # no run directory, nothing else


def test_prepare_data_without_tensorflow_names_what_to_do(tmp_path, run_cli):
    try:
        import tensorflow  # noqa: F401

        pytest.skip("tensorflow is installed here")
    except ImportError:
        pass
    out = run_cli("prepare-data", "cifar10", "--data-dir", str(tmp_path / "tfds"), timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "tensorflow" in out.stderr and "cifar-10-binary.tar.gz" in out.stderr
    assert not (tmp_path / "tfds").exists()


def test_prepare_data_refuses_a_dataset_it_cannot_prepare(run_cli):
    bad = run_cli("prepare-data", "mnist5k", "--data-dir", "unused", timeout=60)
    assert bad.returncode == 2 and "cifar10" in bad.stderr and "Traceback" not in bad.stderr

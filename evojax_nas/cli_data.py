"""`evojax-nas prepare-data`: prepare CIFAR-10/100 once, for every worker to read."""

from __future__ import annotations

import argparse

from evojax_nas.errors import DataError

_ARCHIVES = {"cifar10": "cifar-10-binary.tar.gz", "cifar100": "cifar-100-binary.tar.gz"}
_URL = "https://www.cs.toronto.edu/~kriz/"


def add_command(sub) -> None:
    p = sub.add_parser(
        "prepare-data",
        help="prepare CIFAR-10/100 in tensorflow-datasets format (needs TensorFlow and internet)",
        description="Downloads and prepares CIFAR in array_record format under --data-dir "
        "(a directory or gs://…), for `evolve --data-dir`. Without TensorFlow or internet, use "
        "the official binary archive instead: no preparation needed.",
    )
    p.add_argument("dataset", choices=sorted(_ARCHIVES), help="cifar10 or cifar100")
    p.add_argument("--data-dir", required=True, help="where to prepare it (directory or gs://)")
    p.set_defaults(handler=run_prepare)


def _alternative(name: str) -> str:
    return (
        f"or download the binary archive instead ({_URL}{_ARCHIVES[name]}), put it in a folder "
        f"and pass that folder as --data-dir: it is read as it is"
    )


def prepare(name: str, data_dir: str) -> str:
    """Downloads and prepares `name` with tensorflow-datasets under `data_dir`.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_dir: A local directory or ``gs://`` path.

    Returns:
        A one-line summary of what is there now.

    Raises:
        DataError: Unknown dataset, TensorFlow missing, no network, or the preparation failed;
            the message names the extra to install or the archive to download.
    """
    if name not in _ARCHIVES:
        raise DataError(f"prepare-data prepares cifar10 or cifar100, not {name!r}")
    if "://" not in data_dir:
        from evojax_nas.cifar_binary import find

        try:
            found = find(name, data_dir)
        except DataError:
            found = None  # missing or another dataset's files: prepare as asked
        if found is not None:
            return (
                f"{found.path} is the {name} binary archive: nothing to prepare; "
                f"use --data-dir {data_dir}"
            )
    try:
        import tensorflow  # noqa: F401  (tfds needs it to build the dataset)
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            f"preparing {name} needs TensorFlow and tensorflow-datasets: pip install "
            f"'evojax_nas[cifar]' tensorflow (on a machine with internet) — {_alternative(name)}"
        ) from None
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare()
    except Exception as e:  # network, permissions, disk: tfds raises many types
        reason = " ".join(str(e).split())[:300]
        raise DataError(
            f"preparing {name} under {data_dir} failed ({reason}) — {_alternative(name)}"
        ) from e
    splits = ", ".join(f"{k} {v.num_examples}" for k, v in builder.info.splits.items())
    return f"{name} is prepared under {data_dir} ({splits}): pass --data-dir {data_dir}"


def run_prepare(args: argparse.Namespace) -> int:
    print(prepare(args.dataset, args.data_dir))
    return 0

"""Shared test fixtures (instead of test modules importing each other)."""

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from evojax_nas import data
from evojax_nas import dna as D
from evojax_nas.cli_train import read_dna
from evojax_nas.config import EvolutionConfig
from evojax_nas.data import Dataset
from evojax_nas.model import init_variables
from evojax_nas.store import open_store

SYNTHETIC = EvolutionConfig(  # the config of `synthetic_run`, and `tiny_config`
    dataset="digits8x8",
    population=3,
    workers=1,
    steps=3,
    max_children=6,
    # architecture-preserving mutations: one compiled program keeps a real evolution quick
    mutation_weights={"identity": 1.0, "alter_learning_rate": 1.0, "reset_weights": 1.0},
)


def make_random_dataset(n=100, hw=8, c=3, classes=4, seed=0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, hw, hw, c), dtype=np.uint8)
    y = rng.integers(0, classes, n).astype(np.int32)
    return Dataset("random", x, y, x[:20], y[:20], classes, (127.0,) * c, (74.0,) * c, "cifar")


def publish(store, ind_id, dna, *, val, born, parent=None, params=True, key=0):
    variables = init_variables(dna, jax.random.PRNGKey(key)) if params else None
    record = {
        "parent": parent,
        "mutation": {"names": [], "touched": [], "reinitialised": []},
        "val_accuracy": val,
        "born": born,
        "train_seconds": 1.0,
        "flops": 1e6,
        "architecture": D.describe(dna),
        "architecture_key": D.architecture_key(dna),
    }
    store.publish(ind_id, D.to_dict(dna), record, val, variables)


def make_synthetic_run(path, **cfg_changes):
    """Untrained individuals with weights: fast to build, real to evaluate."""
    store = open_store(str(path))
    store.write_config(dataclasses.replace(SYNTHETIC, **cfg_changes).to_dict())
    dna = D.initial_dna(1, 10)
    for i, val in enumerate([0.2, 0.3, 0.25, 0.4]):
        parent = f"i{i - 1}" if i else None
        publish(store, f"i{i}", dna, val=val, born=1000.0 + 60 * i, parent=parent, key=i)
    conv = D.for_data(read_dna("small_conv"), 1, 10)  # convolutions and batch-norm statistics
    publish(store, "c4", conv, val=0.35, born=1300.0, parent="i3", key=4)
    return store


def make_tiny_run(path, data, **cfg_changes):
    """A tiny in-process evolution (6 children: convolutions inserted, identities, learning
    rates) on `data` (`make_random_dataset(100, 8, 3, 4)`); returns (store, evaluate)."""
    from evojax_nas.evolution import Worker, training_evaluator

    cfg = dataclasses.replace(
        EvolutionConfig(),
        population=3,
        steps=4,
        eval_batch_size=50,
        dataset="random",
        seed=11,
        mutation_weights={"insert_convolution": 1.0, "identity": 1.0, "alter_learning_rate": 1.0},
        **cfg_changes,
    )
    store = open_store(str(path))
    store.write_config(cfg.to_dict())
    evaluate = training_evaluator(data, cfg)
    worker = Worker(store, cfg, 0, evaluate, 3, 4)
    while worker.children < 6:
        worker.step()
    return store, evaluate


def load_script(script: str):
    """`scripts/<script>` imported as a module (scripts are not a package)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), f"{path}/{script}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(script, *args: str, timeout: float = 300) -> dict:
    """Runs `scripts/<script>` as a user would, with `args`; its JSON output."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
    out = subprocess.run(
        [sys.executable, os.path.join(path, script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


@pytest.fixture
def random_dataset():
    """A factory of random uint8 datasets: random_dataset(n, hw, c, classes, seed)."""
    return make_random_dataset


@pytest.fixture(scope="session")
def tiny_config() -> EvolutionConfig:
    """A tiny run's config: digits 8×8, population 3, 3 training steps a child, 6 children."""
    return SYNTHETIC


@pytest.fixture(scope="session")
def synthetic_run():
    """A factory of runs of untrained individuals with weights: synthetic_run(path, **cfg)."""
    return make_synthetic_run


@pytest.fixture
def count_test_split(monkeypatch) -> list:
    """Counts reads of the test split (the list of their arguments)."""
    calls, real = [], data.load_test_split

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "load_test_split", counted)
    return calls


EXE = shutil.which("evojax-nas") or os.path.join(os.path.dirname(sys.executable), "evojax-nas")


def _run_cli(*args, timeout=300, cwd=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [EXE, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )


@pytest.fixture
def run_cli():
    """Runs `evojax-nas ARGS…` in a subprocess: run_cli(*args, timeout=300, cwd=None)."""
    return _run_cli


@pytest.fixture
def cli_main(capsys):
    """Runs `evojax-nas ARGS…` in this process through `cli.main`: cli_main(*args) gives
    (exit code, stdout, stderr); argparse's own exits give their code too. Environment
    variables a command sets in its process (a worker's device plan) are undone after."""
    from evojax_nas import cli

    def run(*args) -> tuple[int, str, str]:
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as exc:  # argparse: --help, a usage error
            code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    before = dict(os.environ)
    try:
        yield run
    finally:
        for name in set(os.environ) - set(before):
            del os.environ[name]
        os.environ.update(before)


@pytest.fixture(autouse=True)
def _no_persistent_compilation_cache_in_process(monkeypatch):
    """`cli.main` run in-process would turn on JAX's persistent compilation cache for the whole
    test process; with it on, programs are not shared through a store, so later tests would
    behave differently depending on test order. Subprocesses (real entry points) keep it."""
    monkeypatch.setattr("evojax_nas.train.enable_compilation_cache", lambda *a, **k: None)

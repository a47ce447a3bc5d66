"""The CLI end to end: in-process through `cli.main`, except a few smoke tests of the installed
entry point and the commands that start worker processes."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from evojax_nas import devices
from evojax_nas import train as train_lib
from evojax_nas.config import EvolutionConfig
from evojax_nas.evolution import Worker, train_config
from evojax_nas.model import flatten
from evojax_nas.store import open_store
from evojax_nas.train import TrainResult

EXE = shutil.which("evojax-nas") or os.path.join(os.path.dirname(sys.executable), "evojax-nas")


def cli(*args, timeout=300, cwd=None, extra_env=None):
    """The installed `evojax-nas` entry point, in a subprocess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra_env or {}))
    return subprocess.run(
        [EXE, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )


def one_line_error(code, err):
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# -- smoke tests of the installed entry point (a fresh process each) -------------------------------


def test_entry_point_help_lists_the_commands():
    out = cli("--help", timeout=120)
    assert out.returncode == 0, out.stderr
    assert all(c in out.stdout for c in ("evolve", "worker", "train", "mutate", "report"))


def test_entry_point_trains_and_prints_human_output():
    out = cli("train", "--dna", "initial", "--steps", "5")
    assert out.returncode == 0, out.stderr
    assert "val accuracy" in out.stdout and "wall time" in out.stdout
    if devices.cpu_only_environment():  # libtpu installed on a host without TPU chips (CI)
        # ...where JAX alone would initialise the TPU runtime and print libtpu's warnings
        assert "TPU" not in out.stderr, out.stderr


def test_entry_point_bad_input_exits_2_with_one_line(tmp_path):
    out = cli("train", "--dna", str(tmp_path / "missing.json"), cwd=tmp_path, timeout=120)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "cannot read DNA file" in out.stderr
    one_line_error(out.returncode, out.stderr)


# -- train -----------------------------------------------------------------------------------------


def test_train_prints_fitness_flops_and_timings_as_json(cli_main):
    code, out, err = cli_main("train", "--dna", "small_conv", "--steps", "20", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert 0.0 <= result["val_accuracy"] <= 1.0
    assert result["steps"] == 20 and not result["diverged"]
    assert result["flops"] > result["flops_train_step"] * 20
    assert set(result["seconds"]) >= {"init", "compile", "train", "eval"}


def test_train_human_output(cli_main):
    code, out, err = cli_main("train", "--dna", "initial", "--steps", "5")
    assert code == 0, err
    assert "val accuracy" in out and "wall time" in out


def test_train_seed_trains_a_runs_first_initial_individual(tmp_path, cli_main, monkeypatch):
    """`train --dna initial --seed S` starts from the weights, and trains with the key and
    config, of the initial individual worker 0's first event of a run with seed S makes."""
    seed = 4
    cfg = EvolutionConfig(dataset="digits8x8", population=2, steps=2, batch_size=16, seed=seed)
    store = open_store(str(tmp_path / "run"))
    store.write_config(cfg.to_dict())
    in_run = []

    def evaluate(dna, params, key):
        in_run.append((dna, params, key))
        return TrainResult(params, 0.5, False, 1, 1.0, 1.0, 1, 1, {"train": 0.0})

    assert Worker(store, cfg, 0, evaluate, 1, 10).step()["id"] == "init-000-000000"
    in_cli, real = [], train_lib.train_and_evaluate

    def spy(dna, variables, data, key, config, *args, **kwargs):
        in_cli.append((dna, variables, key, config))
        return real(dna, variables, data, key, config, *args, **kwargs)

    monkeypatch.setattr(train_lib, "train_and_evaluate", spy)
    argv = ["--dna", "initial", "--dataset", "digits8x8", "--steps", "2", "--batch-size", "16"]
    code, out, err = cli_main("train", *argv, "--seed", seed, "--json")
    assert code == 0, err
    (run_dna, run_vars, run_key), (dna, variables, key, config) = in_run[0], in_cli[0]
    assert dna == run_dna and config == train_config(cfg)
    assert np.array_equal(jax.random.key_data(key), jax.random.key_data(run_key))
    a, b = flatten(variables), flatten(run_vars)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads(out)["steps"] == 2
    code, _, _ = cli_main("train", *argv, "--seed", seed + 1, "--json")  # another run's
    other = flatten(in_cli[1][1])
    assert code == 0 and not all(np.array_equal(other[k], a[k]) for k in a)


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--dna", "/nonexistent.json"], "cannot read DNA file"),
        (["train", "--dna", "initial", "--steps", "0"], "positive integer"),
        (["train", "--dna", "initial", "--dataset", "imagenet"], "unknown dataset"),
        (["train", "--dna", "initial", "--learning-rate", "-1"], "learning-rate"),
        (["train"], "required"),
        (["evolve", "--config", "/nonexistent.json"], "no config"),
        (["status", "/nonexistent-store"], "no run at"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_2(args, message, tmp_path, cli_main, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_main(*args)
    one_line_error(code, err)
    assert message in err.lower() or message in err


def test_a_bad_xla_cache_bound_fails_before_any_worker_starts(tmp_path, cli_main, monkeypatch):
    monkeypatch.setenv("EVOJAX_NAS_XLA_CACHE_MAX_MB", "lots")
    code, _, err = cli_main("evolve", "--out", tmp_path / "run", "--max-children", 2)
    one_line_error(code, err)
    assert "EVOJAX_NAS_XLA_CACHE_MAX_MB='lots'" in err and "MiB" in err
    assert not (tmp_path / "run").exists()


def test_bad_dna_file_names_the_fault(tmp_path, cli_main):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"vertices": [], "edges": [], "learning_rate": 0.1}))
    code, _, err = cli_main("train", "--dna", str(bad))
    assert code == 2 and "exactly one input vertex" in err


# -- evolve, worker, status, report ----------------------------------------------------------------


def test_evolve_end_to_end_with_two_worker_processes(tmp_path, cli_main):
    run = tmp_path / "run"
    out = cli(
        "evolve",
        "--out",
        str(run),
        "--population",
        "4",
        "--workers",
        "2",
        "--steps",
        "10",
        "--max-children",
        "10",
        "--seed",
        "1",
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "done: 10 children" in out.stdout
    store = open_store(str(run))
    records = {r["id"]: r for r in store.records()}
    assert len(records) == 10
    required = {
        "parent",
        "mutation",
        "key",
        "learning_rate",
        "val_accuracy",
        "flops",
        "params",
        "born",
        "train_seconds",
        "worker",
        "architecture_key",
    }
    for r in records.values():
        assert required <= set(r), required - set(r)
        assert r["flops"] > 0 and 0 <= r["val_accuracy"] <= 1
    roots = set()
    for r in records.values():
        cur = r
        while cur["parent"] is not None:
            cur = records[cur["parent"]]
        roots.add(cur["id"])
    assert roots and all(i.startswith("init-") for i in roots)
    assert {r["worker"] for r in records.values()} == {0, 1}
    assert len(store.population()) == 4

    code, out, err = cli_main("status", str(run), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["individuals_trained"] == 10 and summary["population"] == 4
    assert summary["best_val_accuracy"] == max(r["val_accuracy"] for r in records.values())


def test_create_only_then_a_worker_joins_with_only_the_store_address(tmp_path, cli_main):
    run = tmp_path / "run"
    code, _, err = cli_main(
        "evolve", "--out", run, "--population", "2", "--steps", "5", "--create-only"
    )
    assert code == 0, err
    assert open_store(str(run)).population() == []
    code, out, err = cli_main("worker", run, "--max-children", "3")
    assert code == 0, err
    assert "trained 3 children" in out
    assert len(open_store(str(run)).records()) == 3
    code, _, err = cli_main("evolve", "--out", run, "--population", "3", "--create-only")
    assert code == 2 and "different config" in err


def test_evolve_status_and_report_on_a_gcs_store(tmp_path, cli_main, monkeypatch):
    """The at-scale path: workers in their own processes, coordinating through gs:// only."""
    try:
        from tests.gcs_emulator import BUCKET, create_bucket, start_emulator
    except ImportError:
        from gcs_emulator import BUCKET, create_bucket, start_emulator

    proc, url = start_emulator()
    try:
        create_bucket(url)
        env = {"STORAGE_EMULATOR_HOST": url}
        run = f"gs://{BUCKET}/e2e-run"
        out = cli(
            "evolve",
            "--out",
            run,
            "--population",
            "3",
            "--workers",
            "2",
            "--steps",
            "5",
            "--max-children",
            "6",
            timeout=600,
            extra_env=env,
        )
        assert out.returncode == 0, out.stderr
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        code, status, err = cli_main("status", run, "--json")
        assert code == 0, err
        summary = json.loads(status)
        assert summary["individuals_trained"] == 6 and summary["population"] == 3
        code, report, err = cli_main("report", run, "--json", "--out", tmp_path / "rep")
        assert code == 0, err
        result = json.loads(report)
        assert result["best_val_accuracy"] == summary["best_val_accuracy"]
        assert 0 <= result["best_test_accuracy"] <= 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# Interrupting `evolve` (signals, pipes, orphans): tests/test_lifecycle.py.


@pytest.mark.parametrize(
    "args",
    [
        ["status", "missing-run"],
        ["worker", "missing-run"],
        ["report", "missing-run"],
        ["adjust", "missing-run", "--reset-all-weights"],
        ["export", "missing-run", "--out", "model"],
        ["replay", "missing-run", "w000-e000001"],
    ],
)
def test_commands_on_a_mistyped_run_fail_cleanly_and_create_nothing(
    args, tmp_path, cli_main, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_main(*args)
    one_line_error(code, err)
    assert "no run at" in err
    assert not (tmp_path / "missing-run").exists()


def test_evolve_on_an_unprepared_dataset_says_how_to_prepare_it(tmp_path, cli_main):
    empty = tmp_path / "tfds"
    empty.mkdir()
    argv = ["--out", tmp_path / "run", "--dataset", "cifar10", "--data-dir", empty]
    code, _, err = cli_main("evolve", *argv, "--max-children", "2")
    one_line_error(code, err)
    assert "tfds build cifar10" in err

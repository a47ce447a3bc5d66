"""The real CLI, run as a user runs it (a subprocess of the installed entry point)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from evojax_nas.store import open_store

EXE = shutil.which("evojax-nas") or os.path.join(os.path.dirname(sys.executable), "evojax-nas")


def cli(*args, timeout=300, cwd=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [EXE, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )


def test_train_prints_fitness_flops_and_timings_as_json():
    out = cli("train", "--dna", "small_conv", "--steps", "20", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert 0.0 <= result["val_accuracy"] <= 1.0
    assert result["steps"] == 20 and not result["diverged"]
    assert result["flops"] > result["flops_train_step"] * 20
    assert set(result["seconds"]) >= {"init", "compile", "train", "eval"}


def test_train_human_output():
    out = cli("train", "--dna", "initial", "--steps", "5")
    assert out.returncode == 0, out.stderr
    assert "val accuracy" in out.stdout and "wall time" in out.stdout


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
def test_bad_input_gives_one_line_and_exit_code_2(args, message, tmp_path):
    out = cli(*args, cwd=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr.lower() or message in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_bad_dna_file_names_the_fault(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"vertices": [], "edges": [], "learning_rate": 0.1}))
    out = cli("train", "--dna", str(bad))
    assert out.returncode == 2 and "exactly one input vertex" in out.stderr


def test_evolve_end_to_end_with_two_worker_processes(tmp_path):
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

    status = cli("status", str(run), "--json")
    assert status.returncode == 0, status.stderr
    summary = json.loads(status.stdout)
    assert summary["individuals_trained"] == 10 and summary["population"] == 4
    assert summary["best_val_accuracy"] == max(r["val_accuracy"] for r in records.values())


def test_create_only_then_a_worker_joins_with_only_the_store_address(tmp_path):
    run = tmp_path / "run"
    made = cli("evolve", "--out", str(run), "--population", "2", "--steps", "5", "--create-only")
    assert made.returncode == 0, made.stderr
    assert open_store(str(run)).population() == []
    joined = cli("worker", str(run), "--max-children", "3")
    assert joined.returncode == 0, joined.stderr
    assert "trained 3 children" in joined.stdout
    assert len(open_store(str(run)).records()) == 3
    again = cli("evolve", "--out", str(run), "--population", "3", "--create-only")
    assert again.returncode == 2 and "different config" in again.stderr


def test_evolve_status_and_report_on_a_gcs_store(tmp_path):
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
        out = cli_env(
            env,
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
        )
        assert out.returncode == 0, out.stderr
        status = cli_env(env, "status", run, "--json")
        assert status.returncode == 0, status.stderr
        summary = json.loads(status.stdout)
        assert summary["individuals_trained"] == 6 and summary["population"] == 3
        report = cli_env(env, "report", run, "--json", "--out", str(tmp_path / "rep"))
        assert report.returncode == 0, report.stderr
        result = json.loads(report.stdout)
        assert result["best_val_accuracy"] == summary["best_val_accuracy"]
        assert 0 <= result["best_test_accuracy"] <= 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def cli_env(extra_env, *args, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra_env)
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout, env=env)


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
def test_commands_on_a_mistyped_run_fail_cleanly_and_create_nothing(args, tmp_path):
    out = cli(*args, cwd=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "no run at" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "missing-run").exists()


def test_evolve_on_an_unprepared_dataset_says_how_to_prepare_it(tmp_path):
    empty = tmp_path / "tfds"
    empty.mkdir()
    out = cli(
        "evolve",
        "--out",
        str(tmp_path / "run"),
        "--dataset",
        "cifar10",
        "--data-dir",
        str(empty),
        "--max-children",
        "2",
        timeout=300,
    )
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "tfds build cifar10" in out.stderr
    assert "Traceback" not in out.stderr

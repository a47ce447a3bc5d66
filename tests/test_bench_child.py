"""scripts/bench_child.py in its tiny mode, so that the benchmark cannot rot."""

import importlib.util
import os

import pytest

from evojax_nas import devices

try:
    from tests.conftest import run_script
except ImportError:  # tests/ is not a package: pytest put it on sys.path itself.
    from conftest import run_script


def _run(*args: str) -> dict:
    return run_script("bench_child.py", "--tiny", "--json", *args)


def test_cpu_breakdown_of_the_default_jobs_worker():
    out = _run()
    (run,) = out["runs"]
    assert run["train_impl"] == "layerwise"  # what `auto` picks on a CPU at few steps
    assert run["children"] == 4
    assert set(run["programs"]) <= {"compiled", "layers", "memory"}
    assert sum(run["programs"].values()) == 4
    assert {"select", "mutate", "compile", "train", "eval", "publish"} <= set(run["phases_seconds"])
    assert 0 < run["non_training_share"] < 1
    assert run["non_training_share_at_paper_steps"] < run["non_training_share"]
    assert "second_worker" not in out  # bench_layerwise --second-worker measures layers
    assert run["publish"] == "background"  # as worker processes publish
    inline = _run("--publish", "inline")["runs"][0]
    assert inline["publish"] == "inline" and inline["children"] == 4
    assert inline["phases_seconds"]["publish"] > 0


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_tpu_mode_compiles_a_mutation_chain_without_hardware():
    out = _run("--platform", "tpu")
    assert "v4" in out["device_kind"].lower()
    compiled = [r for r in out["chain"] if not r.get("reused")]
    assert compiled and all(r["flops_train_step"] > 0 for r in compiled)
    assert all(r["seconds"]["compile"] > 0 for r in compiled)


def test_both_train_impls_side_by_side():
    out = _run("--train-impl", "both")
    runs = {r["train_impl"]: r for r in out["runs"]}
    assert set(runs) == {"whole", "layerwise"}
    assert all(r["children"] == 4 for r in runs.values())
    assert runs["layerwise"]["program_bytes"] > 0  # layer programs shared through the store
    assert set(runs["layerwise"]["programs"]) <= {"compiled", "layers", "memory"}
    whole = runs["whole"]
    assert whole["programs"].get("compiled", 0) == whole["distinct_architectures"]
    assert whole["program_bytes"] > 0
    second = out["second_worker"]  # a new process loads what the whole-program worker compiled
    assert second["architectures"] == whole["distinct_architectures"]
    assert second["sources"] == {"shared": second["architectures"]}
    ratio = out["layerwise_vs_whole"]["off"]
    assert ratio == runs["layerwise"]["children_per_minute"] / runs["whole"]["children_per_minute"]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity here")
def test_concurrent_workers_pinned_to_their_cores_and_not():
    out = _run("--concurrent", "2")
    assert [r["mode"] for r in out["rounds"]] == ["unpinned", "pinned"]
    unpinned, pinned = (r["workers"] for r in out["rounds"])
    cores = sorted(os.sched_getaffinity(0))
    assert [w["cpus"] for w in unpinned] == [",".join(map(str, cores))] * 2
    shares = [",".join(map(str, s)) for s in devices.cpu_shares(2, cores)]
    assert [w["cpus"] for w in pinned] == shares  # each kept to its share
    assert all(w["children"] == 4 for w in pinned + unpinned)
    assert out["pinned_over_unpinned"] > 0

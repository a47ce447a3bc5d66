"""Resume mid-child: a preempted child's training continues from its saved state, bit for bit.

In-process: `run_training` resumed from a saved state at a chunk boundary (mid-epoch) ends
exactly where the uninterrupted run ends; a worker adopts a dead worker's child and publishes
what the uninterrupted worker publishes; damaged saved states are dropped with one line; of two
adopters one wins, and the worker that was thought dead gives the child up.
One subprocess test: a real worker process SIGKILLed mid-child, a new one finishes the child.
"""

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from evojax_nas import dna as D
from evojax_nas import resume
from evojax_nas.cli_train import read_dna
from evojax_nas.config import EvolutionConfig, from_dict
from evojax_nas.errors import ConcurrencyError, ConfigError
from evojax_nas.evolution import TrainingEvaluator, Worker
from evojax_nas.keys import event_key
from evojax_nas.model import flatten, init_variables
from evojax_nas.programs import ProgramCache
from evojax_nas.replay import REPRODUCED, verdict
from evojax_nas.store import open_store
from evojax_nas.train import DeviceData, TrainConfig, evaluate, run_training

try:
    from tests.conftest import make_random_dataset, publish
except ImportError:  # tests/ is not a package: pytest put it on sys.path itself.
    from conftest import make_random_dataset, publish

TINY = TrainConfig(steps=25, batch_size=10, eval_batch_size=20, steps_per_dispatch=3)
# 100 examples / batch 10 = 10 steps per epoch; chunks of 3: boundaries 3, 6, 9, 10, 13, …


class Preempted(BaseException):
    """Stands for a SIGKILL in-process: nothing after it runs (not an Exception)."""


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def _same(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb, strict=True)
    )


@pytest.fixture(scope="module")
def tiny():
    """(dataset on the device, a conv+batch-norm DNA, its variables, its programs)."""
    ds = make_random_dataset(n=100, hw=8, c=3, classes=4, seed=1)
    data = DeviceData.upload(ds, TINY.eval_batch_size)
    dna = D.for_data(read_dna("small_conv"), 3, 4)
    variables = jax.device_get(init_variables(dna, jax.random.PRNGKey(3)))
    return data, dna, variables, ProgramCache().get(dna, data.layout, TINY)


def _child(dna) -> resume.Child:
    key = [int(x) for x in np.asarray(jax.random.key_data(event_key(0, 0, 7)))]
    return resume.Child(
        "w000-e000007", 0, 7, tuple(key), "reproduce", "p", None, D.to_dict(dna), {"names": []}
    )


def test_resumed_training_is_bit_identical_to_uninterrupted(tmp_path, tiny):
    data, dna, variables, programs = tiny
    key = jax.random.PRNGKey(11)
    whole, steps, bad = run_training(programs, variables, data, key, dna.learning_rate, TINY)
    assert (steps, bad) == (25, False)

    # Interrupted after step 13 (mid-epoch: the resumed run must redo that epoch's shuffle).
    store = open_store(str(tmp_path / "run"))
    saver = resume.Checkpointer(store, _child(dna), variables, 0.0, owner=0)
    seen = []

    def preempt_after_13(step, state):
        saver(step, state)
        seen.append(step)
        if step == 13:
            raise Preempted

    with pytest.raises(Preempted):
        run_training(
            programs, variables, data, key, dna.learning_rate, TINY, on_chunk=preempt_after_13
        )
    assert seen == [3, 6, 9, 10, 13] and saver.saves == 5
    states = [n for n in store.list_blobs("resume/w000-e000007") if "/state-" in n]
    assert len(states) == 1 and "state-000000013-" in states[0]  # older states deleted

    # Nothing in memory survives: a new worker reads everything back from the store.
    found = resume.adopt(store, 5, TINY, live=lambda: set())
    assert found is not None and found.step == 13 and found.owner_index == 1
    assert found.child == _child(dna)
    assert _same(found.variables, variables)
    resumed, steps, bad = run_training(
        programs, found.variables, data, key, dna.learning_rate, TINY, start=(13, found.state)
    )
    assert (steps, bad) == (25, False)
    assert _same(resumed.params, whole.params)
    assert _same(resumed.batch_stats, whole.batch_stats)
    assert _same(resumed.opt_state, whole.opt_state)
    assert evaluate(programs, resumed.params, resumed.batch_stats, data) == evaluate(
        programs, whole.params, whole.batch_stats, data
    )
    # The comparison can fail: resuming with another key does not give the same weights.
    other, _, _ = run_training(
        programs,
        found.variables,
        data,
        jax.random.PRNGKey(12),
        dna.learning_rate,
        TINY,
        start=(13, found.state),
    )
    assert not _same(other.params, whole.params)


def test_damaged_saved_states_are_dropped_in_one_line(tmp_path, tiny, caplog):
    data, dna, variables, programs = tiny
    key = jax.random.PRNGKey(11)
    cases = {  # (which file, what is done to it)
        "truncated": ("/state-", lambda b: b[: len(b) // 2]),
        "bit flip": ("/state-", lambda b: b[:-100] + bytes([b[-100] ^ 1]) + b[-99:]),
        "not npz": ("/state-", lambda b: b"garbage"),
        "wrong-typed child": ("/child.json", lambda b: b.replace(b'"event": 7', b'"event": "7"')),
        "foreign weights": ("/initial.npz", lambda b: b[:40] + b"\0" * (len(b) - 40)),
    }
    for i, (case, (which, damage)) in enumerate(cases.items()):
        store = open_store(str(tmp_path / f"run{i}"))
        saver = resume.Checkpointer(store, _child(dna), variables, 0.0, owner=0)

        def stop_at_6(step, state, saver=saver):
            saver(step, state)
            if step == 6:
                raise Preempted

        with pytest.raises(Preempted):
            run_training(programs, variables, data, key, 0.1, TINY, on_chunk=stop_at_6)
        [name] = [n for n in store.list_blobs("resume") if which in n]
        path = os.path.join(store.root, *name.split("/"))
        with open(path, "rb") as f:
            raw = f.read()
        with open(path, "wb") as f:
            f.write(damage(raw))
        assert damage(raw) != raw, case
        caplog.clear()
        with caplog.at_level(logging.WARNING, "evojax_nas.resume"):
            assert resume.adopt(store, 5, TINY, live=lambda: set()) is None, case
        [line] = [r.getMessage() for r in caplog.records]
        assert "dropping in-flight child w000-e000007" in line and "\n" not in line, case
        assert store.list_blobs("resume") == [], case  # dropped, never retried forever


def test_one_adopter_wins_and_the_worker_thought_dead_gives_the_child_up(tmp_path, tiny):
    data, dna, variables, programs = tiny
    store = open_store(str(tmp_path / "run"))
    saver = resume.Checkpointer(store, _child(dna), variables, 0.0, owner=0)
    with pytest.raises(Preempted):

        def stop_at_3(step, state):
            saver(step, state)
            raise Preempted

        run_training(
            programs, variables, data, jax.random.PRNGKey(1), 0.1, TINY, on_chunk=stop_at_3
        )
    assert resume.adopt(store, 0, TINY, live=lambda: set()) is None  # its own: not an orphan
    assert resume.adopt(store, 5, TINY, live=lambda: {0}) is None  # its owner lives
    first = resume.adopt(store, 5, TINY, live=lambda: set())
    assert first is not None and first.owner_index == 1
    assert resume.adopt(store, 6, TINY, live=lambda: {5}) is None  # worker 5 owns it now
    # Worker 0 was alive after all (e.g. a storage outage hid its heartbeat): at its next
    # save it sees the new owner and gives the child up, deleting nothing of worker 5's.
    with pytest.raises(ConcurrencyError, match="adopted"):
        saver(6, first.state)
    saver.discard()
    assert any("owner-000001" in n for n in store.list_blobs("resume"))


def test_the_config_field_is_validated_and_documented():
    assert EvolutionConfig().resume_interval_seconds == 300.0
    assert from_dict({"resume_interval_seconds": None}).resume_interval_seconds is None
    for bad in (-1, float("nan"), "300", True):
        with pytest.raises(ConfigError, match="resume_interval_seconds"):
            from_dict({"resume_interval_seconds": bad})
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert "resume_interval_seconds" in readme.split("## What a run survives", 1)[1]


# -- a worker adopts a dead worker's child ---------------------------------------------------

CFG = dataclasses.replace(
    EvolutionConfig(population=2, seed=4, steps=25, batch_size=10, eval_batch_size=20),
    mutation_weights={"identity": 1.0},
    resume_interval_seconds=1e-9,  # every chunk
)


def _worker(root, wid, cfg=CFG):
    store = open_store(str(root))
    if store.write_config(cfg.to_dict()):
        conv = D.for_data(read_dna("small_conv"), 3, 4)
        publish(store, "a", conv, val=0.3, born=1000.0, key=1)
        publish(store, "b", conv, val=0.4, born=1001.0, key=2)
    ds = make_random_dataset(n=100, hw=8, c=3, classes=4, seed=1)
    evaluator = TrainingEvaluator(
        DeviceData.upload(ds, 20), dataclasses.replace(TINY, steps=cfg.steps), ProgramCache()
    )
    return store, Worker(store, cfg, wid, evaluator, 3, 4)


def _preempt_at_state_write(store, nth):
    """In-process SIGKILL: the nth state save raises Preempted once it has landed."""
    original, calls = store.write_blob, [0]

    def write_blob(name, data):
        original(name, data)
        if "/state-" in name:
            calls[0] += 1
            if calls[0] == nth:
                raise Preempted

    store.write_blob = write_blob


def test_a_worker_adopts_a_dead_workers_child_and_publishes_it_unchanged(tmp_path):
    ref_store, ref = _worker(tmp_path / "ref", 0)
    expected = ref.step()
    assert expected["action"] == "reproduce"
    assert ref_store.list_blobs("resume") == []  # published: its saved state is gone

    store, w0 = _worker(tmp_path / "run", 0)
    _preempt_at_state_write(store, 3)
    with pytest.raises(Preempted):
        w0.step()
    assert [m.id for m in store.population()] == [expected["parent"]]  # the kill happened
    _, w1 = _worker(tmp_path / "run", 1)
    w1.resume_scan_seconds = 3600.0
    assert w1.adopt() is None  # worker 0's heartbeat is fresh: it may still be training
    w1._next_scan = 0.0
    store.heartbeat(0, {"time": time.time() - 1000})  # …until its heartbeat is old
    got = w1.adopt()
    assert got["id"] == expected["id"] and got["resumed_at_step"] == 9
    assert w1.adopt() is None  # nothing else to adopt (and not looked again so soon)
    assert store.list_blobs("resume") == []
    rec, want = store.read_record(got["id"]), ref_store.read_record(expected["id"])
    assert rec["resumed"] == {"worker": 1, "step": 9}
    for field in ("parent", "key", "event", "worker", "mutation", "val_accuracy", "steps"):
        assert rec[field] == want[field], field
    a, b = flatten(store.read_params(got["id"])), flatten(ref_store.read_params(expected["id"]))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert sorted(m.id for m in store.population()) == sorted(m.id for m in ref_store.population())
    v = verdict(store, got["id"], w1.evaluate, 3, 4)
    assert v["verdict"] == REPRODUCED and v["weights_match"], v
    assert w1.children == 1


def test_a_finished_child_leaves_no_saved_state_and_gc_collects_leftovers(tmp_path):
    store, w0 = _worker(tmp_path / "run", 0)
    saves = []
    original = store.write_blob
    store.write_blob = lambda n, d: (saves.append(n), original(n, d))[1]
    w0.step()
    # 25 steps in chunks of 3 within epochs of 10: saved after 3, 6, 9, 10, 13, 16, 19, 20, 23
    assert sum("/state-" in n for n in saves) == 9
    assert store.list_blobs("resume") == []
    # A folder left by a maker that died before its first state, and one of a child published
    # meanwhile, are collected once their owner is dead; a live owner's is kept.
    store.write_blob("resume/w009-e000001/owner-000000.json", b'{"worker": 9}')
    store.write_blob("resume/w008-e000001/owner-000000.json", b'{"worker": 8}')
    assert resume.collect(store, live=lambda: {8}) == 1
    assert store.list_blobs("resume") == ["resume/w008-e000001/owner-000000.json"]


def test_resume_off_saves_nothing(tmp_path):
    store, w0 = _worker(tmp_path / "run", 0, dataclasses.replace(CFG, resume_interval_seconds=0))
    saves = []
    original = store.write_blob
    store.write_blob = lambda n, d: (saves.append(n), original(n, d))[1]
    w0.step()
    assert not w0.resumes() and saves == []


# -- the acceptance test: a real worker process SIGKILLed mid-child ----------------------------

_WORKER = textwrap.dedent(
    """
    import os, signal, sys
    from evojax_nas.store import local
    from evojax_nas.runner import claim_worker_id, worker_main

    url, die_at = sys.argv[1], int(sys.argv[2])
    if die_at:  # SIGKILL this process once its die_at-th saved state has landed
        original, calls = local.LocalStore.write_blob, [0]

        def write_blob(self, name, data):
            original(self, name, data)
            if "/state-" in name:
                calls[0] += 1
                if calls[0] == die_at:
                    os.kill(os.getpid(), signal.SIGKILL)

        local.LocalStore.write_blob = write_blob
    wid = claim_worker_id(local.LocalStore(url))
    print("worker", wid, "trained", worker_main(url, wid, 1, None), flush=True)
    """
)


def _run_worker(url, die_at, timeout=120):
    env = dict(os.environ, EVOJAX_NAS_XLA_CACHE="")
    return subprocess.run(
        [sys.executable, "-c", _WORKER, url, str(die_at)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_a_sigkilled_worker_process_child_is_finished_by_a_new_process(tmp_path, run_cli):
    """Worker 0 (a real process) is SIGKILLed after its 3rd saved state, mid-child; its
    supervisor marks it dead (as `evolve` does); worker 1 (a new process) adopts the child.
    The child equals the uninterrupted one bit for bit and `replay --lineage` reproduces it."""
    cfg = dataclasses.replace(
        EvolutionConfig(dataset="digits8x8", population=2, seed=9, steps=250, batch_size=50),
        resume_interval_seconds=1e-9,
        compile_cache="worker",
    )
    url = str(tmp_path / "run")
    store = open_store(url)
    store.write_config(cfg.to_dict())
    killed = _run_worker(url, die_at=3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert store.population() == []
    [child] = {n.split("/")[1] for n in store.list_blobs("resume")}
    assert child == "init-000-000000"
    store.heartbeat(0, {"stopped": time.time(), "reason": "died", "time": time.time()})
    done = _run_worker(url, die_at=0)
    assert done.returncode == 0 and "worker 1 trained 1" in done.stdout, done.stderr[-2000:]
    assert [m.id for m in store.population()] == [child]
    record = store.read_record(child)
    assert record["resumed"] == {"worker": 1, "step": 75} and record["worker"] == 0
    assert store.list_blobs("resume") == []

    # The same child trained uninterrupted, here in the test process.
    ref_store = open_store(str(tmp_path / "ref"))
    ref_store.write_config(cfg.to_dict())
    ref = Worker(ref_store, cfg, 0, _digits_evaluator(cfg), input_channels=1, num_classes=10)
    assert ref.step()["id"] == child
    a, b = flatten(store.read_params(child)), flatten(ref_store.read_params(child))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert record["val_accuracy"] == ref_store.read_record(child)["val_accuracy"]

    replay = run_cli("replay", url, "--lineage", child, timeout=300)
    assert replay.returncode == 0 and "reproduced" in replay.stdout, replay.stdout + replay.stderr


def _digits_evaluator(cfg):
    from evojax_nas.data import load_dataset
    from evojax_nas.evolution import training_evaluator

    return training_evaluator(load_dataset(cfg.dataset), cfg)

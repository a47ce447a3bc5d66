import dataclasses

import numpy as np

from evojax_nas.config import EvolutionConfig
from evojax_nas.evolution import Worker, training_evaluator
from evojax_nas.replay import replay
from evojax_nas.store import open_store
from evojax_nas.train import CompileCache
from tests.test_train import random_dataset


def tiny_run(tmp_path):
    data = random_dataset(n=100, hw=8, c=3, classes=4)
    cfg = dataclasses.replace(
        EvolutionConfig(),
        population=3,
        steps=4,
        eval_batch_size=50,
        dataset="random",
        seed=11,
        mutation_weights={"insert_convolution": 1.0, "identity": 1.0, "alter_learning_rate": 1.0},
    )
    store = open_store(str(tmp_path / "run"))
    store.write_config(cfg.to_dict())
    evaluate = training_evaluator(data, cfg, CompileCache())
    worker = Worker(store, cfg, 0, evaluate, 3, 4)
    while worker.children < 6:
        worker.step()
    return store, evaluate


def test_replay_reproduces_initial_and_child_bit_for_bit(tmp_path):
    store, evaluate = tiny_run(tmp_path)
    records = store.records()
    child = next(r for r in records if r["parent"] is not None)
    initial = next(r for r in records if r["parent"] is None)
    for r in (child, initial):
        out = replay(store, r["id"], evaluate, 3, 4)
        assert out["dna_matches"] and out["accuracy_matches"] and out["weights_match"], out
        assert out["matches"]


class TamperedKey:
    """A store whose records carry another event's key: replay must notice."""

    def __init__(self, store):
        self._store = store

    def __getattr__(self, name):
        return getattr(self._store, name)

    def read_record(self, ind_id):
        record = dict(self._store.read_record(ind_id))
        record["key"] = [int(x) ^ 1 for x in record["key"]]
        return record


def test_replay_detects_a_different_key(tmp_path):
    store, evaluate = tiny_run(tmp_path)
    child = next(r for r in store.records() if r["parent"] is not None)
    out = replay(TamperedKey(store), child["id"], evaluate, 3, 4)
    assert not out["matches"]
    assert not (out["dna_matches"] and out["weights_match"])
    assert np.isfinite(out["val_accuracy"])

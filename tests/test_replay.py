import json
import shutil

import numpy as np
import pytest

from evojax_nas.replay import replay

try:
    from tests.conftest import make_tiny_run
except ImportError:  # tests/ is not a package: pytest put it on sys.path itself.
    from conftest import make_tiny_run


@pytest.fixture
def tiny_run(random_dataset):
    """A factory of tiny in-process runs: tiny_run(tmp_path) -> (store, evaluate)."""
    return lambda tmp_path: _tiny_run(tmp_path, random_dataset)


def _tiny_run(tmp_path, random_dataset):
    return make_tiny_run(tmp_path / "run", random_dataset(n=100, hw=8, c=3, classes=4))


def test_replay_reproduces_initial_and_child_bit_for_bit(tmp_path, tiny_run):
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


def test_replay_detects_a_different_key(tmp_path, tiny_run):
    store, evaluate = tiny_run(tmp_path)
    child = next(r for r in store.records() if r["parent"] is not None)
    out = replay(TamperedKey(store), child["id"], evaluate, 3, 4)
    assert not out["matches"]
    assert not (out["dna_matches"] and out["weights_match"])
    assert np.isfinite(out["val_accuracy"])


# -- replay of a whole run or a lineage ---------------------------------------------------------


def _verdicts(store, evaluate, ids=None):
    from evojax_nas.replay import replay_many

    ids = ids if ids is not None else [r["id"] for r in store.records()]
    return {v["id"]: v for v in replay_many(store, ids, evaluate, 3, 4)}


def test_replay_all_reproduces_every_individual_and_names_tampering(tmp_path, tiny_run):
    from evojax_nas.replay import MISMATCH, REPRODUCED

    store, evaluate = tiny_run(tmp_path)
    verdicts = _verdicts(store, evaluate)
    assert len(verdicts) >= 6
    assert all(v["verdict"] == REPRODUCED for v in verdicts.values()), verdicts
    children = sorted(i for i, v in verdicts.items() if store.read_record(i)["parent"])
    ckpt_victim, record_victim = children[0], children[-1]
    root = tmp_path / "run" / "inds"  # a tampered checkpoint: another individual's weights
    shutil.rmtree(root / ckpt_victim / "ckpt")
    shutil.copytree(root / children[1] / "ckpt", root / ckpt_victim / "ckpt")
    record = store.read_record(record_victim)
    record["val_accuracy"] = 0.999
    (root / record_victim / "record.json").write_text(json.dumps(record))
    after = _verdicts(store, evaluate)
    assert after[ckpt_victim]["verdict"] == MISMATCH
    assert after[record_victim]["verdict"] == MISMATCH
    assert "accuracy" in after[record_victim]["detail"]
    assert {i for i, v in after.items() if v["verdict"] == MISMATCH} <= {
        ckpt_victim,
        record_victim,
    } | {i for i in verdicts if store.read_record(i)["parent"] == ckpt_victim}


def test_lineage_runs_from_an_initial_individual(tmp_path, tiny_run):
    from evojax_nas.replay import lineage

    store, evaluate = tiny_run(tmp_path)
    deepest = max(store.records(), key=lambda r: len(lineage(store, r["id"])))
    chain = lineage(store, deepest["id"])
    assert chain[-1] == deepest["id"] and chain[0].startswith("init-")
    for parent, child in zip(chain, chain[1:], strict=False):
        assert store.read_record(child)["parent"] == parent


def test_a_collected_parent_is_not_checkable_not_a_failure(tmp_path, tiny_run):
    from evojax_nas.replay import NOT_CHECKABLE

    store, evaluate = tiny_run(tmp_path)
    child = next(r for r in store.records() if r["parent"] is not None)
    parent = child["parent"]
    try:
        store.kill(parent)
    except Exception:
        pass  # already dead
    store.gc(0)
    v = _verdicts(store, evaluate, [child["id"]])[child["id"]]
    assert v["verdict"] == NOT_CHECKABLE and "collected" in v["detail"]


def test_replay_cli_all_and_lineage(tmp_path, monkeypatch, capsys, tiny_run, random_dataset):
    from evojax_nas import cli, data

    store, _ = tiny_run(tmp_path)
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: random_dataset(100, 8, 3, 4))
    assert cli.main(["replay", store.url, "--all"]) == 0
    out = capsys.readouterr().out
    assert "0 mismatched" in out and out.count("reproduced: bit for bit") >= 6
    last = max(r["id"] for r in store.records())
    (tmp_path / "run" / "inds" / last / "record.json").write_text(
        json.dumps(store.read_record(last) | {"val_accuracy": 0.5})
    )
    assert cli.main(["replay", store.url, "--lineage", last]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and f"mismatched: {last}" in out
    assert cli.main(["replay", store.url]) == 2


def test_a_mismatch_says_when_other_code_trained_the_individual(tmp_path, tiny_run):
    """Numbers agree only within one package code and JAX version: every record names them,
    and a mismatch on a record from other code (or from before records named it) says so."""
    from evojax_nas.programs import code_version
    from evojax_nas.replay import MISMATCH

    store, evaluate = tiny_run(tmp_path)
    ids = sorted(r["id"] for r in store.records() if r["parent"] is not None)
    assert all(store.read_record(i)["code"] == code_version() for i in ids)
    same, other, unnamed = ids[-3:]
    root = tmp_path / "run" / "inds"
    for ind_id, code in ((same, code_version()), (other, {**code_version(), "package": "0ld"})):
        record = store.read_record(ind_id) | {"val_accuracy": 0.999, "code": code}
        (root / ind_id / "record.json").write_text(json.dumps(record))
    record = store.read_record(unnamed) | {"val_accuracy": 0.999}
    del record["code"]
    (root / unnamed / "record.json").write_text(json.dumps(record))
    verdicts = _verdicts(store, evaluate, [same, other, unnamed])
    assert all(v["verdict"] == MISMATCH for v in verdicts.values())
    assert verdicts[same]["detail"] == "different validation accuracy"
    assert "trained by other code: package 0ld here " in verdicts[other]["detail"]
    assert "does not name the code" in verdicts[unnamed]["detail"]

"""A worker survives any single bad individual, bad meta file or transient storage failure.

Each hostile individual is published at fitness 1.0 so that it wins every tournament it is
drawn into: the worker must kill it (never abandon it forever) and go on producing children.
"""

import dataclasses
import errno
import logging
import os
import shutil
import uuid

import jax
import numpy as np
import pytest

from evojax_nas import dna as D
from evojax_nas.config import EvolutionConfig
from evojax_nas.evolution import CONTROL, KnownIndividuals, Worker, decide, event_key
from evojax_nas.model import init_variables
from evojax_nas.runner import claim_worker_id
from evojax_nas.store import RetryingStore, open_store
from evojax_nas.train import TrainResult

try:
    from tests.gcs_emulator import BUCKET, gcs_emulator  # noqa: F401
except ImportError:  # tests/ is not a package: pytest put it on sys.path itself.
    from gcs_emulator import BUCKET, gcs_emulator  # noqa: F401


def synthetic(dna, params, key):
    fit = min(0.9, 0.1 + 0.2 * len(dna.conv_edges()) + 0.01 * float(jax.random.uniform(key)))
    return TrainResult(params, fit, False, 1, 1.0, 1.0, 1, 1, {"train": 0.0})


def make_worker(tmp_path, population=4, evaluate=synthetic, wrap=None, **kw):
    store = open_store(str(tmp_path / "run"))
    c = dataclasses.replace(EvolutionConfig(population=population), **kw)
    store.write_config(c.to_dict())
    w = Worker(wrap(store) if wrap else store, c, 0, evaluate, input_channels=1, num_classes=10)
    return store, w


def hostile(store, ind_id, dna_dict, params):
    store.publish(ind_id, dna_dict, {"parent": None}, 1.0, params)


def conv_dna(depth_factor=2.0):
    d = D.to_dict(D.initial_dna(1, 10))
    d["edges"][0] |= {"kind": "conv", "depth_factor": depth_factor}
    return d


def good_params(dna_dict):
    return init_variables(D.from_dict(dna_dict), jax.random.PRNGKey(0))


def _int32(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x).astype(np.int32), tree)


CASES = {
    "wrong input_channels": lambda: (
        D.to_dict(D.initial_dna(3, 10)),
        good_params(D.to_dict(D.initial_dna(3, 10))),
    ),
    "wrong num_classes": lambda: (
        D.to_dict(D.initial_dna(1, 7)),
        good_params(D.to_dict(D.initial_dna(1, 7))),
    ),
    "int32 checkpoint of the right shape": lambda: (conv_dna(), _int32(good_params(conv_dna()))),
    "1e13 channels": lambda: (conv_dna(1e13), None),
    "checkpoint of another architecture": lambda: (conv_dna(), good_params(conv_dna(4.0))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_individual_is_killed_and_the_worker_goes_on(tmp_path, case):
    store, w = make_worker(tmp_path)
    for _ in range(6):
        w.step()
    dna_dict, params = CASES[case]()
    hostile(store, "bad", dna_dict, params)
    before = w.children
    for _ in range(25):
        w.step()  # must not raise
    assert "bad" not in {m.id for m in store.population()}
    assert w.children > before + 5
    assert not any(r.get("parent") == "bad" for r in store.records())


@pytest.mark.parametrize("gone", ["dna.json", "ckpt"])
def test_a_phantom_marker_is_killed_not_abandoned_forever(tmp_path, gone):
    store, w = make_worker(tmp_path)
    for _ in range(6):
        w.step()
    hostile(store, "phantom", conv_dna(), good_params(conv_dna()))
    path = tmp_path / "run" / "inds" / "phantom" / gone
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    outcomes = [w.step()["action"] for _ in range(25)]
    assert "phantom" not in {m.id for m in store.population()}
    assert outcomes.count("abandoned") <= 3, outcomes  # no livelock


def test_wrong_types_in_control_do_not_stop_the_worker(tmp_path, caplog):
    store, w = make_worker(tmp_path)
    store.write_meta(
        CONTROL, {"mutations_per_child": "many", "reset_at": [1], "mutations_until": "x"}
    )
    with caplog.at_level(logging.WARNING):
        for _ in range(12):
            w.step()
    assert w.children >= 8
    assert "wrong type" in caplog.text


class Flaky:
    """A store whose chosen method fails `times` times with `exc`, then works."""

    def __init__(self, store, method, exc, times):
        self._store, self._method, self._exc, self.left = store, method, exc, times

    def __getattr__(self, name):
        attr = getattr(self._store, name)
        if name != self._method:
            return attr

        def call(*args, **kw):
            if self.left > 0:
                self.left -= 1
                raise self._exc
            return attr(*args, **kw)

        return call


@pytest.mark.parametrize(
    "method,exc",
    [
        ("publish", OSError(errno.ENOSPC, "No space left on device")),
        ("population", ConnectionError("connection reset")),
        ("read_params", TimeoutError("frozen storage")),
    ],
)
def test_retrying_store_waits_out_an_outage_of_any_length(tmp_path, caplog, method, exc):
    waits = []
    store, w = make_worker(tmp_path)
    for _ in range(6):
        w.step()
    flaky = Flaky(store, method, exc, times=40)  # 40 doublings: far past any fixed deadline
    w.store = RetryingStore(flaky, sleep=waits.append)
    w.known = KnownIndividuals()  # else it never reads back the parents it made itself
    before = w.children
    with caplog.at_level(logging.WARNING):
        for _ in range(4):
            w.step()
    assert flaky.left == 0 and w.children > before
    assert len(waits) == 40 and max(waits) == 60.0
    assert "storage unavailable" in caplog.text and "waiting" in caplog.text


def test_a_full_disk_without_retries_abandons_the_event_only(tmp_path, monkeypatch):
    monkeypatch.setattr("evojax_nas.evolution.time.sleep", lambda s: None)
    store, w = make_worker(tmp_path)
    w.store = Flaky(store, "publish", OSError(errno.ENOSPC, "No space left on device"), 3)
    outcomes = [w.step()["action"] for _ in range(8)]
    assert outcomes[:3] == ["abandoned"] * 3 and w.children == 5


def test_a_stale_symlink_as_tmp_does_not_stop_the_worker(tmp_path):
    store, w = make_worker(tmp_path)
    w.step()
    tmp = tmp_path / "run" / "tmp"
    shutil.rmtree(tmp)
    os.symlink(tmp_path / "nowhere", tmp)
    os.symlink(tmp_path / "nowhere", tmp_path / "run" / "tmp-dangling")
    for _ in range(5):
        w.step()
    assert w.children == 6 and tmp.is_dir() and not tmp.is_symlink()
    assert not (tmp_path / "nowhere").exists()


def test_population_of_two_evolves_and_a_super_fit_individual_traps_it(tmp_path):
    """Paper §5: at population 2 each event pits the two; the worse dies, the better breeds.

    With a fitness for which every child is worse than its parent (a super-fit first winner),
    the winner wins every round and the population is trapped, as the paper argues."""
    births = iter(range(1, 10_000))

    def worse_children(dna, params, key):
        return TrainResult(params, 1.0 / next(births), False, 1, 1.0, 1.0, 1, 1, {"train": 0.0})

    store, w = make_worker(tmp_path, population=2, evaluate=worse_children)
    w.step(), w.step()  # two initial individuals; the first is the fitter
    champion = max(store.population(), key=lambda m: m.fitness).id
    for _ in range(20):
        out = w.step()
        assert out["action"] == "reproduce" and out["parent"] == champion
        assert len(store.population()) == 2
    assert w.children == 22
    assert champion in {m.id for m in store.population()}


def test_decide_at_population_two_pits_both(tmp_path):
    from evojax_nas.store import Member

    pair = [Member("a", 0.2, 1), Member("b", 0.7, 2)]
    c = EvolutionConfig(population=2)
    for e in range(20):
        d = decide(pair, event_key(0, 0, e), c)
        assert (d.kill, d.parent) == ("a", "b")


def test_claiming_a_worker_id_costs_constant_requests(tmp_path):
    store = open_store(str(tmp_path / "run"))
    ids = [claim_worker_id(store) for _ in range(60)]
    assert ids == list(range(60))
    before = store.requests
    assert claim_worker_id(store) == 60
    assert store.requests - before <= 6


def test_only_transient_failures_are_waited_out():
    from google.api_core import exceptions as gexc

    from evojax_nas.errors import ConcurrencyError, CorruptObjectError, NotFoundError
    from evojax_nas.store._retry import is_transient

    for exc in [
        gexc.RetryError("deadline of 120 s exceeded", None),
        gexc.ServiceUnavailable("503"),
        gexc.TooManyRequests("429"),
        OSError(errno.ENOSPC, "full"),
        OSError(errno.EIO, "stalled"),
        ConnectionError("reset"),
    ]:
        assert is_transient(exc), exc
    for exc in [
        gexc.Forbidden("403"),
        gexc.NotFound("404"),
        PermissionError(errno.EACCES, "denied"),
        NotADirectoryError(errno.ENOTDIR, "inds is a file"),
        ConcurrencyError("lost"),
        NotFoundError("gone"),
        CorruptObjectError("bad"),
        ValueError("bug"),
    ]:
        assert not is_transient(exc), exc


def test_a_phantom_on_gcs_is_killed_not_abandoned_forever(gcs_emulator):
    store = open_store(f"gs://{BUCKET}/{uuid.uuid4().hex}")
    c = EvolutionConfig(population=4)
    store.write_config(c.to_dict())
    w = Worker(store, c, 0, synthetic, input_channels=1, num_classes=10)
    for _ in range(6):
        w.step()
    hostile(store, "phantom", conv_dna(), good_params(conv_dna()))
    for blob in store._list("ind/phantom/ckpt/"):
        blob.delete()
    outcomes = [w.step()["action"] for _ in range(12)]
    assert "phantom" not in {m.id for m in store.population()}
    assert outcomes.count("abandoned") <= 3, outcomes


def test_a_worker_takes_the_parents_it_knows_from_memory_as_the_store_holds_them(tmp_path):
    """Individuals a worker published or loaded are not read again: the copy it keeps is the
    store's, bit for bit, and what it hands out is a copy."""
    store, w = make_worker(tmp_path, population=4)
    for _ in range(8):
        w.step()
    reads = []
    read_params = store.read_params
    store.read_params = lambda ind_id, **kw: reads.append(ind_id) or read_params(ind_id, **kw)
    hits = w.known.hits
    for _ in range(20):
        w.step()
    # One worker made every individual: it reads none back.
    reproduced = [r for r in store.records() if r.get("parent") and r["event"] >= 8]
    assert len(reproduced) >= 10 and reads == []
    assert w.known.hits - hits == len(reproduced)
    # A second worker reads an individual once, then knows it.
    other = Worker(store, w.cfg, 1, synthetic, input_channels=1, num_classes=10)
    for _ in range(20):
        other.step()
    theirs = [r for r in store.records() if r.get("parent") and r["worker"] == 1]
    assert reads and len(reads) == len(set(reads)) and len(theirs) >= 10
    assert len(reads) + other.known.hits == len(theirs)
    for ind_id in list(w.known._items) + list(other.known._items):
        for known in (w.known, other.known):
            if known.get(ind_id) is None:
                continue
            dna, params = known.get(ind_id)
            assert D.to_dict(dna) == store.read_dna(ind_id)
            leaves = jax.tree_util.tree_leaves(params)
            assert leaves and all(
                np.array_equal(a, b) and a.dtype == b.dtype
                for a, b in zip(leaves, jax.tree_util.tree_leaves(read_params(ind_id)), strict=True)
            )
            leaves[0][...] = 7.0  # the caller's copy, not the worker's
            assert not np.array_equal(jax.tree_util.tree_leaves(known.get(ind_id)[1])[0], leaves[0])


def test_known_individuals_are_bounded_by_the_bytes_of_their_weights():
    from evojax_nas.evolution import variable_bytes

    dna = D.from_dict(conv_dna())
    size = variable_bytes(dna)
    known = KnownIndividuals(max_bytes=3 * size)
    for i in range(4):
        known.put(f"i{i}", dna, good_params(conv_dna()))
    assert len(known) == 3 and known.get("i0") is None  # the least recently used went
    known.get("i1")
    known.put("i4", dna, good_params(conv_dna()))
    assert known.get("i1") is not None and known.get("i2") is None
    too_big = KnownIndividuals(max_bytes=size - 1)
    too_big.put("x", dna, good_params(conv_dna()))
    assert len(too_big) == 0
    few = KnownIndividuals(max_items=2)  # weightless individuals count against the number
    for i in range(3):
        few.put(f"n{i}", dna, None)
    assert len(few) == 2 and few.get("n0") is None and few.get("n2") == (dna, None)

"""Conformance tests of the population store, run against both backends.

`local`: a temporary directory. `gcs`: the fake-gcs-server emulator started on 127.0.0.1 by
the session fixture in tests/gcs_emulator.py. Trial counts are in the test names/docstrings.
"""

import json
import multiprocessing
import os
import random
import shutil
import signal
import tempfile
import time
import uuid

import numpy as np
import pytest

from evojax_nas.errors import (
    CheckpointError,
    ConcurrencyError,
    CorruptObjectError,
    NotFoundError,
    StoreError,
)
from evojax_nas.store import GCSStore, LocalStore, Member, Store, _checkpoint, open_store

try:
    from tests.conftest import load_script
    from tests.gcs_emulator import BUCKET, gcs_emulator  # noqa: F401
except ImportError:  # tests/ is not a package: pytest put it on sys.path itself.
    from conftest import load_script
    from gcs_emulator import BUCKET, gcs_emulator  # noqa: F401

DNA = {"vertices": [{"id": 0, "type": "linear"}], "edges": [], "learning_rate": 0.1}


def _params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "conv0": {"kernel": rng.normal(size=(3, 3, 3, 8)).astype(np.float32)},
        "bn0": {"scale": np.ones(8, np.float32), "count": np.arange(3, dtype=np.int32)},
        "out": {"kernel": rng.normal(size=(8, 10)).astype(np.float32)},
    }


@pytest.fixture(params=["local", "gcs"])
def url(request, tmp_path) -> str:
    """A fresh, empty store address on each backend."""
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("gcs_emulator")
    return f"gs://{BUCKET}/{uuid.uuid4().hex}"


@pytest.fixture
def store(url) -> Store:
    return open_store(url)


def _raw_write(store: Store, rel: str, data: bytes) -> None:
    """Writes bytes behind the store's back (rel uses the local layout's names)."""
    if isinstance(store, LocalStore):
        path = os.path.join(store.root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    else:
        rel = rel.replace("inds/", "ind/", 1).replace("alive/", "pop/", 1)
        store._bucket.blob(store._key(rel)).upload_from_string(data)


def _ckpt_files(store: Store, ind_id: str) -> list[str]:
    """Relative names (local layout) of an individual's checkpoint files."""
    if isinstance(store, LocalStore):
        root = os.path.join(store.root, "inds", ind_id, "ckpt")
        return [
            os.path.relpath(os.path.join(d, f), store.root)
            for d, _, fs in os.walk(root)
            for f in fs
        ]
    return ["inds" + b.name[len(store._key("ind")) :] for b in store._list(f"ind/{ind_id}/ckpt/")]


def _publish(store: Store, ind_id: str, fitness: float = 0.5, params=None, **record) -> None:
    store.publish(ind_id, DNA, {"parent": None, **record}, fitness, params)


# -- basic operations -------------------------------------------------------------------------


def test_open_store_picks_backend(url):
    store = open_store(url)
    assert isinstance(store, GCSStore if url.startswith("gs://") else LocalStore)
    assert store.url.rstrip("/") == (url if url.startswith("gs://") else os.path.abspath(url))


def test_config_is_create_only(store):
    with pytest.raises(NotFoundError, match="config.json"):
        store.read_config()
    assert store.write_config({"population": 10, "seed": 1})
    assert not store.write_config({"population": 99})
    assert open_store(store.url).read_config() == {"population": 10, "seed": 1}


def test_publish_then_read_back(store):
    params = _params()
    store.publish("w000-e000001", DNA, {"parent": None, "flops": 12.5}, 0.25, params)
    _publish(store, "w000-e000002", fitness=1.0)
    [a, b] = open_store(store.url).population()
    assert (a.id, a.fitness, b.id, b.fitness) == ("w000-e000001", 0.25, "w000-e000002", 1.0)
    assert isinstance(a, Member) and 0 < a.birth <= b.birth <= time.time_ns()
    assert store.read_dna(a.id) == DNA
    assert store.read_record(a.id) == {"parent": None, "flops": 12.5, "id": a.id}
    got = store.read_params(a.id)
    assert got.keys() == params.keys()
    for k in params:
        for n in params[k]:
            np.testing.assert_array_equal(got[k][n], params[k][n])
            assert got[k][n].dtype == params[k][n].dtype
    assert store.read_params(b.id) is None


def test_publish_existing_id_is_a_concurrency_error(store):
    _publish(store, "x1")
    with pytest.raises(ConcurrencyError, match="x1"):
        _publish(store, "x1", fitness=0.9)
    assert [m.fitness for m in store.population()] == [0.5]


def test_kill(store):
    for i in range(3):
        _publish(store, f"k{i}", params=_params(i))
    store.kill("k1")
    assert [m.id for m in store.population()] == ["k0", "k2"]
    other = open_store(store.url)  # Cold name cache: must find the marker itself.
    with pytest.raises(ConcurrencyError):
        other.kill("k1")
    with pytest.raises(ConcurrencyError):
        store.kill("k1")
    with pytest.raises(NotFoundError):
        other.kill("never-born")
    assert store.read_dna("k1") == DNA and store.read_record("k1")["id"] == "k1"
    assert store.read_params("k1")["out"]["kernel"].shape == (8, 10)
    other.kill("k2")
    assert [m.id for m in store.population()] == ["k0"]


def test_individual_ids_list_every_published_individual_without_reading_records(store):
    """Alive, killed and garbage-collected alike, as `records` has them; the listings cost a
    few requests however many individuals there are (records: at least one each)."""
    for i in range(6):
        _publish(store, f"n{i}", params=_params(i) if i < 2 else None)
    store.kill("n0")
    store.kill("n3")
    store.gc(grace_seconds=0.0)
    assert store.individual_ids() == [f"n{i}" for i in range(6)]
    assert store.individual_ids() == [r["id"] for r in store.records()]
    before = store.requests
    store.individual_ids()
    listing = store.requests - before
    before = store.requests
    store.records()
    assert listing < 6 <= store.requests - before


def test_gc_removes_dead_checkpoints_after_grace_and_keeps_records(store):
    """3 individuals, 2 killed; gc before and after a 1 s grace period, then again."""
    for i in range(3):
        _publish(store, f"g{i}", fitness=0.1 * i, params=_params(i))
    store.kill("g0")
    store.kill("g2")
    assert store.gc(grace_seconds=1.0) == 0
    assert store.read_params("g0") is not None
    time.sleep(1.1)
    assert store.gc(grace_seconds=1.0) == 2
    assert store.gc(grace_seconds=0.0) == 0
    for dead in ("g0", "g2"):
        with pytest.raises(NotFoundError, match="garbage-collected"):
            store.read_params(dead)
        assert store.read_dna(dead) == DNA
        assert _ckpt_files(store, dead) == []
    assert store.read_params("g1")["out"]["kernel"].shape == (8, 10)
    recs = store.records()
    assert [(r["id"], r["alive"]) for r in recs] == [("g0", False), ("g1", True), ("g2", False)]
    assert all(r["parent"] is None for r in recs)
    with pytest.raises(ConcurrencyError):
        store.kill("g0")  # Still exclusive after collection.


def test_meta_compare_and_swap(store):
    assert store.read_meta("adjust") == (None, None)
    store.write_meta("adjust", {"rate": 1})
    with pytest.raises(ConcurrencyError):
        store.write_meta("adjust", {"rate": 2})
    value, version = store.read_meta("adjust")
    assert value == {"rate": 1}
    store.write_meta("adjust", {"rate": 3}, expected_version=version)
    with pytest.raises(ConcurrencyError):
        store.write_meta("adjust", {"rate": 4}, expected_version=version)
    for _ in range(12):  # Past the local backend's pruning of old versions.
        _, v = store.read_meta("adjust")
        store.write_meta("adjust", {"rate": 5}, expected_version=v)
    with pytest.raises(ConcurrencyError):
        store.write_meta("adjust", {"rate": 6}, expected_version=version)
    assert store.read_meta("adjust")[0] == {"rate": 5}


def test_heartbeats(store):
    store.heartbeat(3, {"parent": "a", "event": 1, "time": 1.5})
    store.heartbeat(3, {"parent": "b", "event": 2, "time": 2.5})
    store.heartbeat(0, {"event": 0})
    assert store.workers() == [
        {"event": 0, "worker": 0},
        {"parent": "b", "event": 2, "time": 2.5, "worker": 3},
    ]


# -- hostile input and corruption -------------------------------------------------------------

BAD_IDS = ["../x", "..", "a/b", "", "x" * 81, ".hidden", "-x", "a..b", "a\x00b", "a@0.5@1", 7, None]


@pytest.mark.parametrize("bad", BAD_IDS, ids=[repr(b)[:12] for b in BAD_IDS])
def test_hostile_names_are_rejected(store, bad):
    """12 hostile IDs x 7 operations each raise StoreError and write nothing."""
    calls = [
        lambda: _publish(store, bad),
        lambda: store.kill(bad),
        lambda: store.read_dna(bad),
        lambda: store.read_record(bad),
        lambda: store.read_params(bad),
        lambda: store.read_meta(bad),
        lambda: store.write_meta(bad, {}),
    ]
    for call in calls:
        with pytest.raises(StoreError, match="invalid"):
            call()
    assert store.population() == []


@pytest.mark.parametrize(
    "fitness, record, dna",
    [
        (float("nan"), {}, DNA),
        (1.5, {}, DNA),
        (True, {}, DNA),
        ("0.5", {}, DNA),
        (0.5, {"flops": float("inf")}, DNA),
        (0.5, {"id": "someone-else"}, DNA),
        (0.5, {"x": object()}, DNA),
        (0.5, {"x": 1 << 70}, DNA),
        (0.5, {}, {"big": "x" * (1 << 21)}),
        (0.5, {}, ["not", "a", "dict"]),
    ],
)
def test_invalid_publish_arguments_are_rejected(store, fitness, record, dna):
    """10 kinds of invalid arguments; nothing becomes visible."""
    with pytest.raises(StoreError):
        store.publish("ok-id", dna, record, fitness, None)
    assert store.population() == []


HOSTILE_JSON = {
    "truncated": b'{"parent": "a", "fl',
    "not-json": b"\x80\x81garbage",
    "array": b"[1, 2, 3]",
    "nan": b'{"flops": NaN}',
    "huge-float": b'{"flops": 1e999}',
    "huge-int": b'{"flops": ' + b"9" * 40 + b"}",
    "giant-int": b'{"flops": ' + b"9" * 5000 + b"}",
    "deep": b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "oversized": b'{"a": "' + b"x" * (1 << 21) + b'"}',
    "wrong-id": b'{"id": "../etc/passwd"}',
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_JSON))
def test_hostile_record_gives_clean_error_naming_it(store, kind):
    """10 kinds of hostile/corrupt record and DNA objects; the rest stays usable."""
    _publish(store, "victim")
    _publish(store, "bystander", fitness=0.7)
    _raw_write(store, "inds/victim/record.json", HOSTILE_JSON[kind])
    _raw_write(store, "inds/victim/dna.json", HOSTILE_JSON[kind])
    reads = [store.read_record] + ([store.read_dna] if kind != "wrong-id" else [])
    for read in reads:  # A DNA may hold any "id"; a record must hold its own.
        with pytest.raises(CorruptObjectError, match="victim"):
            read("victim")
    assert {m.id for m in store.population()} == {"victim", "bystander"}
    assert store.read_record("bystander")["id"] == "bystander"
    recs = {r["id"]: r for r in store.records()}
    assert "victim" in recs["victim"]["error"] and "error" not in recs["bystander"]
    store.kill("victim")


def test_hostile_marker_names_are_skipped(store):
    """5 malformed population markers are skipped; valid individuals still list."""
    _publish(store, "good", fitness=0.3)
    for name in ["x@nan@1", "y@2.0@1", "z@0.5@-1", "w@0.5", "v@0.5@" + "9" * 30]:
        _raw_write(store, f"alive/{name}", b"")
    assert [m.id for m in store.population()] == ["good"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's loop
@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete-one"])
def test_corrupt_checkpoint_gives_checkpoint_error(store, damage):
    """3 kinds of checkpoint damage; the error names the individual; others stay readable."""
    _publish(store, "hurt", params=_params(1))
    _publish(store, "fine", params=_params(2))
    files = sorted(_ckpt_files(store, "hurt"))
    assert files
    for rel in files:
        if damage == "delete-one" and "manifest" in rel:
            if isinstance(store, LocalStore):
                os.unlink(os.path.join(store.root, rel))
            else:
                store._delete(rel.replace("inds/", "ind/", 1))
        elif damage != "delete-one":
            _raw_write(store, rel, b"" if damage == "truncate" else os.urandom(64))
    with pytest.raises(CheckpointError, match="hurt"):
        store.read_params("hurt")
    np.testing.assert_array_equal(
        store.read_params("fine")["out"]["kernel"], _params(2)["out"]["kernel"]
    )


def test_gcs_records_read_concurrently_equal_records_read_one_by_one(gcs_emulator):
    """`records()` reads 8 at a time (scripts/bench_store_records.py, tiny): the same records,
    and simulated round trips of 5 ms overlap instead of adding up. Overlap is counted (reads
    in flight at once), not timed: on a loaded machine a wall-clock ratio is noise."""
    import threading

    script = load_script("bench_store_records.py")
    store = open_store(f"gs://{BUCKET}/{uuid.uuid4().hex}")
    script.fill(store, 23)
    res = script.bench(store, repeats=2, latency_ms=5.0)
    assert res["same_records"] and res["records"] == 23 and res["readers"] == 8
    assert [r["alive"] for r in store.records()].count(False) == 3  # r0, r10, r20 killed
    assert min(res["seconds"]["1"]) >= 23 * 0.005  # one by one: every wait adds up

    get, lock, flight = store._get, threading.Lock(), {"now": 0, "most": 0}

    def counted_get(rel: str) -> bytes:
        with lock:
            flight["now"] += 1
            flight["most"] = max(flight["most"], flight["now"])
        try:
            return get(rel)  # the bench's 5 ms wait, then the read
        finally:
            with lock:
                flight["now"] -= 1

    store._get = counted_get
    seen, records = {}, {}
    for readers in (1, 8):
        store.record_readers, flight["most"] = readers, 0
        records[readers] = store.records()
        seen[readers] = flight["most"]
    assert records[1] == records[8] and seen[1] == 1 and seen[8] > 1, seen


def test_gcs_checkpoint_with_traversal_name_is_refused(gcs_emulator):
    """An object named ckpt/../../x in the bucket must not be written outside a temp dir."""
    store = open_store(f"gs://{BUCKET}/{uuid.uuid4().hex}")
    _publish(store, "evil", params=_params())
    store._bucket.blob(store._key("ind/evil/ckpt/../../../../tmp/pwn")).upload_from_string(b"x")
    with pytest.raises(CheckpointError, match="hostile"):
        store.read_params("evil")
    assert not os.path.exists("/tmp/pwn")


# -- cost of selection ------------------------------------------------------------------------


def _inject_population(store: Store, n: int) -> None:
    """Creates `n` live markers directly (their data is not needed to count listing cost)."""
    names = [f"p{i:05d}@{(i % 97) / 97!r}@{1000 + i}" for i in range(n)]
    if isinstance(store, LocalStore):
        for name in names:
            open(os.path.join(store.root, "alive", name), "w").close()
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda name: _raw_write(store, f"alive/{name}", b""), names))


@pytest.mark.parametrize("size", [10, 1000])
def test_selection_costs_constant_requests_at_10_and_1000_individuals(store, size):
    """List, choose a pair, kill the worse: the same request count at 10 and 1,000."""
    _inject_population(store, size)
    worker = open_store(store.url)  # A fresh worker: cold caches.
    rng = random.Random(size)
    for trial in range(5):
        before = worker.requests
        members = worker.population()
        assert len(members) == size - trial
        a, b = rng.sample(members, 2)
        worker.kill(min(a, b, key=lambda m: m.fitness).id)
        # One listing page + the kill (GCS: create the dead marker + delete the alive one).
        assert worker.requests - before == (2 if isinstance(worker, LocalStore) else 3)


# -- concurrency and crashes (separate processes) ---------------------------------------------


def _mp():
    """A forkserver context: forking a parent that runs JAX/XLA threads is unsafe."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["orbax.checkpoint", "evojax_nas.store.gcs", __name__])
    return ctx


def _child_store(url: str) -> Store:
    """Opens `url` in a child; the forkserver may predate the emulator's environment variable."""
    host, _, url = url.partition("|")
    if host:
        os.environ["STORAGE_EMULATOR_HOST"] = host
    return open_store(url)


def _child_url(store: Store) -> str:
    return f"{os.environ.get('STORAGE_EMULATOR_HOST', '')}|{store.url}"


def _killer(url: str, ids: list[str], seed: int, start, out) -> None:
    store = _child_store(url)
    store.population()  # Warm the name cache so that the kills race tightly.
    ids = list(ids)
    random.Random(seed).shuffle(ids)
    start.wait()
    won, lost = [], 0
    for ind_id in ids:
        try:
            store.kill(ind_id)
            won.append(ind_id)
        except ConcurrencyError:
            lost += 1
    out.put((won, lost))


def test_kill_is_exclusive_8_processes_race_on_40_individuals(store):
    """8 processes each try to kill the same 40 individuals (320 kill attempts)."""
    ids = [f"r{i:03d}" for i in range(40)]
    for ind_id in ids:
        _publish(store, ind_id)
    ctx = _mp()
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_killer, args=(_child_url(store), ids, s, start, out)) for s in range(8)
    ]
    for p in procs:
        p.start()
    time.sleep(0.5)
    start.set()
    results = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    won = [i for w, _ in results for i in w]
    assert sorted(won) == ids  # Each killed exactly once...
    assert sum(lost for _, lost in results) == 7 * len(ids)  # ...and every loser was told.
    assert store.population() == []


def _publisher(url: str, n: int, start) -> None:
    store = _child_store(url)
    start.wait()
    for i in range(n):
        store.publish(f"b{i:03d}", DNA, {"parent": None, "i": i}, 0.5, _params(i))


def test_birth_is_atomic_reader_polls_during_30_publications(store):
    """A reader polls while another process publishes 30 individuals with weights: every
    individual the listing shows is complete (DNA, record and checkpoint readable)."""
    ctx = _mp()
    start = ctx.Event()
    proc = ctx.Process(target=_publisher, args=(_child_url(store), 30, start))
    proc.start()
    start.set()
    seen = set()
    while len(seen) < 30:
        for m in store.population():
            if m.id not in seen:
                assert store.read_dna(m.id) == DNA
                assert store.read_record(m.id)["i"] == int(m.id[1:])
                assert store.read_params(m.id)["out"]["kernel"].shape == (8, 10)
                seen.add(m.id)
        assert proc.is_alive() or proc.exitcode == 0
    proc.join(timeout=30)
    assert proc.exitcode == 0


def _churn(url: str, tag: str, ready) -> None:
    """Publishes and kills forever, until SIGKILLed."""
    store = _child_store(url)
    store.population()  # Warm up the client and orbax so that the kill lands in the loop.
    with tempfile.TemporaryDirectory() as tmp:
        _checkpoint.save(_params(), os.path.join(tmp, "ckpt"))
    ready.set()
    for i in range(10**6):
        store.publish(f"{tag}-{i}", DNA, {"parent": None}, 0.5, _params(i))
        if i:
            store.kill(f"{tag}-{i - 1}")


def test_sigkill_during_publish_and_kill_12_trials(store):
    """12 trials: a process publishing/killing in a loop is SIGKILLed at a random moment;
    afterwards no partial individual is visible, nothing is corrupt, the store works on."""
    ctx = _mp()
    rng = random.Random(0)
    for trial in range(12):
        ready = ctx.Event()
        proc = ctx.Process(target=_churn, args=(_child_url(store), f"t{trial}", ready))
        proc.start()
        assert ready.wait(timeout=60)
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    alive = store.population()
    assert alive, "no individual was ever published"
    for m in alive:
        assert store.read_dna(m.id) == DNA
        assert store.read_params(m.id)["out"]["kernel"].shape == (8, 10)
    recs = store.records()
    assert all("error" not in r for r in recs)
    for m in alive:  # Killing works; a GCS zombie (killer died between writes) is repaired.
        try:
            store.kill(m.id)
        except ConcurrencyError:
            assert not {r["id"]: r for r in recs}[m.id]["alive"]
    assert store.population() == []
    assert store.gc(grace_seconds=0.0) == len(recs)
    _publish(store, "after-crashes")
    assert [m.id for m in store.population()] == ["after-crashes"]


# -- hardening: symlinks, special files, bounds, types, leaks ---------------------------------


def _outside(tmp_path) -> str:
    """A directory outside the store holding a file that must survive anything the store does."""
    out = tmp_path / "outside"
    (out / "ckpt").mkdir(parents=True)
    (out / "ckpt" / "precious").write_text("keep")
    (out / "precious").write_text("keep")
    old = time.time() - 10_000
    for p in (out / "precious", out / "ckpt" / "precious", out / "ckpt", out):
        os.utime(p, (old, old))
    return str(out)


def _outside_intact(out: str) -> bool:
    return all(os.path.isfile(os.path.join(out, *p)) for p in (("precious",), ("ckpt", "precious")))


def test_local_gc_never_deletes_through_a_symlinked_individual(tmp_path):
    store = LocalStore(str(tmp_path / "s"))
    out = _outside(tmp_path)
    _publish(store, "a", params=_params())
    store.kill("a")
    shutil.rmtree(os.path.join(store.root, "inds", "a"))
    os.symlink(out, os.path.join(store.root, "inds", "a"))
    store.gc(0)
    assert _outside_intact(out)
    with pytest.raises(StoreError):  # and reads never follow it either
        store.read_record("a")


def test_local_gc_never_deletes_through_a_symlinked_tmp(tmp_path):
    store = LocalStore(str(tmp_path / "s"))
    out = _outside(tmp_path)
    shutil.rmtree(os.path.join(store.root, "tmp"))
    os.symlink(out, os.path.join(store.root, "tmp"))
    store.gc(0)
    assert _outside_intact(out)
    _publish(store, "b")  # publishing goes on in a fresh tmp/
    assert [m.id for m in store.population()] == ["b"]


def test_local_reads_never_follow_a_symlinked_file(tmp_path):
    store = LocalStore(str(tmp_path / "s"))
    _publish(store, "a")
    secret = tmp_path / "secret.json"
    secret.write_text('{"parent": null, "stolen": true}')
    rec = os.path.join(store.root, "inds", "a", "record.json")
    os.unlink(rec)
    os.symlink(secret, rec)
    with pytest.raises(CorruptObjectError, match="symlink"):
        store.read_record("a")
    assert "error" in {r["id"]: r for r in store.records()}["a"]


def test_local_meta_writer_delayed_past_many_versions_cannot_win_stale(tmp_path):
    """A compare-and-swap that lists, then stalls while 10 others write, must not land.

    Deleting superseded versions freed their names, so the stalled writer's create-only
    file succeeded under an old version number and its update vanished without an error.
    """
    store = LocalStore(str(tmp_path / "s"))
    store.write_meta("m", {"n": 0})
    _, stale = store.read_meta("m")
    create = store._create_file

    def stalled(path, data):
        store._create_file = create
        for _ in range(10):  # everyone else moves on meanwhile
            value, version = store.read_meta("m")
            store.write_meta("m", {"n": value["n"] + 1}, expected_version=version)
        return create(path, data)

    store._create_file = stalled
    with pytest.raises(ConcurrencyError):
        store.write_meta("m", {"n": -1}, expected_version=stale)
    assert store.read_meta("m")[0] == {"n": 10}
    store.update_meta("m", lambda v: {"n": v["n"] + 1})
    assert store.read_meta("m") == ({"n": 11}, 12)


def test_local_meta_tombstones_are_emptied_then_deleted_a_day_later(tmp_path):
    store = LocalStore(str(tmp_path / "s"))
    for i in range(12):
        store.update_meta("m", lambda v, i=i: {"n": i})
    folder = os.path.join(store.root, "meta", "m")
    sizes = {int(n[:-5]): os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)}
    assert sorted(sizes) == list(range(1, 13))
    assert sorted(v for v, size in sizes.items() if size == 0) == [1, 2, 3]
    day_ago = time.time() - 2 * 86_400
    for v in (1, 2):
        os.utime(os.path.join(folder, f"{v:012d}.json"), (day_ago, day_ago))
    store.update_meta("m", lambda v: {"n": 12})
    left = sorted(int(n[:-5]) for n in os.listdir(folder))
    assert left == list(range(3, 14))
    assert store.read_meta("m") == ({"n": 12}, 13)


def test_local_meta_reader_lists_again_when_its_version_was_just_retired(tmp_path):
    store = LocalStore(str(tmp_path / "s"))
    for i in range(3):
        store.update_meta("m", lambda v, i=i: {"n": i})
    listing = store._meta_versions
    calls = []

    def stale_listing(name):
        calls.append(name)
        return [1] if len(calls) == 1 else listing(name)

    open(os.path.join(store.root, "meta", "m", f"{1:012d}.json"), "w").close()  # retired
    store._meta_versions = stale_listing
    assert store.read_meta("m") == ({"n": 2}, 3)
    assert len(calls) == 2


@pytest.mark.parametrize("what", ["record.json", "dna.json", "heartbeat", "meta"])
def test_local_fifo_in_place_of_a_file_never_hangs(tmp_path, what):
    """A FIFO opened blocking would hang status/report/replay forever; it must be refused."""
    store = LocalStore(str(tmp_path / "s"))
    _publish(store, "a")
    store.heartbeat(0, {"time": 1.0})
    store.write_meta("control", {"x": 1})
    path = {
        "record.json": ("inds", "a", "record.json"),
        "dna.json": ("inds", "a", "dna.json"),
        "heartbeat": ("workers", "0.json"),
        "meta": ("meta", "control", f"{1:012d}.json"),
    }[what]
    full = os.path.join(store.root, *path)
    os.unlink(full)
    os.mkfifo(full)
    if what == "heartbeat":
        assert store.workers() == []
    elif what == "meta":
        with pytest.raises(CorruptObjectError, match="regular file"):
            store.read_meta("control")
    else:
        with pytest.raises(CorruptObjectError, match="regular file"):
            (store.read_record if what == "record.json" else store.read_dna)("a")
        assert len(store.records()) == 1


def test_local_checkpoint_with_a_fifo_or_symlink_is_refused(tmp_path):
    store = LocalStore(str(tmp_path / "s"))
    _publish(store, "a", params=_params())
    _publish(store, "b", params=_params())
    ckpt = os.path.join(store.root, "inds", "a", "ckpt")
    os.mkfifo(os.path.join(ckpt, "fifo"))
    with pytest.raises(CheckpointError, match="not a regular file"):
        store.read_params("a")
    shutil.rmtree(os.path.join(store.root, "inds", "b", "ckpt"))
    os.symlink(ckpt, os.path.join(store.root, "inds", "b", "ckpt"))
    with pytest.raises(CheckpointError, match="symlink"):
        store.read_params("b")


def test_checkpoint_bigger_than_its_bound_is_refused_before_loading(store):
    """The worker passes what the DNA implies; a bigger checkpoint is refused unread."""
    _publish(store, "big", params=_params())
    nbytes = sum(v.nbytes for m in _params().values() for v in m.values())
    assert store.read_params("big", max_bytes=nbytes)["out"]["kernel"].shape == (8, 10)
    with pytest.raises(CheckpointError, match="big"):
        store.read_params("big", max_bytes=nbytes // 2)


def test_local_sparse_checkpoint_file_is_refused_by_size(tmp_path):
    """A 1.2 GB sparse file costs no disk but must not be loaded."""
    store = LocalStore(str(tmp_path / "s"))
    _publish(store, "a", params=_params())
    with open(os.path.join(store.root, "inds", "a", "ckpt", "huge"), "wb") as f:
        f.truncate(1_200_000_000)
    with pytest.raises(CheckpointError, match="bytes"):
        store.read_params("a", max_bytes=100_000)


@pytest.mark.parametrize(
    "field,value",
    [("val_accuracy", "high"), ("born", [1]), ("parent", 7), ("key", ["a"]), ("worker", True)],
)
def test_wrong_typed_record_gives_one_clear_error(store, field, value):
    _publish(store, "a")
    _raw_write(store, "inds/a/record.json", json.dumps({"parent": None, field: value}).encode())
    with pytest.raises(CorruptObjectError, match=field):
        store.read_record("a")
    assert field in {r["id"]: r for r in store.records()}["a"]["error"]


def test_wrong_typed_heartbeat_is_skipped(store):
    store.heartbeat(0, {"time": 1.0})
    store.heartbeat(1, {"time": 2.0})
    _raw_write(store, "workers/1.json", b'{"worker": "one", "time": "now"}')
    assert [w["worker"] for w in store.workers()] == [0]


def test_workers_lists_only_recent_heartbeats(store):
    store.heartbeat(0, {"time": time.time()})
    assert [w["worker"] for w in store.workers(recent_seconds=300)] == [0]
    if isinstance(store, LocalStore):
        old = time.time() - 1000
        os.utime(os.path.join(store.root, "workers", "0.json"), (old, old))
        before = store.requests
        assert store.workers(recent_seconds=300) == []
        assert store.requests - before == 1  # the listing only: no read of an old heartbeat


def test_gc_collects_interrupted_publications_and_phantoms(store, monkeypatch):
    """A claimed ID without a marker, and a marker without its DNA, are collected."""
    from evojax_nas.store import _gcs_gc, local

    monkeypatch.setattr(local, "_CLAIM_GRACE", 0.0)
    monkeypatch.setattr(_gcs_gc, "_CLAIM_GRACE", 0.0)
    _publish(store, "interrupted", params=_params())
    _publish(store, "phantom", params=_params())
    _publish(store, "healthy", params=_params())
    if isinstance(store, LocalStore):  # as if the publisher died before creating the marker
        [name] = [n for n in os.listdir(os.path.join(store.root, "alive")) if "interr" in n]
        os.unlink(os.path.join(store.root, "alive", name))
        os.unlink(os.path.join(store.root, "inds", "phantom", "dna.json"))
    else:
        store._delete(f"pop/{store._names['interrupted']}")
        store._delete("ind/phantom/dna.json")
    store._names.clear()
    time.sleep(0.01)
    assert store.gc(0) == 2
    assert [m.id for m in store.population()] == ["healthy"]
    assert [r["id"] for r in store.records()] == ["healthy", "phantom"]
    if isinstance(store, LocalStore):
        assert sorted(os.listdir(os.path.join(store.root, "inds"))) == ["healthy", "phantom"]
    else:
        assert not store._list("ind/interrupted/")


def test_local_records_never_double_count_while_others_kill(tmp_path):
    """200 polls of records() while a thread kills 100 individuals: each ID listed once."""
    import threading

    store = LocalStore(str(tmp_path / "s"))
    for i in range(100):
        _publish(store, f"i{i:03d}")
    killer = LocalStore(store.root)
    done = threading.Event()

    def kill_all():
        for i in range(100):
            killer.kill(f"i{i:03d}")
            if i % 2:
                killer.gc(0)
        done.set()

    t = threading.Thread(target=kill_all)
    t.start()
    try:
        polls = 0
        while not done.is_set() or polls < 5:
            ids = [r["id"] for r in store.records()]
            assert len(ids) == len(set(ids)) == 100
            polls += 1
    finally:
        t.join()
    assert not any(r["alive"] for r in store.records())


def test_blobs_list_create_only_and_delete(store):
    """Blobs (compiled programs, in-flight children's state) on both backends: create-only,
    listed under `<dir>` or `<dir>/<key>`, deleted one by one; names are validated."""
    store.write_blob("resume/w000-e000001/child.json", b"{}")
    store.write_blob("resume/w000-e000001/state-1.npz", b"abc")
    store.write_blob("resume/w001-e000002/child.json", b"{}")
    store.write_blob("programs/k1/meta.json", b"{}")
    with pytest.raises(ConcurrencyError):
        store.write_blob("resume/w000-e000001/child.json", b"other")
    assert store.read_blob("resume/w000-e000001/child.json", 16) == b"{}"
    assert store.list_blobs("resume") == [
        "resume/w000-e000001/child.json",
        "resume/w000-e000001/state-1.npz",
        "resume/w001-e000002/child.json",
    ]
    assert store.list_blobs("resume/w000-e000001") == [
        "resume/w000-e000001/child.json",
        "resume/w000-e000001/state-1.npz",
    ]
    assert store.list_blobs("resume/nobody") == []
    for name in store.list_blobs("resume/w000-e000001"):
        store.delete_blob(name)
    assert store.list_blobs("resume") == ["resume/w001-e000002/child.json"]
    store.write_blob("resume/w000-e000001/child.json", b"again")  # its folder was emptied
    assert store.read_blob("resume/w000-e000001/child.json", 16) == b"again"
    for bad in ("inds", "resume/../x", "resume/a/b", "", 3):
        with pytest.raises(StoreError):
            store.list_blobs(bad)
    with pytest.raises(StoreError):
        store.write_blob("inds/x/ckpt", b"")


def test_a_checkpoint_packs_its_arrays_one_per_dtype_and_comes_back_as_it_went(tmp_path):
    """`_checkpoint.save` writes one orbax array per dtype and the leaves' paths, dtypes and
    shapes beside them (orbax costs ~1 ms per array); nested dicts, scalars, empty dicts and
    several dtypes come back equal, and a checkpoint written before packing still restores."""
    import orbax.checkpoint as ocp

    params = {
        **_params(3),
        "head": {"bias": np.float32(0.5), "step": np.array(7, np.int32), "mask": np.ones(2, bool)},
        "empty": {},
    }
    new = str(tmp_path / "new")
    _checkpoint.save(params, new)
    with ocp.PyTreeCheckpointer() as ckpt:
        stored = ckpt.restore(os.path.abspath(new))["params"]
    assert sorted(stored) == ["bool", "float32", "int32"]  # one array per dtype
    assert all(np.asarray(a).ndim == 1 for a in stored.values())
    back = _checkpoint.restore(new, "new")
    assert back["empty"] == {} and sorted(back) == sorted(params)
    for module in ("conv0", "bn0", "out", "head"):
        for name, value in params[module].items():
            np.testing.assert_array_equal(back[module][name], value)
            assert back[module][name].dtype == np.asarray(value).dtype
            assert back[module][name].shape == np.shape(value)
    old = str(tmp_path / "old")  # as `save` wrote checkpoints before packing
    with ocp.PyTreeCheckpointer() as ckpt:
        ckpt.save(os.path.abspath(old), {"params": _params(4)})
    np.testing.assert_array_equal(
        _checkpoint.restore(old, "old")["out"]["kernel"], _params(4)["out"]["kernel"]
    )


@pytest.mark.parametrize(
    "leaves",
    [
        "not json",
        '{"format": "other", "leaves": []}',
        '{"format": "evojax_nas.packed/1", "leaves": [{"path": ["a"], "dtype": "float32", '
        '"shape": [1000]}]}',  # more than the packed array holds
        '{"format": "evojax_nas.packed/1", "leaves": []}',  # arrays left over
        '{"format": "evojax_nas.packed/1", "leaves": [{"path": ["a"], "dtype": "int8", '
        '"shape": [1]}]}',  # no such dtype group
    ],
)
def test_a_damaged_leaves_file_is_a_checkpoint_error(tmp_path, leaves):
    directory = str(tmp_path / "ckpt")
    _checkpoint.save({"a": np.ones(3, np.float32)}, directory)
    with open(os.path.join(directory, _checkpoint.LEAVES_FILE), "w") as f:
        f.write(leaves)
    with pytest.raises(CheckpointError, match="ckpt"):
        _checkpoint.restore(directory, "ckpt")

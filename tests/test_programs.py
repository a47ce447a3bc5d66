"""Compiled programs: memory LRU, sharing through the store, background compile, TPU targets."""

import importlib.util
import os
import pickle
import uuid

import jax
import numpy as np
import pytest

from evojax_nas import dna as D
from evojax_nas import model as M
from evojax_nas import mutations as MU
from evojax_nas import samples
from evojax_nas.data import Dataset
from evojax_nas.errors import ConcurrencyError, CorruptObjectError, NotFoundError, StoreError
from evojax_nas.programs import (
    CompileCounter,
    Layout,
    ProgramCache,
    SharedPrograms,
    Target,
    compile_programs,
)
from evojax_nas.store import open_store
from evojax_nas.train import DeviceData, TrainConfig, train_and_evaluate

try:
    from tests.gcs_emulator import BUCKET, gcs_emulator  # noqa: F401
except ImportError:  # tests/ is not a package: pytest put it on sys.path itself.
    from gcs_emulator import BUCKET, gcs_emulator  # noqa: F401

KEY = jax.random.PRNGKey(0)
CONFIG = TrainConfig(steps=3, batch_size=20, eval_batch_size=10, steps_per_dispatch=2)


def tiny_dataset(n=60, hw=8, c=1, classes=3) -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, hw, hw, c), dtype=np.uint8)
    y = rng.integers(0, classes, n).astype(np.int32)
    return Dataset("tiny", x, y, x[:15], y[:15], classes, (127.0,) * c, (74.0,) * c, "none")


def one_conv(classes=3) -> D.DNA:
    dna = D.initial_dna(1, classes, 0.05)
    return MU.insert_convolution(dna, None, jax.random.PRNGKey(3))[0]


def _train(dna, data, cache):
    variables = M.init_variables(dna, KEY)
    return train_and_evaluate(dna, variables, data, jax.random.PRNGKey(1), CONFIG, cache)


def _same(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


@pytest.fixture(autouse=True)
def no_persistent_cache():
    """In-process CLI tests (`train`) turn JAX's persistent cache on for the whole pytest
    process; a worker process never has it on while it shares programs."""
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax.config.update("jax_compilation_cache_dir", before)


@pytest.fixture(scope="module")
def data():
    return DeviceData.upload(tiny_dataset(), CONFIG.eval_batch_size)


def test_a_second_worker_loads_shared_programs_without_compiling(tmp_path, data):
    store = open_store(str(tmp_path / "run"))
    dna = one_conv()
    first = ProgramCache(shared=SharedPrograms(store))
    a = _train(dna, data, first)
    assert a.programs == "compiled" and first.counts["compiled"] == 1
    (key,) = os.listdir(tmp_path / "run" / "programs")
    files = sorted(os.listdir(tmp_path / "run" / "programs" / key))
    assert files == ["claim", "eval.xla", "meta.json", "train.xla"]
    second = ProgramCache(shared=SharedPrograms(store))  # another worker of the run
    with CompileCounter() as compiles:
        b = _train(dna, data, second)
    assert b.programs == "shared" and second.counts == {"shared": 1}
    assert compiles.count == 0, "loading a shared program must not compile"
    assert _same(a.variables, b.variables) and a.val_accuracy == b.val_accuracy
    assert (a.flops_train_step, a.flops_eval_batch) == (b.flops_train_step, b.flops_eval_batch)


def test_a_damaged_shared_program_costs_a_compile_not_the_run(tmp_path, data):
    store = open_store(str(tmp_path / "run"))
    dna = one_conv()
    _train(dna, data, ProgramCache(shared=SharedPrograms(store)))
    root = tmp_path / "run" / "programs"
    (path,) = [root / d / "train.xla" for d in os.listdir(root)]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    cache = ProgramCache(shared=SharedPrograms(store))
    assert _train(dna, data, cache).programs == "compiled"
    assert cache.counts == {"compiled": 1}


def test_a_program_naming_a_foreign_global_is_refused(tmp_path, data):
    """The unpickler admits only the JAX types an executable is made of."""
    store = open_store(str(tmp_path / "run"))
    dna = one_conv()
    _train(dna, data, ProgramCache(shared=SharedPrograms(store)))
    root = tmp_path / "run" / "programs"
    (key,) = os.listdir(root)
    hostile = pickle.dumps(os.system)  # would name posix.system
    (root / key / "train.xla").unlink()
    store.write_blob(f"programs/{key}/train.xla", hostile)
    meta = (root / key / "meta.json").read_text()
    import hashlib
    import json

    m = json.loads(meta)
    m["train"] = {"bytes": len(hostile), "sha256": hashlib.sha256(hostile).hexdigest()}
    (root / key / "meta.json").write_text(json.dumps(m))
    shared = SharedPrograms(store)
    target = Target.local()
    assert shared.load(key, dna, data.layout, CONFIG, target) is None


def test_prefetch_compiles_in_the_background_and_get_waits_for_it(data):
    cache = ProgramCache()
    dna = one_conv()
    cache.prefetch(dna, data.layout, CONFIG)
    cache.prefetch(dna, data.layout, CONFIG)  # a second prefetch of the same key is a no-op
    programs = cache.get(dna, data.layout, CONFIG)
    assert programs.source == "compiled" and cache.counts["compiled"] == 1
    assert cache.get(dna, data.layout, CONFIG).source == "memory"
    cache.close()


def test_prepare_obtains_the_programs_now_and_get_says_how(data):
    cache = ProgramCache()
    dna = one_conv()
    cache.prepare(dna, data.layout, CONFIG)
    assert cache.counts == {"compiled": 1}
    cache.prepare(dna, data.layout, CONFIG)  # already there: nothing
    with CompileCounter() as compiles:
        programs = cache.get(dna, data.layout, CONFIG)
    assert compiles.count == 0 and programs.source == "compiled"
    assert cache.get(dna, data.layout, CONFIG).source == "memory"
    assert cache.counts == {"compiled": 1, "memory": 1}


def test_memory_cache_is_bounded_least_recently_used_first_out(data):
    cache = ProgramCache(capacity=1)
    a, b = D.initial_dna(1, 3, 0.1), one_conv()
    cache.get(a, data.layout, CONFIG)
    cache.get(b, data.layout, CONFIG)
    assert cache.get(a, data.layout, CONFIG).source == "compiled"  # evicted by b
    assert cache.counts["compiled"] == 3


def test_a_claimed_program_is_waited_for_and_a_stale_claim_is_not(tmp_path, data):
    store = open_store(str(tmp_path / "run"))
    dna = one_conv()
    first = ProgramCache(shared=SharedPrograms(store))
    first.get(dna, data.layout, CONFIG)
    key = first.get(dna, data.layout, CONFIG).key
    # Another run's layout: claim it as if a dead worker had, long ago.
    other = ProgramCache(shared=SharedPrograms(store), claim_wait=0.5)
    dna2 = D.initial_dna(1, 3, 0.1)
    from evojax_nas.programs import program_key

    key2 = program_key(dna2, data.layout, CONFIG, other.target)
    store.write_blob(f"programs/{key2}/claim", b"0")
    assert other.get(dna2, data.layout, CONFIG).source == "compiled"  # did not wait forever
    assert key != key2


def test_programs_are_shared_only_between_workers_with_the_same_code(tmp_path, monkeypatch):
    """A layer or whole program's signature names its shapes, not its code: the package code's
    digest is in both keys, so a run resumed with changed code does not load stale programs."""
    import shutil

    from evojax_nas import programs as P

    src = tmp_path / "src"
    src.mkdir()
    for name in P.CODE_MODULES:
        shutil.copy(os.path.join(os.path.dirname(P.__file__), f"{name}.py"), src / f"{name}.py")
    before = P.source_digest(src, P.CODE_MODULES)
    assert before == P.code_digest()  # the installed package's own files
    with open(src / "layerwise.py", "a", encoding="utf-8") as f:
        f.write("\n# an edit\n")
    assert P.source_digest(src, P.CODE_MODULES) != before

    layout, target = Layout.of(tiny_dataset()), P.Target("cpu", "cpu")
    store = open_store(str(tmp_path / "run"))
    key, folder = P.program_key(one_conv(), layout, CONFIG, target), P.SharedLayers(store, target)
    monkeypatch.setattr(P, "code_digest", lambda: "other code")
    assert P.program_key(one_conv(), layout, CONFIG, target) != key
    assert P.SharedLayers(store, target).folder != folder.folder


def test_cpu_programs_are_shared_only_between_hosts_with_the_same_instruction_set(
    tmp_path, monkeypatch
):
    """An executable compiled on an AVX-512 host must not reach a host without AVX-512 through
    the store; flags that code generation does not use do not keep hosts apart."""
    from evojax_nas import conv as C
    from evojax_nas import programs as P

    layout, store = Layout.of(tiny_dataset()), open_store(str(tmp_path / "run"))
    avx2 = frozenset("fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2".split())
    keys = {}
    for name, flags in {
        "avx2": avx2,
        "avx2, other flags": avx2 | {"hypervisor", "smep", "rdrand", "constant_tsc"},
        "avx512": avx2 | {"avx512f", "avx512bw", "avx512_vnni"},
    }.items():
        monkeypatch.setattr(C, "host_cpu_flags", lambda flags=flags: flags)
        target = P.Target("cpu", "cpu")
        keys[name] = (
            P.program_key(one_conv(), layout, CONFIG, target),
            P.SharedLayers(store, target).folder,
        )
    assert keys["avx2"] == keys["avx2, other flags"]
    assert keys["avx512"][0] != keys["avx2"][0] and keys["avx512"][1] != keys["avx2"][1]
    # A TPU compiled for from a CPU host does not depend on the host's CPU.
    assert P.Target("tpu", "TPU v4", compile_only=True).instruction_set == ""


def test_blob_store_operations_are_create_only_and_bounded(tmp_path):
    store = open_store(str(tmp_path / "run"))
    store.write_blob("programs/abc/x.bin", b"12345")
    with pytest.raises(ConcurrencyError):
        store.write_blob("programs/abc/x.bin", b"other")
    assert store.read_blob("programs/abc/x.bin", 5) == b"12345"
    with pytest.raises(CorruptObjectError):
        store.read_blob("programs/abc/x.bin", 4)
    with pytest.raises(NotFoundError):
        store.read_blob("programs/abc/missing", 10)
    for bad in ("../x", "programs/../../etc", "inds/a/b", "programs/a", "programs/a/b/c"):
        with pytest.raises(StoreError):
            store.read_blob(bad, 10)
    os.symlink("/etc/passwd", tmp_path / "run" / "programs" / "abc" / "link")
    with pytest.raises(CorruptObjectError):
        store.read_blob("programs/abc/link", 1 << 20)
    store.delete_blob("programs/abc/x.bin")
    store.delete_blob("programs/abc/x.bin")  # deleting twice is fine
    with pytest.raises(NotFoundError):
        store.read_blob("programs/abc/x.bin", 10)


def test_gcs_store_shares_programs_too(gcs_emulator, data):  # noqa: F811
    store = open_store(f"gs://{BUCKET}/{uuid.uuid4().hex}")
    store.write_blob("programs/k/x.bin", b"1")
    with pytest.raises(ConcurrencyError):
        store.write_blob("programs/k/x.bin", b"2")
    with pytest.raises(CorruptObjectError):
        store.read_blob("programs/k/x.bin", 0)
    dna = one_conv()
    a = _train(dna, data, ProgramCache(shared=SharedPrograms(store)))
    second = ProgramCache(shared=SharedPrograms(store))
    b = _train(dna, data, second)
    assert b.programs == "shared" and _same(a.variables, b.variables)


def test_compile_targets_follow_the_target_platform_not_the_default_backend():
    from evojax_nas.programs import abstract_args

    layout = Layout.of(tiny_dataset())
    fake_tpu = Target("tpu", "TPU v4")
    train_args, _ = abstract_args(one_conv(), layout, CONFIG, fake_tpu)
    assert train_args[1].shape == (2, 20, 8, 8, 1)  # a chunk of prepared batches
    from evojax_nas.programs import program_key

    cpu = Target("cpu", "cpu")
    assert program_key(one_conv(), layout, CONFIG, fake_tpu) != program_key(
        one_conv(), layout, CONFIG, cpu
    )


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_train_and_eval_programs_compile_for_a_tpu_v4_without_hardware():
    """The `tpu` extra's libtpu compiles real TPU executables on this CPU-only machine."""
    target = Target.tpu("v4:2x2x1")
    assert target.platform == "tpu" and "v4" in target.device_kind.lower()
    mnist = Layout((3500, 28, 28, 1), "uint8", (33.0,), (78.0,), "digits")
    cfg = TrainConfig(steps=200)
    initial = D.initial_dna(1, 10, 0.1)
    small = D.for_data(samples.read_dna("small_conv"), 1, 10)
    child, _, _ = MU.mutate(small, None, jax.random.PRNGKey(7), weights={"insert_convolution": 1})
    for dna in (initial, small, child):
        programs, compiled = compile_programs(dna, mnist, cfg, target)
        assert programs.flops_train_step > 0 and programs.flops_eval_batch > 0
        for c in compiled:
            assert "T(8,128)" in c.as_text()  # TPU tiled layouts: a TPU executable
            assert c.memory_analysis().generated_code_size_in_bytes > 0
    # XLA's own convolution on TPU (the CPU-only custom VJP is not in the program)
    assert "DNANet._edge/conv_e" in compiled[0].as_text()
    assert "conv2d" not in compiled[0].as_text()


def test_nothing_is_shared_from_a_process_with_jax_persistent_cache(tmp_path, data):
    """Executables JAX's persistent cache hands back do not load elsewhere (XLA:CPU): such a
    process shares nothing, and releases its claim so that no other worker waits for it."""
    store = open_store(str(tmp_path / "run"))
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
    try:
        cache = ProgramCache(shared=SharedPrograms(store))
        assert _train(D.initial_dna(1, 3, 0.2), data, cache).programs == "compiled"
    finally:
        from jax._src import compilation_cache

        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()  # later tests of this process share programs again
    (key,) = os.listdir(tmp_path / "run" / "programs")
    assert os.listdir(tmp_path / "run" / "programs" / key) == []

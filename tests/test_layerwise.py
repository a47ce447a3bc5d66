"""`train_impl: "layerwise"`: per-layer programs train and evaluate as the whole program."""

import dataclasses

import jax
import numpy as np
import pytest

from evojax_nas import dna as D
from evojax_nas import layerwise, samples, xla_backend
from evojax_nas import model as M
from evojax_nas import mutations as MU
from evojax_nas.data import Dataset
from evojax_nas.programs import CompileCounter, ProgramCache
from evojax_nas.train import (
    DeviceData,
    TrainConfig,
    initial_state,
    run_training,
    train_and_evaluate,
)

try:
    from tests.conftest import make_tiny_run
except ImportError:  # tests/ is not a package: pytest put it on sys.path itself.
    from conftest import make_tiny_run

WHOLE = TrainConfig(steps=7, batch_size=10, eval_batch_size=16, steps_per_dispatch=3)
LAYERS = dataclasses.replace(WHOLE, train_impl="layerwise")
KEY = jax.random.PRNGKey(0)


def dataset(n=60, hw=8, c=3, classes=4) -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, hw, hw, c), dtype=np.uint8)
    y = rng.integers(0, classes, n).astype(np.int32)
    # 21 validation images: the last evaluation batch is padded and masked.
    return Dataset("tiny", x, y, x[:21], y[:21], classes, (127.0,) * c, (74.0,) * c, "none")


@pytest.fixture(scope="module")
def data():
    return DeviceData.upload(dataset(), WHOLE.eval_batch_size)


def chain(length: int, seed: int = 5) -> list:
    """Distinct architectures of a seeded mutation chain (convolutions, strides, merges)."""
    dna, key, out = D.initial_dna(3, 4, 0.05), jax.random.PRNGKey(seed), []
    seen = set()
    for i in range(length):
        dna, _, _ = MU.mutate(dna, None, jax.random.fold_in(key, i))
        if D.architecture_key(dna) not in seen:
            seen.add(D.architecture_key(dna))
            out.append(dna)
    return out


def merged_dna():
    """The chain's architecture with the most edges (skip connections, resizes, depth pads)."""
    return max(chain(40), key=lambda d: (len(d.edges), sum(e.is_conv for e in d.edges)))


def _close(a, b, rtol=1e-4, atol=1e-5) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        np.allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)
        for x, y in zip(la, lb, strict=True)
    )


def _equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True)
    )


@pytest.mark.parametrize("name", ["initial", "small_conv", "merged"])
def test_layerwise_trains_like_the_whole_program(name, data):
    dna = {
        "initial": lambda: D.initial_dna(3, 4, 0.05),
        "small_conv": lambda: D.for_data(samples.read_dna("small_conv"), 3, 4),
        "merged": merged_dna,
    }[name]()
    if name == "merged":  # the test is only as good as its DNA: it must merge inputs
        arch = __import__("evojax_nas.architecture", fromlist=["resolve"]).resolve(dna)
        assert any(len(arch.inputs[v]) > 1 for v in arch.order)
    variables = M.init_variables(dna, KEY)
    key = jax.random.PRNGKey(1)
    states = {}
    for cfg in (WHOLE, LAYERS):
        programs = ProgramCache().get(dna, data.layout, cfg)
        states[cfg.train_impl] = run_training(programs, variables, data, key, 0.05, cfg)
    (whole, n_w, bad_w), (layers, n_l, bad_l) = states["whole"], states["layerwise"]
    assert (n_w, bad_w) == (n_l, bad_l) == (WHOLE.steps, False)
    assert _close(whole.params, layers.params)
    assert _close(whole.batch_stats, layers.batch_stats)
    assert _close(whole.opt_state, layers.opt_state)  # momenta in optax's own state
    assert jax.tree_util.tree_structure(whole) == jax.tree_util.tree_structure(layers)
    # The results agree; the parameters must also have moved, or the comparison says nothing.
    assert not _close(whole.params, variables["params"])


def test_layerwise_fitness_and_flops_match_the_whole_program(data):
    dna = merged_dna()
    variables = M.init_variables(dna, KEY)
    a = train_and_evaluate(dna, variables, data, jax.random.PRNGKey(2), WHOLE, ProgramCache())
    b = train_and_evaluate(dna, variables, data, jax.random.PRNGKey(2), LAYERS, ProgramCache())
    assert abs(a.val_accuracy - b.val_accuracy) <= 1 / 21 + 1e-9  # one image at most
    assert _close(a.variables, b.variables)
    assert b.eval_batches == a.eval_batches == 2
    # FLOPs are counted from the architecture: the same whichever way it trains.
    assert (a.flops_train_step, a.flops_eval_batch) == (b.flops_train_step, b.flops_eval_batch)
    assert a.flops_train_step > 0


@pytest.mark.parametrize("eval_batch", [16, 20])  # 20: two parts of the training batch (10)
def test_layerwise_evaluation_counts_what_the_whole_program_counts(eval_batch):
    dna, val = merged_dna(), DeviceData.upload(dataset(), eval_batch)
    variables = M.init_variables(dna, KEY)
    rng = np.random.default_rng(3)  # running averages far from init: eval mode must use them
    moved = jax.tree_util.tree_map(
        lambda v: np.asarray(v) + rng.uniform(0.5, 2.0, np.shape(v)).astype(np.float32),
        variables["batch_stats"],
    )
    counts = {}
    for cfg in (WHOLE, LAYERS):
        cfg = dataclasses.replace(cfg, eval_batch_size=eval_batch)
        programs = ProgramCache().get(dna, val.layout, cfg)
        counts[cfg.train_impl] = [
            [int(programs.eval_batch(variables["params"], stats, x, y, m)) for x, y, m in batches]
            for stats in (variables["batch_stats"], moved)
            for batches in [val.val_batches]
        ]
    assert counts["layerwise"] == counts["whole"]
    assert counts["whole"][0] != counts["whole"][1]  # the running averages made a difference
    assert sum(counts["whole"][0]) <= 21 and len(counts["whole"][0]) == 2


def test_layerwise_is_deterministic_and_resumes_bit_for_bit(data):
    dna = merged_dna()
    variables = M.init_variables(dna, KEY)
    key = jax.random.PRNGKey(3)
    cfg = dataclasses.replace(LAYERS, steps=9)
    seen = {}

    def on_chunk(step, state):
        seen[step] = jax.device_get(state)

    def train(**kwargs):  # each time with a fresh program cache, as a new process would
        programs = ProgramCache().get(dna, data.layout, cfg)
        return run_training(programs, variables, data, key, 0.05, cfg, **kwargs)

    full = train(on_chunk=on_chunk)
    again = train()
    assert _equal(full[0], again[0])  # a replay in a fresh process computes the same bits
    step = sorted(seen)[1]
    resumed = train(start=(step, seen[step]))
    assert resumed[1:] == full[1:] and _equal(resumed[0], full[0])


def test_known_layers_compile_nothing(data):
    """A new architecture whose layer signatures all occurred before compiles no program."""
    cache = ProgramCache()
    base = D.for_data(samples.read_dna("small_conv"), 3, 4)
    variables = M.init_variables(base, KEY)
    first = train_and_evaluate(base, variables, data, KEY, LAYERS, cache)
    assert first.programs == "compiled" and len(cache.layers) > 0
    # Same layers, another architecture: the learning rate differs, and the identity mutation
    # keeps the architecture; both must come from memory. A new DNA that only repeats an
    # existing vertex kind with the same shapes assembles from known layers.
    lr_child = dataclasses.replace(base, learning_rate=0.3)
    with CompileCounter() as counter:
        again = train_and_evaluate(lr_child, variables, data, KEY, LAYERS, cache)
    assert again.programs == "memory" and counter.count == 0
    fresh_cache_entry = ProgramCache()
    fresh_cache_entry.layers = cache.layers  # a new architecture cache, the same layer cache
    with CompileCounter() as counter:
        assembled = train_and_evaluate(base, variables, data, KEY, LAYERS, fresh_cache_entry)
    assert assembled.programs == "layers" and counter.count == 0
    assert assembled.val_accuracy == first.val_accuracy


def test_layer_programs_compile_with_their_options_and_train_as_before(data):
    """A worker's layer programs compile with `layerwise.compiler_options` (on a CPU: XLA's
    legacy fusion emitters, which compile and run faster there; without AVX-512, no LLVM loop
    unrolling too), and train as programs compiled with the options before each of them do."""

    cache = ProgramCache()
    assert cache.layers.options == layerwise.compiler_options("cpu")
    if xla_backend.option_known("xla_cpu_use_fusion_emitters", False):  # gone in jaxlib 0.11
        assert cache.layers.options["xla_cpu_use_fusion_emitters"] is False
    else:
        assert "xla_cpu_use_fusion_emitters" not in cache.layers.options
    assert "xla_cpu_use_fusion_emitters" not in layerwise.compiler_options("tpu")
    assert xla_backend.EXTRA_OPTIONS not in layerwise.compiler_options("tpu")
    before_emitters, before_unrolling = ProgramCache(), ProgramCache()
    before_emitters.layers = layerwise.OpCache(layerwise.options_before_legacy_emitters("cpu"))
    before_unrolling.layers = layerwise.OpCache(layerwise.options_before_backend_options("cpu"))
    assert xla_backend.EXTRA_OPTIONS not in before_unrolling.layers.options
    dna = merged_dna()
    variables = M.init_variables(dna, KEY)
    caches = (cache, before_emitters, before_unrolling)
    states = [
        run_training(c.get(dna, data.layout, LAYERS), variables, data, KEY, 0.05, LAYERS)[0]
        for c in caches
    ]
    assert cache.layers.compiles > 0
    assert all(c.layers.compiles == cache.layers.compiles for c in caches)
    for other in states[1:]:
        assert _close(states[0].params, other.params, rtol=1e-5, atol=1e-6)
        assert _close(states[0].batch_stats, other.batch_stats, rtol=1e-5, atol=1e-6)
    assert not _close(states[0].params, variables["params"])
    # The options reach the compiler: one it does not know fails the compile.
    broken = ProgramCache()
    broken.layers = layerwise.OpCache({"xla_no_such_option_anywhere": True})
    with pytest.raises(Exception, match="xla_no_such_option_anywhere"):
        broken.get(dna, data.layout, LAYERS)


def test_loop_unrolling_is_turned_off_only_on_cpus_without_avx512(monkeypatch):
    """Layer programs: the legacy fusion emitters everywhere on a CPU; without AVX-512 also the
    whole programs' options and no loop unrolling, with AVX-512 XLA's YNNPACK convolutions."""
    from evojax_nas import conv

    # (where this jaxlib still has them: `xla_backend.option_known`)
    legacy = {"xla_cpu_use_fusion_emitters": False}
    legacy = {k: v for k, v in legacy.items() if xla_backend.option_known(k, v)}
    monkeypatch.setattr(layerwise, "host_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert layerwise.compiler_options("cpu") == {
        **conv.compiler_options("cpu"),
        **legacy,
        xla_backend.EXTRA_OPTIONS: "xla_cpu_disable_loop_unrolling",
    }
    monkeypatch.setattr(layerwise, "host_cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    options = layerwise.compiler_options("cpu")
    assert options == legacy
    assert options == layerwise.options_before_backend_options("cpu")
    assert layerwise.compiler_options("tpu") == {}
    monkeypatch.setattr(layerwise, "host_cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(xla_backend, "install", lambda: False)  # another JAX: left out
    assert xla_backend.EXTRA_OPTIONS not in layerwise.compiler_options("cpu")


def _layer_blobs(root) -> list:
    (folder,) = [d for d in (root / "programs").iterdir() if d.name.startswith("layers-")]
    return sorted(folder.iterdir())


def test_a_second_worker_loads_the_layers_the_first_compiled(tmp_path, data):
    """Layer programs go through the run's store: another worker of the run (a fresh cache)
    loads every layer the first compiled, compiles nothing, and trains bit for bit alike."""
    from evojax_nas.programs import SharedPrograms
    from evojax_nas.store import open_store

    store = open_store(str(tmp_path / "run"))
    dna = merged_dna()
    variables = M.init_variables(dna, KEY)
    first = ProgramCache(shared=SharedPrograms(store))
    a = train_and_evaluate(dna, variables, data, KEY, LAYERS, first)
    assert a.programs == "compiled" and first.layers.compiles > 0
    assert len(_layer_blobs(tmp_path / "run")) == first.layers.compiles  # every one shared
    second = ProgramCache(shared=SharedPrograms(store))
    with CompileCounter() as counter:
        b = train_and_evaluate(dna, variables, data, KEY, LAYERS, second)
    assert counter.count == 0, "loading shared layer programs must not compile"
    assert b.programs == "shared" and second.layers.compiles == 0
    assert second.layers.loads == first.layers.compiles
    assert _equal(a.variables, b.variables) and a.val_accuracy == b.val_accuracy
    # A worker that keeps its layers to itself (compile_cache "worker") shares nothing.
    private = ProgramCache()
    train_and_evaluate(dna, variables, data, KEY, LAYERS, private)
    assert private.layers.shared is None and private.layers.loads == 0


def test_a_damaged_shared_layer_program_costs_a_compile_not_the_run(tmp_path, data, caplog):
    from evojax_nas.programs import SharedPrograms
    from evojax_nas.store import open_store

    store = open_store(str(tmp_path / "run"))
    dna = D.for_data(samples.read_dna("small_conv"), 3, 4)
    variables = M.init_variables(dna, KEY)
    a = train_and_evaluate(
        dna, variables, data, KEY, LAYERS, ProgramCache(shared=SharedPrograms(store))
    )
    flipped, garbage = _layer_blobs(tmp_path / "run")[:2]
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # the executable no longer matches its digest
    flipped.write_bytes(bytes(raw))
    garbage.write_bytes(b"not a program at all")
    cache = ProgramCache(shared=SharedPrograms(store))
    b = train_and_evaluate(dna, variables, data, KEY, LAYERS, cache)
    assert cache.layers.compiles == 2 and cache.layers.loads == len(cache.layers) - 2
    assert _equal(a.variables, b.variables) and a.val_accuracy == b.val_accuracy
    assert "digest" in caplog.text and "not a layer program" in caplog.text


def test_layers_from_jax_persistent_cache_are_not_shared(tmp_path, data):
    """With JAX's persistent cache on (layer-wise worker processes turn it on), a layer compiled
    afresh is shared through the store, one the persistent cache handed back is not: such an
    executable does not load in another process (XLA:CPU)."""
    from jax._src import compilation_cache

    from evojax_nas.programs import SharedPrograms
    from evojax_nas.store import open_store

    dna = D.for_data(samples.read_dna("small_conv"), 3, 4)
    variables = M.init_variables(dna, KEY)
    before = jax.config.jax_compilation_cache_dir
    before_min = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        fresh = ProgramCache(shared=SharedPrograms(open_store(str(tmp_path / "a"))))
        train_and_evaluate(dna, variables, data, KEY, LAYERS, fresh)
        assert len(_layer_blobs(tmp_path / "a")) == fresh.layers.compiles > 0
        again = ProgramCache(shared=SharedPrograms(open_store(str(tmp_path / "b"))))
        with CompileCounter() as counter:
            train_and_evaluate(dna, variables, data, KEY, LAYERS, again)
        assert counter.cache_hits == again.layers.compiles == fresh.layers.compiles
        assert not (tmp_path / "b" / "programs").exists()
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before_min)
        compilation_cache.reset_cache()


def test_layerwise_divergence_is_reported(data):
    dna = D.for_data(samples.read_dna("small_conv"), 3, 4)
    dna = dataclasses.replace(dna, learning_rate=1e30)
    variables = M.init_variables(dna, KEY)
    result = train_and_evaluate(dna, variables, data, KEY, LAYERS, ProgramCache())
    assert result.diverged and result.val_accuracy == 0.0
    assert _equal(result.variables, variables)


def test_momentum_buffers_round_trip():
    from evojax_nas.steps import make_optimizer

    dna = D.for_data(samples.read_dna("small_conv"), 3, 4)
    state = initial_state(M.init_variables(dna, KEY), WHOLE)
    trace = jax.tree_util.tree_map(lambda a: a + 1, layerwise.momentum_buffers(state.opt_state))
    replaced = layerwise.with_momentum_buffers(state.opt_state, trace)
    assert jax.tree_util.tree_structure(replaced) == jax.tree_util.tree_structure(state.opt_state)
    assert _equal(layerwise.momentum_buffers(replaced), trace)
    with pytest.raises(TypeError, match="TraceState"):
        layerwise.momentum_buffers(make_optimizer(WHOLE).init({})[:1])


def test_a_layerwise_run_replays_bit_for_bit(tmp_path, random_dataset):
    """Evolution with `train_impl: "layerwise"`: children reuse layers, and replay (which
    trains with the run's config) reproduces every individual exactly."""
    from evojax_nas.config import stored_config
    from evojax_nas.evolution import training_evaluator
    from evojax_nas.replay import replay

    data = random_dataset(n=100, hw=8, c=3, classes=4)
    store, _ = make_tiny_run(tmp_path / "run", data, train_impl="layerwise")
    cfg = stored_config(store.read_config())
    records = store.records()
    assert {r.get("programs") for r in records} <= {"compiled", "memory", "layers", "shared"}
    assert any(r.get("programs") == "memory" for r in records)
    evaluate = training_evaluator(data, cfg)  # a fresh process's caches
    for r in records:
        out = replay(store, r["id"], evaluate, 3, 4)
        assert out["matches"], out


def test_a_finished_prefetch_reports_how_it_got_the_programs(data):
    """A prefetch that finished before the child asked still says "compiled"/"layers" for
    the child's record (not "memory": that is for an architecture used before)."""
    dna = D.for_data(samples.read_dna("small_conv"), 3, 4)
    cache = ProgramCache()
    cache.prefetch(dna, data.layout, LAYERS)
    cache.close()  # waits for the prefetch
    assert cache.get(dna, data.layout, LAYERS).source == "compiled"
    assert cache.get(dna, data.layout, LAYERS).source == "memory"
    other = ProgramCache()
    other.layers = cache.layers
    other.prefetch(dna, data.layout, LAYERS)
    other.close()  # waits for the prefetch
    assert other.get(dna, data.layout, LAYERS).source == "layers"
    assert other.counts == {"layers": 1}


_PROCESS = """
import sys
import jax
from evojax_nas import dna as D, samples
from evojax_nas.programs import CompileCounter, ProgramCache
from evojax_nas.train import enable_compilation_cache
sys.path.insert(0, {tests!r})
from test_layerwise import LAYERS, dataset
from evojax_nas.train import DeviceData
enable_compilation_cache(min_compile_seconds=0.0)
data = DeviceData.upload(dataset(), LAYERS.eval_batch_size)
dna = D.for_data(samples.read_dna("small_conv"), 3, 4)
with CompileCounter() as counter:
    ProgramCache().get(dna, data.layout, LAYERS)
print("compiles", counter.count, "hits", counter.cache_hits)
"""


def test_a_second_process_finds_the_layer_programs_in_the_persistent_cache(tmp_path):
    """What a layer-wise worker does (`runner.worker_main`): the other workers of the host, and
    later runs, load its layer programs from JAX's persistent cache instead of compiling."""
    import os
    import pathlib
    import subprocess
    import sys

    env = dict(os.environ, EVOJAX_NAS_XLA_CACHE=str(tmp_path / "xla"), JAX_PLATFORMS="cpu")
    script = _PROCESS.format(tests=str(pathlib.Path(__file__).parent))
    counts = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-2000:]
        _, compiles, _, hits = out.stdout.split()[-4:]
        counts.append((int(compiles), int(hits)))
    (first, first_hits), (second, second_hits) = counts
    assert first > 5 and first_hits == 0, counts
    assert second == 0 and second_hits == first, counts
    assert any((tmp_path / "xla").iterdir())


def _fill(cache, sizes):
    """Fake cache entries, the first the least recently used."""
    import os

    cache.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        (cache / f"jit_f-{i:04d}-cache").write_bytes(b"x" * size)
        (cache / f"jit_f-{i:04d}-atime").write_bytes(b"12345678")
        os.utime(cache / f"jit_f-{i:04d}-cache", (1_000_000 + i, 1_000_000 + i))


def test_trimming_the_persistent_cache_drops_the_least_recently_used_first(tmp_path):
    from evojax_nas.train import trim_compilation_cache

    cache = tmp_path / "xla"
    _fill(cache, [400, 300, 200, 100])
    (cache / "unrelated.txt").write_text("kept")
    assert trim_compilation_cache(str(cache), -1) == (0, 1000)
    assert trim_compilation_cache(str(cache), 350) == (2, 300)
    assert sorted(p.name for p in cache.iterdir()) == [
        "jit_f-0002-atime",
        "jit_f-0002-cache",
        "jit_f-0003-atime",
        "jit_f-0003-cache",
        "unrelated.txt",
    ]
    assert trim_compilation_cache(str(cache), 350) == (0, 300)
    assert trim_compilation_cache(str(tmp_path / "none"), 10) == (0, 0)


def test_a_process_that_turns_the_persistent_cache_on_trims_it_to_its_bound(tmp_path):
    """`$EVOJAX_NAS_XLA_CACHE_MAX_MB`: each process that opens the cache (the CLI, each worker)
    trims it first."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "xla"
    _fill(cache, [2**19] * 4)  # 2 MiB
    env = dict(
        os.environ,
        EVOJAX_NAS_XLA_CACHE=str(cache),
        EVOJAX_NAS_XLA_CACHE_MAX_MB="1.2",
        JAX_PLATFORMS="cpu",
    )
    code = "from evojax_nas.train import enable_compilation_cache; enable_compilation_cache()"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(p.name for p in cache.glob("*-cache")) == ["jit_f-0002-cache", "jit_f-0003-cache"]


def convs_dna(depths, kinds, skips=(), **out):
    """Input (3) → v1 → v2 → v3 → output, each through a 3×3 convolution (edges 5, 6, 7 and 9,
    `out` the last one's extra fields), v1–v3 of true `depths` and `kinds`, plus identity skips
    (source, destination) as edges 10, 11, ..."""
    V, E = D.Vertex, D.Edge
    conv = dict(kind="conv", filter_half_height=1.0, filter_half_width=1.0)
    vertices = [V(0, "linear", "input")] + [V(i, k) for i, k in enumerate(kinds, 1)]
    d = [3, *depths]
    chain = [E(5 + i, i, i + 1, depth_factor=d[i + 1] / d[i], **conv) for i in range(3)]
    dna = D.DNA(
        vertices=(*vertices, V(4, "linear", "output")),
        edges=(
            *chain,
            E(9, 3, 4, **out, **conv),
            *(E(10 + k, a, b, precedence=D.SKIP) for k, (a, b) in enumerate(skips)),
        ),
        learning_rate=0.05,
        input_channels=3,
        num_classes=4,
        next_id=10 + len(skips),
    )
    return D.validate(dna)


def padded_merge_dna(depth_1: int = 7, depth_2: int = 5):
    """Input (3) → v1 (conv, `depth_1`) → v2 (conv, `depth_2`) → v3 (conv, `depth_2`, plus an
    identity skip from v1) → output (conv, 2 × `depth_2`, stride 2, plus a skip from v1). With
    `depth_1` > `depth_2` both padded alike, v1's extra true channels must not leak into v3's
    padding."""
    # v3 linear: behind BN the leak would be harmless (zero scale and bias in the padding); a
    # linear vertex passes it on, into the kernel gradient of the convolution it feeds
    kinds = ("bn_relu", "bn_relu", "linear")
    depths = (depth_1, depth_2, depth_2)
    return convs_dna(depths, kinds, [(1, 3), (1, 4)], depth_factor=2.0, stride_scale=1.0)


def _trained_both_ways(dna, variables, data):
    """The training states after `WHOLE`'s steps: of the whole program, of the layer programs."""
    return [
        run_training(ProgramCache().get(dna, data.layout, cfg), variables, data, KEY, 0.05, cfg)[0]
        for cfg in (WHOLE, LAYERS)
    ]


def test_padded_channels_train_like_the_whole_program(data):
    """Layer programs pad depths to `CHANNEL_PADDING`; a merge zeroes the channels beyond its
    true depth that a deeper input brings (`layerwise._merged`): the true channels train as the
    whole program's, and the variables come back in their true shapes."""
    dna = padded_merge_dna()
    arch = __import__("evojax_nas.architecture", fromlist=["resolve"]).resolve(dna)
    assert [arch.shapes[v].depth for v in (1, 2, 3, 4)] == [7, 5, 5, 10]
    multiple, above = layerwise.CHANNEL_PADDING
    assert multiple > 1 and above < 5  # the test is only as good as its depths: all padded
    width = layerwise.stored_depths(arch, layerwise.CHANNEL_PADDING)
    assert width[1] == width[3] > 7 and width[4] > 10 and width[0] == 3
    variables = M.init_variables(dna, KEY)
    whole, layers = _trained_both_ways(dna, variables, data)
    assert jax.tree_util.tree_map(np.shape, layers) == jax.tree_util.tree_map(np.shape, whole)
    assert _close(whole.params, layers.params)
    assert _close(whole.batch_stats, layers.batch_stats)
    assert _close(whole.opt_state, layers.opt_state)
    assert not _close(whole.params, variables["params"])
    states = {}
    for cfg in (WHOLE, LAYERS):  # evaluation of the trained variables agrees too
        programs = ProgramCache().get(dna, data.layout, cfg)
        states[cfg.train_impl] = [
            int(programs.eval_batch(whole.params, whole.batch_stats, x, y, m))
            for x, y, m in data.val_batches
        ]
    assert states["whole"] == states["layerwise"]


def shallow_skip_dna():
    """Input (3) → v1 (linear, conv, 5) → v2 (conv, 7) → v3 (conv, 7, plus an identity skip
    from v1) → output. v1's depth pads as v3's, and v3's true channels 5 and 6 have gradients:
    they must not reach v1's padding, which no BN zeroes again (v1 is linear)."""
    return convs_dna((5, 7, 7), ("linear", "bn_relu", "bn_relu"), [(1, 3)])


def test_a_shallower_input_gets_no_gradient_in_its_padding(data):
    """A merge sends each input its gradient cut to that input's true depth (`_merged`): with
    v1 (5 channels) merged into v3 (7), both stored in 8, training matches the whole program;
    it did not when v1's padding received v3's gradient."""
    dna = shallow_skip_dna()
    arch = __import__("evojax_nas.architecture", fromlist=["resolve"]).resolve(dna)
    width = layerwise.stored_depths(arch, layerwise.CHANNEL_PADDING)
    assert [arch.shapes[v].depth for v in (1, 3)] == [5, 7] and width[1] == width[3]
    variables = M.init_variables(dna, KEY)
    whole, layers = _trained_both_ways(dna, variables, data)
    assert _close(whole.params, layers.params)
    assert _close(whole.batch_stats, layers.batch_stats)
    assert not _close(whole.params, variables["params"])


def skips_dna(*sources: int):
    """Input (3) → v1 (conv, 8) → v2 (conv, 8) → v3 (conv, 8, plus identity skips from
    `sources`) → output (conv, 8)."""
    return convs_dna((8, 8, 8), ("bn_relu",) * 3, [(s, 3) for s in sources])


def test_merges_compile_per_input_not_per_combination(data):
    """A vertex merges its inputs one at a time (`merge_fwd`, `merge_bwd`): once a vertex has
    merged the input and v1, vertices that merge either of them alone compile nothing."""
    cache = layerwise.OpCache(layerwise.compiler_options())
    layerwise.build(skips_dna(0, 1), data.layout, LAYERS, "custom", cache)
    before = cache.compiles
    for sources in [(1,), (0,)]:
        layerwise.build(skips_dna(*sources), data.layout, LAYERS, "custom", cache)
    assert cache.compiles == before > 0
    layerwise.build(skips_dna(), data.layout, LAYERS, "custom", cache)  # no merge: nor this
    assert cache.compiles == before


def test_depths_that_pad_alike_share_their_layer_programs(data):
    """Two architectures whose depths differ within one padding multiple compile once: the
    second assembles from the first one's layer programs; without padding it compiles."""
    cache = ProgramCache()
    first, second = padded_merge_dna(7, 5), padded_merge_dna(6, 4 + 2)
    train_and_evaluate(first, M.init_variables(first, KEY), data, KEY, LAYERS, cache)
    with CompileCounter() as counter:
        again = train_and_evaluate(second, M.init_variables(second, KEY), data, KEY, LAYERS, cache)
    assert again.programs == "layers" and counter.count == 0
    unpadded = layerwise.OpCache(cache.layers.options)
    layerwise.build(first, data.layout, LAYERS, "custom", unpadded, channel_padding=(1, 0))
    before = unpadded.compiles
    layerwise.build(second, data.layout, LAYERS, "custom", unpadded, channel_padding=(1, 0))
    assert unpadded.compiles > before


def test_a_variable_of_the_wrong_shape_is_refused(data):
    dna = padded_merge_dna()
    variables = M.init_variables(dna, KEY)
    wrong = jax.tree_util.tree_map(lambda a: a, variables)
    wrong["params"]["conv_e5"]["kernel"] = np.zeros((3, 3, 3, 8), np.float32)  # padded
    programs = ProgramCache().get(dna, data.layout, LAYERS)
    with pytest.raises(ValueError, match="conv_e5/kernel"):
        run_training(programs, wrong, data, KEY, 0.05, LAYERS)

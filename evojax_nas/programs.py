"""The compiled programs of an architecture: built once per run, off a child's critical path.

Training a child needs two XLA programs — a chunk of training steps and one evaluation batch —
that depend only on its architecture, the data layout, the training config and the target
device; never on the weights or the learning rate. `ProgramCache` finds them, in this order:

1. in memory (least recently used first out), so an architecture-preserving child (identity,
   learning rate, reset weights) compiles nothing;
2. in the run's store (`programs/<key>/`), as serialized executables, so an architecture that
   one worker compiled is *loaded* — not traced, lowered or compiled — by every other worker of
   the run, on this host or another with the same platform, device kind, JAX version and
   package code (`code_digest`);
3. otherwise it compiles them, and shares them through the store. A create-only claim lets the
   other workers that need the same architecture meanwhile wait for it instead of compiling it
   again.

`prefetch` does this in a background thread, so the next child's programs are ready when the
current child finishes training. With `train_impl: "layerwise"` the programs are assembled
from per-layer programs instead (`evojax_nas.layerwise`, `ProgramCache.layers`), compiled once
per layer signature and shared through the store too (`SharedLayers`). A `Target` can be a
TPU described by its topology: programs then compile for a TPU on a machine without one
(DESIGN §5).

Security: a serialized executable is machine code. A worker loads only programs whose digest
matches the one recorded beside them, through an unpickler that admits only the few JAX types
an executable is made of; still, anyone who can write to a run's store can make its workers
run code. Runs that must not trust their store set `"compile_cache": "worker"`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import pathlib
import pickle
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from evojax_nas import layerwise
from evojax_nas.architecture import flops
from evojax_nas.conv import compiler_options, host_instruction_set, resolve_impl
from evojax_nas.dna import DNA, architecture_key
from evojax_nas.errors import ConcurrencyError, EvojaxNasError, NotFoundError, StoreError
from evojax_nas.model import DNANet, variable_shapes
from evojax_nas.steps import (
    TrainConfig,
    TrainState,
    make_eval_step,
    make_optimizer,
    make_train_chunk,
    make_train_step,
)

log = logging.getLogger(__name__)

FORMAT = 1  # of the key and of the shared files; bump when either changes
MAX_PROGRAM_BYTES = 512 * 2**20
CLAIM_WAIT_SECONDS = 300.0  # how long to wait for a program another worker claimed to compile

# The package modules compiled programs are traced from: this one and what it imports,
# transitively (tests/test_import_graph.py checks the list against the import graph).
CODE_MODULES = (
    "architecture", "augment", "conv", "dna", "errors", "layerwise", "model", "programs", "steps",
    "xla_backend",
)  # fmt: skip


def source_digest(folder: str | os.PathLike, modules: tuple[str, ...]) -> str:
    """A digest of the source files `folder/<module>.py`, names included."""
    h = hashlib.sha256()
    for name in sorted(modules):
        h.update(f"{name}\n".encode())
        h.update(hashlib.sha256((pathlib.Path(folder) / f"{name}.py").read_bytes()).digest())
    return h.hexdigest()[:16]


@functools.cache
def code_digest() -> str:
    """This package's code that programs are traced from (`CODE_MODULES`), as a digest. It is
    part of every shared program's key: a run resumed or joined by workers with other code
    compiles its programs afresh instead of loading ones built from different code under the
    same signature (a layer program's signature names its operation and shapes, not its code)."""
    return source_digest(pathlib.Path(__file__).parent, CODE_MODULES)


def code_version() -> dict:
    """What a trained individual's numbers depend on besides its record: this package's code
    (`code_digest`) and the JAX and jaxlib versions. Each record names it, so that `replay` can
    say when a mismatch is only a different version."""
    from jax._src.lib import version_str as jaxlib_version

    return {"package": code_digest(), "jax": jax.__version__, "jaxlib": jaxlib_version}


class Target(NamedTuple):
    """The device programs are compiled for; its platform picks convolution and options.

    `device` is a JAX device, or a TPU topology's compile-only device (`compile_only`).
    """

    platform: str
    device_kind: str
    device: Any = None
    compile_only: bool = False

    @property
    def instruction_set(self) -> str:
        """The host CPU's code-generation features when programs compile for this host's CPU
        (XLA:CPU compiles for the host it runs on), else "". Part of every shared program's
        key, so that a fleet of CPU hosts sharing one store never hands an executable built
        for one instruction set (AVX-512, say) to a host without it."""
        if self.platform != "cpu" or self.compile_only:
            return ""
        return host_instruction_set()

    @classmethod
    def local(cls) -> Target:
        """This process's first device (a worker sees one chip)."""
        device = jax.local_devices()[0]
        return cls(device.platform, device.device_kind, device)

    @classmethod
    def tpu(cls, topology: str = "v4:2x2x1") -> Target:
        """A TPU chip of `topology`, for compiling without TPU hardware (needs libtpu)."""
        import importlib.util

        from jax.experimental import topologies

        if importlib.util.find_spec("libtpu") is None:
            raise EvojaxNasError(
                "compiling for TPU needs libtpu: install the `tpu` extra: pip install -e '.[tpu]'"
            )
        # Compiling only: another process holding libtpu (a test, a worker) must not stop us.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
        except Exception as exc:  # unknown topology, a broken libtpu: say which
            raise EvojaxNasError(
                f"cannot describe TPU topology {topology!r}: {type(exc).__name__}: {exc}"
            ) from None
        device = desc.devices[0]
        return cls("tpu", device.device_kind, device, compile_only=True)


@dataclasses.dataclass(frozen=True)
class Layout:
    """What compiled programs depend on in a dataset: shapes and normalisation constants."""

    train_shape: tuple[int, ...]  # N×H×W×C of the device-resident training images
    dtype: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str

    @classmethod
    def of(cls, dataset) -> Layout:
        return cls(
            tuple(dataset.x_train.shape),
            str(dataset.x_train.dtype),
            tuple(float(m) for m in dataset.mean),
            tuple(float(s) for s in dataset.std),
            dataset.augment,
        )

    @property
    def meta(self) -> dict:
        return {"mean": self.mean, "std": self.std, "augment": self.augment}


class Programs(NamedTuple):
    """The compiled programs of one architecture on one data layout and target."""

    train_chunk: Callable  # (state, batches x, batches y, n, lr) -> state
    eval_batch: Callable  # (params, batch_stats, x, y, mask) -> number correct
    flops_train_step: float  # Ft of a training batch (`architecture.flops`)
    flops_eval_batch: float  # Fv of an evaluation batch
    key: str
    # How this call got them: "compiled", "shared" (the run's store), "memory", or "layers"
    # (layer-wise programs assembled from per-layer programs this worker had: no compile; a
    # layer-wise "shared" loaded some layers from the store, "compiled" compiled some).
    source: str
    seconds: Mapping[str, float]  # trace/lower/compile, or load


def program_key(dna: DNA, layout: Layout, cfg: TrainConfig, target: Target) -> str:
    """A digest of everything the compiled programs depend on."""
    from jax._src.lib import version_str as jaxlib_version

    platform = target.platform
    canon = [
        FORMAT,
        architecture_key(dna),
        dataclasses.astuple(layout),
        [cfg.batch_size, cfg.eval_batch_size, cfg.momentum, cfg.weight_decay],
        chunk_length(layout, cfg),
        resolve_impl(cfg.conv_impl, platform),
        cfg.train_impl,
        sorted(compiler_options(platform).items()),
        platform,
        target.device_kind,
        target.instruction_set,
        jax.__version__,
        jaxlib_version,
        code_digest(),
    ]
    return hashlib.sha256(json.dumps(canon, default=list).encode()).hexdigest()[:24]


def chunk_length(layout: Layout, cfg: TrainConfig) -> int:
    """Training steps per compiled call: `steps_per_dispatch`, at most one epoch."""
    return max(1, min(cfg.steps_per_dispatch, layout.train_shape[0] // cfg.batch_size))


def abstract_args(dna: DNA, layout: Layout, cfg: TrainConfig, target: Target):
    """The abstract arguments (shapes, dtypes, device) of the train chunk and eval programs."""
    sharding = (
        jax.sharding.SingleDeviceSharding(target.device) if target.device is not None else None
    )

    def sds(shape, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)

    variables: dict = {"params": {}, "batch_stats": {}}
    for (coll, module, leaf), shape in variable_shapes(dna).items():
        variables[coll].setdefault(module, {})[leaf] = sds(shape, jnp.float32)
    params, stats = variables["params"], variables["batch_stats"]
    opt = jax.eval_shape(make_optimizer(cfg).init, params)
    opt = jax.tree_util.tree_map(lambda a: sds(a.shape, a.dtype), opt)
    state = TrainState(params, stats, opt, sds((), jnp.bool_))
    k, b, image = chunk_length(layout, cfg), cfg.batch_size, layout.train_shape[1:]
    train = (
        state,
        sds((k, b, *image), jnp.float32),  # prepared batches (`steps.make_batches`)
        sds((k, b), jnp.int32),
        sds((), jnp.int32),
        sds((), jnp.float32),
    )
    eb = cfg.eval_batch_size
    image = (eb, *layout.train_shape[1:])
    evaluation = (
        params,
        stats,
        sds(image, layout.dtype),
        sds((eb,), jnp.int32),
        sds((eb,), jnp.bool_),
    )
    return train, evaluation


def build_layerwise(
    dna: DNA, layout: Layout, cfg: TrainConfig, target: Target, ops: layerwise.OpCache
) -> Programs:
    """The layer-wise programs of `dna` (`evojax_nas.layerwise`): compiles only the layer
    signatures `ops` has not seen."""
    before, t0 = (ops.seconds, ops.compiles, ops.loads), time.perf_counter()
    sharding = (
        jax.sharding.SingleDeviceSharding(target.device) if target.device is not None else None
    )
    net = layerwise.build(
        dna, layout, cfg, resolve_impl(cfg.conv_impl, target.platform), ops, sharding
    )
    compile_s = ops.seconds - before[0]  # compiling and loading the layers it lacked
    seconds = {"compile": compile_s, "plan": time.perf_counter() - t0 - compile_s}
    source = "compiled" if ops.compiles > before[1] else "shared" if ops.loads > before[2] else ""
    return Programs(
        net.train_chunk,
        net.eval_batch,
        *model_flops(dna, layout, cfg),
        program_key(dna, layout, cfg, target),
        source or "layers",
        seconds,
    )


def model_flops(dna: DNA, layout: Layout, cfg: TrainConfig) -> tuple[float, float]:
    """(Ft, Fv): FLOPs of a training step and of an evaluation batch, counted from the
    architecture (`architecture.flops`), so that every implementation reports the same."""
    height, width = layout.train_shape[1:3]
    return (
        flops(dna, height, width, cfg.batch_size, train=True),
        flops(dna, height, width, cfg.eval_batch_size, train=False),
    )


def xla_flops(compiled) -> float:
    """XLA's own FLOP count of a compiled program (a loop body counts once)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX returns one dict per device
        analysis = analysis[0]
    return float((analysis or {}).get("flops", 0.0))


def compile_programs(
    dna: DNA, layout: Layout, cfg: TrainConfig, target: Target
) -> tuple[Programs, tuple[Any, Any]]:
    """Traces, lowers and compiles the programs; returns them and the `Compiled` objects."""
    impl = resolve_impl(cfg.conv_impl, target.platform)
    model = DNANet(dna, conv_impl=impl)
    step = make_train_step(model, make_optimizer(cfg))
    opts = compiler_options(target.platform)
    train_args, eval_args = abstract_args(dna, layout, cfg, target)
    seconds = collections.Counter()
    compiled = []
    for fn, args, donate in (
        (make_train_chunk(step), train_args, (0,)),
        (make_eval_step(model, layout.meta), eval_args, ()),
    ):
        t0 = time.perf_counter()
        traced = jax.jit(fn, donate_argnums=donate, compiler_options=opts).trace(*args)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2 = time.perf_counter()
        compiled.append(lowered.compile())
        t3 = time.perf_counter()
        seconds["trace"] += t1 - t0
        seconds["lower"] += t2 - t1
        seconds["compile"] += t3 - t2
    train_c, eval_c = compiled
    key = program_key(dna, layout, cfg, target)
    programs = Programs(
        train_c, eval_c, *model_flops(dna, layout, cfg), key, "compiled", dict(seconds)
    )
    return programs, (train_c, eval_c)


# ------------------------------------------------------------------ sharing through the store

# The only globals a serialized executable may name (observed in JAX 0.10; AutoLayoutSingleton
# since JAX 0.11); anything else refuses the file, and the worker compiles the program itself.
_ALLOWED_GLOBALS = {
    ("jax", "P"),
    ("jax._src.core", "ManualAxisType"),
    ("jax._src.core", "MemorySpace"),
    ("jax._src.core", "ShapedArray"),
    ("jax._src.interpreters.pxla", "AllArgsInfo"),
    ("jax._src.interpreters.pxla", "UnloadedMeshExecutable"),
    ("jax._src.layout", "AutoLayoutSingleton"),
    ("jax._src.layout", "Layout"),
    ("jax._src.linear_util", "DebugInfo"),
    ("jax._src.mesh", "AbstractMesh"),
    ("jax._src.stages", "ArgInfo"),
    ("jax._src.named_sharding", "_unpickle_named_sharding"),
    ("jax._src.sharding_impls", "_unpickle_single_device_sharding"),
    ("jaxlib._jax", "DeviceList"),
    ("numpy", "dtype"),
}


def serialize(compiled) -> bytes:
    from jax.experimental import serialize_executable

    payload, _, _ = serialize_executable.serialize(compiled)
    return payload


def deserialize(payload: bytes, args: tuple, out_tree, target: Target):
    """A `Compiled` from `serialize`'s bytes, loaded for `target.device`."""
    from jax.experimental.serialize_executable import _JaxPjrtUnpickler

    class _Unpickler(_JaxPjrtUnpickler):
        def find_class(self, module: str, name: str):
            if (module, name) not in _ALLOWED_GLOBALS:
                raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a program")
            return super().find_class(module, name)

    backend = target.device.client
    unloaded, args_flat, no_kwargs = _Unpickler(
        io.BytesIO(payload), backend, [target.device]
    ).load()
    in_tree = jax.tree_util.tree_structure((args, {}))
    return jax.stages.Compiled(
        unloaded.load(), [], in_tree.unflatten(args_flat), out_tree, no_kwargs=no_kwargs
    )


def persistent_cache_active() -> bool:
    """Whether JAX's persistent compilation cache is (or was) on in this process.

    Turning the option off again does not stop a cache JAX already opened, so ask JAX too.
    """
    from jax._src import compilation_cache

    opened = getattr(compilation_cache, "_cache", None) is not None
    return bool(jax.config.jax_compilation_cache_dir) or opened


class SharedPrograms:
    """Compiled programs in a run's store: `programs/<key>/{train,eval}.xla` and `meta.json`.

    The executables are written first and `meta.json` (sizes, digests, FLOPs) last, each with
    a create-only write, so a reader that finds `meta.json` finds complete files.
    """

    def __init__(self, store):
        self.store = store
        self.unusable: set[str] = set()  # keys whose published programs failed to load here

    def _name(self, key: str, leaf: str) -> str:
        return f"programs/{key}/{leaf}"

    def load(self, key: str, dna, layout, cfg, target: Target) -> Programs | None:
        """The shared programs of `key`, or None if there are none (or they are unusable)."""
        try:
            meta = json.loads(self.store.read_blob(self._name(key, "meta.json"), 1 << 16))
        except NotFoundError:
            return None
        t0 = time.perf_counter()
        try:
            train_args, eval_args = abstract_args(dna, layout, cfg, target)
            out = []
            for leaf, args, out_tree in (
                ("train", train_args, jax.tree_util.tree_structure(train_args[0])),
                ("eval", eval_args, jax.tree_util.tree_structure(0)),
            ):
                entry = meta[leaf]
                data = self.store.read_blob(self._name(key, f"{leaf}.xla"), int(entry["bytes"]))
                if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                    raise ValueError(f"{leaf}.xla does not match its digest")
                out.append(deserialize(data, args, out_tree, target))
            flops = float(meta["flops_train_step"]), float(meta["flops_eval_batch"])
        except Exception as exc:  # a damaged or foreign file costs a compile, never the run
            log.warning("shared programs %s unusable (%s); compiling them", key, exc)
            self.unusable.add(key)
            return None
        seconds = {"load": time.perf_counter() - t0}
        return Programs(out[0], out[1], *flops, key, "shared", seconds)

    def save(self, programs: Programs, compiled: tuple[Any, Any]) -> bool:
        """Shares the programs; False if they could not be (the caller releases its claim)."""
        if persistent_cache_active():
            # An executable that JAX's persistent cache handed back serializes incompletely on
            # XLA:CPU (jaxlib 0.10.2: "Function ... not found" in the process that loads it),
            # and JAX does not say which ones came from there: share nothing then.
            log.info("JAX's persistent compilation cache is on: programs are not shared")
            return False
        meta = {
            "format": FORMAT,
            "flops_train_step": programs.flops_train_step,
            "flops_eval_batch": programs.flops_eval_batch,
            "compile_seconds": programs.seconds,
        }
        try:
            for leaf, c in zip(("train", "eval"), compiled, strict=True):
                data = serialize(c)
                self.store.write_blob(self._name(programs.key, f"{leaf}.xla"), data)
                meta[leaf] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            self.store.write_blob(self._name(programs.key, "meta.json"), json.dumps(meta).encode())
        except ConcurrencyError:
            pass  # another worker shared the same programs first
        except (StoreError, ValueError, NotImplementedError) as exc:
            log.warning("could not share programs %s: %s", programs.key, exc)
            return False
        return True

    def claim(self, key: str) -> bool:
        """Claims the compilation of `key`; False when another worker already claimed it."""
        try:
            self.store.write_blob(self._name(key, "claim"), json.dumps(time.time()).encode())
            return True
        except ConcurrencyError:
            return False

    def release(self, key: str) -> None:
        """Withdraws this worker's claim (its compile failed): the others stop waiting."""
        try:
            self.store.delete_blob(self._name(key, "claim"))
        except StoreError as exc:
            log.warning("could not release the claim on programs %s: %s", key, exc)

    def wait(self, key: str, dna, layout, cfg, target: Target, timeout: float):
        """Waits for the programs another worker claimed, up to `timeout` seconds after its
        claim; None if they do not come (the claimer died, or its compile failed)."""
        try:
            claimed_at = float(json.loads(self.store.read_blob(self._name(key, "claim"), 64)))
        except (NotFoundError, ValueError, TypeError):
            claimed_at = time.time()  # released meanwhile, or unreadable: one short look
            timeout = 0.0
        end = time.monotonic() + max(0.0, claimed_at + timeout - time.time())
        pause = 0.05
        while True:
            found = self.load(key, dna, layout, cfg, target)
            if found is not None or key in self.unusable or time.monotonic() >= end:
                return found
            time.sleep(pause)
            pause = min(pause * 1.5, 2.0)
        return None


LAYER_HEADER = b"evojax-nas layer program\n"  # then a JSON line, then the executable
LAYER_MAX_BYTES = 64 * 2**20


def _spec_tree(spec: Any):
    """The tree structure of a program's outputs from their JSON form: "*" for an array, a
    list for a tuple; anything else (a dict: not made by `SharedLayers.save`) for a leaf."""
    as_tuples = lambda x: tuple(map(as_tuples, x)) if isinstance(x, list | tuple) else 0  # noqa: E731
    return jax.tree_util.tree_structure(as_tuples(spec))


class SharedLayers:
    """Compiled layer programs (`layerwise.OpCache`) in a run's store, one create-only blob per
    signature: `programs/layers-<environment>/<signature digest>`.

    The environment digest covers what an executable depends on besides its signature (this
    format, platform, device kind, a CPU host's instruction set (`Target.instruction_set`), JAX
    and jaxlib versions, the package's code: `code_digest`;
    the compiler options go into each signature's digest). A blob holds a header, a JSON line
    (the executable's SHA-256 and the structure of its outputs) and the serialized executable;
    one that fails to load (damaged, foreign) costs a compile, never the run. On a CPU loading
    one took 3.2 ms, compiling it 58.9 ms, taking it from JAX's persistent cache 19.5 ms (a
    default job's first 100 architectures: `scripts/bench_layerwise.py --second-worker`).
    """

    def __init__(self, store, target: Target):
        from jax._src.lib import version_str as jaxlib_version

        self.store = store
        self.target = target
        env = [
            FORMAT, target.platform, target.device_kind, target.instruction_set,
            jax.__version__, jaxlib_version, code_digest(),
        ]  # fmt: skip
        digest = hashlib.sha256(json.dumps(env).encode()).hexdigest()[:16]
        self.folder = f"programs/layers-{digest}"
        self.unusable: set[str] = set()  # names that failed to load here: compiled instead

    def name(self, sig: tuple, options: Mapping[str, Any]) -> str:
        canon = repr((sig, sorted(options.items())))
        return f"{self.folder}/{hashlib.sha256(canon.encode()).hexdigest()[:32]}"

    def load(self, sig: tuple, options: Mapping[str, Any], args: tuple):
        """The shared program of `sig` for abstract `args`, or None (none yet, or unusable)."""
        name = self.name(sig, options)
        if name in self.unusable:
            return None
        try:
            blob = self.store.read_blob(name, LAYER_MAX_BYTES)
        except NotFoundError:
            return None
        except (StoreError, OSError) as exc:
            log.warning("could not read shared layer program %s: %s", name, exc)
            return None
        try:
            if not blob.startswith(LAYER_HEADER):
                raise ValueError("not a layer program")
            line, payload = blob[len(LAYER_HEADER) :].split(b"\n", 1)
            meta = json.loads(line)
            if hashlib.sha256(payload).hexdigest() != meta["sha256"]:
                raise ValueError("the executable does not match its digest")
            compiled = deserialize(payload, args, _spec_tree(meta["outputs"]), self.target)
            compiled.out_info  # noqa: B018  (raises if its outputs do not fit that structure)
            return compiled
        except Exception as exc:  # a damaged or foreign blob costs a compile, never the run
            log.warning("shared layer program %s unusable (%s); compiling it", name, exc)
            self.unusable.add(name)
            return None

    def save(self, sig: tuple, options: Mapping[str, Any], compiled) -> bool:
        """Shares a program this worker compiled (not one JAX's persistent cache handed back:
        see `SharedPrograms.save`); False if it was not shared (outputs other than arrays in
        nested tuples, a storage failure). Another worker's copy of it is as good."""
        tree = compiled.out_tree
        outputs = tree.unflatten(["*"] * tree.num_leaves)  # JSON: tuples become lists
        if _spec_tree(outputs) != tree:  # not an array or nested tuples of arrays
            return False
        try:
            payload = serialize(compiled)
            meta = {"sha256": hashlib.sha256(payload).hexdigest(), "outputs": outputs}
            blob = LAYER_HEADER + json.dumps(meta).encode() + b"\n" + payload
            self.store.write_blob(self.name(sig, options), blob)
        except ConcurrencyError:
            pass  # another worker shared it first
        except (StoreError, OSError, ValueError, NotImplementedError) as exc:
            log.warning("could not share a layer program: %s", exc)
            return False
        return True


class ProgramCache:
    """Programs by key: memory (LRU), then the run's store, then compiling. Thread-safe.

    Attributes:
        counts: how programs were obtained: "memory", "shared", "compiled", "waited" (loaded
            after waiting for another worker's compile), "layers" (see `Programs.source`).
    """

    def __init__(
        self,
        target: Target | None = None,
        shared: SharedPrograms | None = None,
        capacity: int = 32,
        claim_wait: float = CLAIM_WAIT_SECONDS,
    ):
        self.target = target if target is not None else Target.local()
        self.shared = shared
        self.capacity = capacity
        self.claim_wait = claim_wait
        self.counts: collections.Counter = collections.Counter()
        self._memory: collections.OrderedDict[str, Programs] = collections.OrderedDict()
        self._pending: dict[str, concurrent.futures.Future] = {}
        self._prefetched: set[str] = set()  # prefetched, not yet used by `get`
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # Per-layer programs of `train_impl: "layerwise"`, shared by all its architectures (and,
        # through the run's store, with the run's other workers).
        layers = None
        if shared is not None and not self.target.compile_only:
            layers = SharedLayers(shared.store, self.target)
        self.layers = layerwise.OpCache(
            layerwise.compiler_options(self.target.platform), shared=layers
        )

    def get(self, dna: DNA, layout: Layout, cfg: TrainConfig) -> Programs:
        """The programs for `dna`, waiting for a prefetch of them if one is running."""
        key = program_key(dna, layout, cfg, self.target)
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                if key in self._prefetched:  # its first use: say how the prefetch got it
                    self._prefetched.discard(key)
                    return self._memory[key]
                self.counts["memory"] += 1
                return self._memory[key]._replace(source="memory")
            future = self._pending.get(key)
        if future is not None:
            programs = future.result()
            with self._lock:
                self._prefetched.discard(key)
            return programs
        return self._obtain(key, dna, layout, cfg)

    def prefetch(self, dna: DNA, layout: Layout, cfg: TrainConfig) -> None:
        """Starts obtaining the programs for `dna` in a background thread; returns at once."""
        key = program_key(dna, layout, cfg, self.target)
        with self._lock:
            if key in self._memory or key in self._pending:
                return
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="evojax-nas-compile"
                )
            future = self._pool.submit(self._obtain, key, dna, layout, cfg)
            self._pending[key] = future
            self._prefetched.add(key)
        future.add_done_callback(lambda _: self._forget(key))

    def prepare(self, dna: DNA, layout: Layout, cfg: TrainConfig) -> None:
        """Obtains the programs for `dna` in this thread now (if no prefetch is getting them);
        the next `get` returns them as a prefetch's, saying how they were obtained."""
        key = program_key(dna, layout, cfg, self.target)
        with self._lock:
            if key in self._memory or key in self._pending:
                return
        self._obtain(key, dna, layout, cfg)
        with self._lock:
            if key in self._memory:
                self._prefetched.add(key)

    def _forget(self, key: str) -> None:
        with self._lock:
            self._pending.pop(key, None)

    def _obtain(self, key: str, dna: DNA, layout: Layout, cfg: TrainConfig) -> Programs:
        if cfg.train_impl == "layerwise":  # per-layer programs: cheap, kept by each worker
            programs = build_layerwise(dna, layout, cfg, self.target, self.layers)
            return self._remember(key, programs)
        programs, claimed = None, False
        if self.shared is not None:
            programs = self.shared.load(key, dna, layout, cfg, self.target)
            if programs is None and key not in self.shared.unusable:  # none published yet
                claimed = self.shared.claim(key)
                if not claimed:
                    programs = self.shared.wait(key, dna, layout, cfg, self.target, self.claim_wait)
                    if programs is not None:
                        self.counts["waited"] += 1
        if programs is None:
            try:
                programs, compiled = compile_programs(dna, layout, cfg, self.target)
            except BaseException:
                if claimed:
                    self.shared.release(key)
                raise
            shared = self.shared is not None and not self.target.compile_only
            if shared and not self.shared.save(programs, compiled) and claimed:
                self.shared.release(key)
        return self._remember(key, programs)

    def _remember(self, key: str, programs: Programs) -> Programs:
        with self._lock:
            self.counts[programs.source] += 1
            self._memory[key] = programs
            while len(self._memory) > self.capacity:
                self._prefetched.discard(self._memory.popitem(last=False)[0])
        return programs

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class CompileCounter:
    """Counts XLA backend compiles in this process while active (a context manager).

    Tracing is not compiling: a jit cache hit, a shared program or a memory hit count 0, and so
    does a program loaded from JAX's persistent compilation cache (counted in `cache_hits`;
    JAX reports its retrieval as a backend compile too).
    """

    def __init__(self):
        self._requests = 0
        self.cache_hits = 0

    @property
    def count(self) -> int:
        return self._requests - self.cache_hits

    def _duration(self, event: str, duration: float, **_: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self._requests += 1

    def _event(self, event: str, **_: Any) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1

    def __enter__(self) -> CompileCounter:
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)
        return self

    def __exit__(self, *exc) -> None:
        from jax._src import monitoring

        monitoring.unregister_event_duration_listener(self._duration)
        monitoring.unregister_event_listener(self._event)

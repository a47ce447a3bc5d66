"""Would per-layer compiled programs end the compile bottleneck? A measurement (issue 9).

    .venv/bin/python scripts/bench_layerwise.py                   # a seeded mutation chain
    .venv/bin/python scripts/bench_layerwise.py --run RUN_DIR --limit 40   # a run's children
    .venv/bin/python scripts/bench_layerwise.py --tiny --json     # seconds: the test's mode
    .venv/bin/python scripts/bench_layerwise.py --run RUN_DIR --limit 80 --compare-options
    .venv/bin/python scripts/bench_layerwise.py --run RUN_DIR --limit 80 --second-worker
    .venv/bin/python scripts/bench_layerwise.py --run RUN_DIR --limit 100 --layers-only
    .venv/bin/python scripts/bench_layerwise.py --run RUN_DIR --limit 100000 --by-op
    .venv/bin/python scripts/bench_layerwise.py --run RUN_DIR --limit 100000 --signatures
    .venv/bin/python scripts/bench_layerwise.py --run RUN_DIR --limit 100 --compare-options padding

With `train_impl: "whole"` a worker compiles two whole programs per new architecture
(`programs.compile_programs`: a chunk of training steps and an evaluation batch). This benchmark
compares that, in one process and architecture by architecture, with `train_impl: "layerwise"`
(`evojax_nas.layerwise`, which began as this script's prototype): every operation of the net
has its own small compiled program, cached by its signature (operation, static numbers,
argument shapes and dtypes) across all the architectures of the sequence, and Python runs a
training step as a sequence of calls:

- forward, in topological order: one program per convolution edge (`conv.conv2d`, the
  package's convolution) and one per merging or BN+ReLU vertex (`model.resolve_inputs`, then
  BN in train mode: `nn.BatchNorm`'s arithmetic, written out); the activations are kept as the
  backward pass's residuals;
- the head (global pool, dense layer, softmax cross-entropy) forward and backward in one call;
- backward, in reverse order: each operation's VJP recomputed from its kept inputs (XLA drops
  the forward work the VJP does not need: convolutions and merges are linear; BN recomputes its
  batch statistics), fused with the SGD-momentum update of that operation's own parameters
  (weight decay on convolution kernels only, momentum 0.9, as `steps.make_optimizer`): an
  update is per parameter, so fusing it changes nothing; fan-out gradients are summed by one
  more cached program per shape.
- evaluation: the same forward programs at the evaluation batch (BN on its running averages).

So a new architecture compiles only the signatures no earlier architecture had. Both paths
train on the same prepared batches (synthetic data in the layout of the dataset: the input
pipeline is one program per worker for the whole run in either case, so it is left out), and
evaluate the same number of validation batches. Before timing, the layer-wise driver is
checked against the whole program on one architecture: the gradients (the momentum buffers
after one step from zero are gradient + weight decay) and the parameters, batch statistics and
momenta after one and a few steps must agree (allclose).

Printed per architecture and in total: trace+lower+compile seconds of each path, seconds for
the child's training steps and for its evaluation, the projected non-training share
(compile + evaluation) and children per minute at 200 / 800 / 2000 steps per child, with
every child a new architecture and with the share of new architectures of a real run
(`--new-fraction`, or measured from `--run`'s records); plus distinct layer signatures against
architectures. Selection, mutation and publishing cost the same in both paths and are left out.

Measured with the prototype (commit 3330412, before few-channel convolutions ran as tap sums)
on the 2-core development machine under `nice -n 10` while the lead's campaign ran
(load average 6-8.5), mnist5k layout, 200 steps per child (JAX 0.10.2):

- `--mutations 80 --limit 40` (40 distinct architectures, 0-3 convolutions): 148 layer
  signatures; compile 69.6 s whole vs 17.8 s layer-wise, training 8.5 vs 11.5 s. Projected
  children/min, every child new: 2.66x at 200 steps, 1.63x at 800, 1.16x at 2000; with 48 % of
  children new: 2.10x, 1.25x, 0.96x. Check: max abs error 9.2e-8 (gradients, state, loss).
- `--run .../evolution-s0` (the 10-minute default job: 237 architectures in 491 children),
  the first 176 architectures (2-6 convolutions, median 4; the run was stopped when the
  campaign starved it): 559 signatures, 79 architectures compiled no new one; compile 388.7 s
  whole vs 65.3 s layer-wise, training 123.9 vs 151.7 s (median 1.26x slower per child).
  Non-training share at 200 steps, every child new: 76 % whole vs 34 % layer-wise, 2.30x the
  children/min (1.31x at 800 steps, 1.03x at 2000); with the run's 48 % new: 62 % vs 22 %,
  1.66x (1.07x at 800, 0.92x at 2000).
- `--run .../evolution-s0 --start 176 --limit 30` (the run's last, largest architectures, 5-7
  convolutions, from a cold signature cache) while the campaign's workers (nice 0) starved
  this process (compiles 4-7x slower than above): 221 signatures; compile 457.5 s whole vs
  144.1 s layer-wise, but training 185.6 vs 406.8 s (2.2x slower): the Python driver's ~30
  calls per step wait for a CPU. 1.16x children/min at 200 steps if every child is new,
  0.85x with 48 % new, 0.55x at 2000 steps. Check on a 7-convolution net: bit-identical.
- One call of a compiled program costs 16-52 us of dispatch here under that load (a scalar
  add, 5000 calls): ~0.5-1.5 ms per step of a 30-call net, most of the layer-wise training
  overhead; the rest is no fusion across layers and BN's statistics computed again backward.

`--compare-options [unrolling|emitters]` times, instead, the layer programs under their XLA
options (`layerwise.compiler_options`) against the options before them: `unrolling` (the
default), the same with LLVM's loop unrolling on (`layerwise.options_before_backend_options`;
on a CPU with AVX-512 the two are the same); `emitters`, the same with XLA:CPU's MLIR fusion
emitters (`layerwise.options_before_legacy_emitters`), architecture by architecture in
alternating order, each with its own cold signature cache, and prints the ratios (before ÷ now)
of compile and training seconds. Their numbers differ only by float rounding: the counts of
correct validation answers (random labels) may differ by at most 0.1 % of the answers, or the
script fails. Measured figures: README, "Layer-wise training".

`--compare-options padding` times the layer programs with their channel padding
(`layerwise.CHANNEL_PADDING`, or `--channel-padding MULTIPLE,ABOVE`: depths above ABOVE padded
with zero channels to a multiple of MULTIPLE) against none, the same way; `--signatures` only
counts the distinct layer signatures of the architectures both ways (`jax.eval_shape` per
operation: nothing compiles or trains). Measured figures: README, "Layer-wise training".

`--second-worker` measures what sharing layer programs through the run's store
(`programs.SharedLayers`) saves a run's other workers: a first worker compiles the
architectures' layer programs into a store in a temporary directory, then a second worker (its
own cold signature cache) builds, trains and evaluates the same architectures, loading every
signature from the store. Printed: seconds to obtain the layer programs (compile or load) and
to build the nets for each, the ratio, the store's bytes per program; the two workers' correct
answers must be equal (the same executables), or the script fails.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

STEP_COUNTS = (200, 800, 2000)
CAMPAIGN_NEW_FRACTION = 237 / 491  # the 10-minute default job: 237 of 491 children were new


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", metavar="DIR", help="a local run directory: its children's DNAs")
    p.add_argument("--start", type=int, default=0, help="skip this many of the run's archs")
    p.add_argument("--limit", type=int, default=40, help="architectures to measure at most")
    p.add_argument("--mutations", type=int, default=80, help="seeded chain length (no --run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=200, help="training steps per child")
    p.add_argument("--dataset", choices=("mnist5k", "digits8x8"), default="mnist5k")
    p.add_argument(
        "--new-fraction",
        type=float,
        default=None,
        help=f"share of children that are new architectures (default: measured from --run, "
        f"else {CAMPAIGN_NEW_FRACTION:.2f}, the 10-minute default job's)",
    )
    p.add_argument(
        "--compare-options",
        nargs="?",
        const="unrolling",
        choices=("unrolling", "emitters", "padding"),
        help="layer-wise only: its XLA options now against those before the last change "
        "(unrolling, the default: LLVM loop unrolling on) or before the legacy fusion emitters; "
        "or its channel padding against none (padding)",
    )
    p.add_argument(
        "--second-worker",
        action="store_true",
        help="layer-wise only: a second worker loading the first one's layers from a store",
    )
    p.add_argument(
        "--layers-only",
        action="store_true",
        help="layer-wise only, totals and signatures by operation (run it in two checkouts to "
        "compare them)",
    )
    p.add_argument(
        "--by-op",
        action="store_true",
        help="every distinct layer signature compiled afresh, one by one: trace, lower and "
        "compile milliseconds by operation (where compiling goes; nothing is trained)",
    )
    p.add_argument(
        "--signatures",
        action="store_true",
        help="distinct layer signatures of the architectures, with channel padding and without "
        "(nothing is compiled or trained: seconds for a whole run)",
    )
    p.add_argument(
        "--channel-padding",
        metavar="MULTIPLE,ABOVE",
        help="layer-wise: pad depths above ABOVE to a multiple of MULTIPLE instead of "
        "`layerwise.CHANNEL_PADDING` (1,0: none)",
    )
    p.add_argument("--tiny", action="store_true", help="a few tiny architectures (the test)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--save", metavar="FILE", help="also write the JSON object to FILE")
    args = p.parse_args(argv)
    if args.tiny:
        args.mutations, args.steps, args.limit, args.dataset = 12, 4, 3, "digits8x8"
    return args


# The data layouts of the datasets (as `programs.Layout.of` reads them), without loading them.
LAYOUTS = {
    "mnist5k": dict(
        train=(3500, 28, 28, 1), n_val=1500, mean=(33.3,), std=(78.6,), augment="digits"
    ),
    "digits8x8": dict(train=(1257, 8, 8, 1), n_val=540, mean=(78.0,), std=(96.0,), augment="none"),
}


# ------------------------------------------------------------------------- the architectures


def chain_dnas(mutations: int, seed: int, channels: int, classes: int) -> list:
    """The distinct architectures of a seeded mutation chain from the initial individual."""
    import jax

    from evojax_nas import dna as D
    from evojax_nas.mutations import mutate

    dna, key = D.initial_dna(channels, classes, 0.1), jax.random.PRNGKey(seed)
    out, seen = [dna], {D.architecture_key(dna)}
    for i in range(mutations):
        dna, _, _ = mutate(dna, None, jax.random.fold_in(key, i))
        if D.architecture_key(dna) not in seen:
            seen.add(D.architecture_key(dna))
            out.append(dna)
    return out


def run_dnas(root: str) -> tuple[list, float]:
    """A run's distinct architectures in the order they were born, and the share of new ones."""
    from evojax_nas import dna as D

    born = []
    for path in glob.glob(os.path.join(root, "inds", "*", "record.json")):
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if record.get("born"):
            born.append((record["born"], os.path.dirname(path)))
    born.sort()
    out, seen = [], set()
    for _, ind in born:
        dna = D.load(os.path.join(ind, "dna.json"))
        if D.architecture_key(dna) not in seen:
            seen.add(D.architecture_key(dna))
            out.append(dna)
    return out, len(out) / max(len(born), 1)


# ------------------------------------------------------------------------------ the benchmark


class Bench:
    """Both paths over one data layout: the whole-program path and the layer-wise driver."""

    def __init__(self, dataset: str, steps: int, seed: int, padding: str | None = None):
        import jax
        import numpy as np

        from evojax_nas.conv import resolve_impl
        from evojax_nas.layerwise import CHANNEL_PADDING, OpCache, compiler_options
        from evojax_nas.programs import Layout, Target, chunk_length
        from evojax_nas.steps import TrainConfig

        spec = LAYOUTS[dataset]
        self.layout = Layout(spec["train"], "uint8", spec["mean"], spec["std"], spec["augment"])
        self.cfg = TrainConfig(steps=steps)
        self.target = Target.local()
        self.impl = resolve_impl(self.cfg.conv_impl, self.target.platform)
        self.options = compiler_options(self.target.platform)
        self.cache = OpCache(self.options)
        self.channel_padding = CHANNEL_PADDING
        if padding:
            self.channel_padding = tuple(int(x) for x in padding.split(","))
        self.image = spec["train"][1:]
        rng = np.random.default_rng(seed)
        k, b = chunk_length(self.layout, self.cfg), self.cfg.batch_size
        # Prepared (normalised) training batches, as `steps.make_batches` makes them.
        self.xbs = jax.device_put(rng.standard_normal((k, b, *self.image)).astype(np.float32))
        self.ybs = jax.device_put(rng.integers(0, 10, (k, b)).astype(np.int32))
        eb, n_val = self.cfg.eval_batch_size, spec["n_val"]
        self.val = []
        for i in range(-(-n_val // eb)):
            x = rng.integers(0, 256, (eb, *self.image)).astype(np.uint8)
            y = rng.integers(0, 10, eb).astype(np.int32)
            mask = np.arange(i * eb, (i + 1) * eb) < n_val
            self.val.append(tuple(jax.device_put(a) for a in (x, y, mask)))
        jax.block_until_ready((self.xbs, self.ybs, self.val))
        self.key = jax.random.PRNGKey(seed)

    def net(self, dna, cache=None):
        """The package's layer-wise net (`evojax_nas.layerwise`) on this benchmark's cache."""
        from evojax_nas import layerwise

        cache = cache if cache is not None else self.cache
        return layerwise.build(
            dna, self.layout, self.cfg, self.impl, cache, channel_padding=self.channel_padding
        )

    def chunks(self, steps: int) -> list[int]:
        """The chunk lengths `train.run_training` runs: at most `chunk_length`, per epoch."""
        from evojax_nas.programs import chunk_length

        k = chunk_length(self.layout, self.cfg)
        per_epoch = self.layout.train_shape[0] // self.cfg.batch_size
        out, step = [], 0
        while step < steps:
            n = min(k, per_epoch - step % per_epoch, steps - step)
            out.append(n)
            step += n
        return out

    def _train(self, programs, variables, steps: int):
        """`train.run_training`'s chunks over the prepared batches; returns the state."""
        import jax
        import numpy as np

        from evojax_nas.train import initial_state

        state = initial_state(variables, self.cfg)
        lr = np.float32(0.05)
        for n in self.chunks(steps):
            state = programs.train_chunk(state, self.xbs, self.ybs, np.int32(n), lr)
            if bool(state.bad):  # run_training's divergence check, once per chunk
                break
        return jax.block_until_ready(state)

    def _run(self, variables, get_programs) -> dict:
        t0 = time.perf_counter()
        programs = get_programs()
        t1 = time.perf_counter()
        state = self._train(programs, variables, self.cfg.steps)
        t2 = time.perf_counter()
        correct = sum(
            int(programs.eval_batch(state.params, state.batch_stats, *v)) for v in self.val
        )
        t3 = time.perf_counter()
        return {"compile": t1 - t0, "train": t2 - t1, "eval": t3 - t2, "correct": correct}

    def whole(self, dna, variables) -> dict:
        """The whole-program path: compile both programs, train the child's steps, evaluate."""
        from evojax_nas.programs import compile_programs

        return self._run(
            variables, lambda: compile_programs(dna, self.layout, self.cfg, self.target)[0]
        )

    def layerwise(self, dna, variables) -> dict:
        """The layer-wise path: compile the new signatures, train the child's steps, evaluate."""
        before_s, before_n = self.cache.seconds, len(self.cache)
        nets = []

        def build():
            nets.append(self.net(dna))
            return nets[-1]

        out = self._run(variables, build)
        out["compile_new_signatures"] = self.cache.seconds - before_s
        out["new_signatures"] = len(self.cache) - before_n
        out["calls_per_step"] = nets[0].calls_per_step
        return out

    def check(self, dna, steps: int = 3) -> dict:
        """Whole program against layer-wise net on `dna`: variables and momenta (allclose)."""
        import jax
        import jax.numpy as jnp
        import numpy as np

        from evojax_nas.layerwise import OpCache, momentum_buffers
        from evojax_nas.model import init_variables
        from evojax_nas.programs import compile_programs

        variables = init_variables(dna, self.key)
        programs, _ = compile_programs(dna, self.layout, self.cfg, self.target)
        net = self.net(dna, OpCache(self.options))  # its own cache: the timed one stays cold
        errors, ok = {}, True
        for n in (1, steps):
            want, got = (self._train(p, variables, n) for p in (programs, net))
            pairs = {
                "variables": ((want.params, want.batch_stats), (got.params, got.batch_stats)),
                "momenta" if n > 1 else "gradients": (
                    momentum_buffers(want.opt_state),
                    momentum_buffers(got.opt_state),
                ),
            }
            for what, (a, b) in pairs.items():
                a, b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
                assert len(a) == len(b), what
                err = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b, strict=True))
                scale = max(float(jnp.max(jnp.abs(x))) for x in a)
                close = all(
                    np.allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-5 * max(scale, 1))
                    for x, y in zip(a, b, strict=True)
                )
                errors[f"{what} after {n} step{'s' * (n > 1)}"] = {
                    "max_abs_err": err,
                    "max_abs": scale,
                }
                ok = ok and close
        return {"ok": ok, "errors": errors}


def describe_counts(dna) -> dict:
    from evojax_nas.architecture import resolve

    arch = resolve(dna)
    return {
        "convs": sum(e.is_conv for e in dna.edges),
        "bn_relu": sum(v.kind == "bn_relu" for v in dna.vertices),
        "merges": sum(len(arch.inputs[v]) > 1 for v in arch.order),
    }


def project(rows: list, path: str, new_fraction: float, steps: int, measured_steps: int) -> dict:
    """Per child: new_fraction × compile + train (scaled to `steps`) + eval, averaged."""
    n = len(rows)
    compile_s = sum(r[path]["compile"] for r in rows) / n
    train_s = sum(r[path]["train"] for r in rows) / n * steps / measured_steps
    eval_s = sum(r[path]["eval"] for r in rows) / n
    child = new_fraction * compile_s + train_s + eval_s
    return {
        "non_training_share": (child - train_s) / child,
        "compile_share": new_fraction * compile_s / child,
        "children_per_minute": 60 / child,
    }


def bench(args) -> dict:
    import jax

    from evojax_nas import dna as D
    from evojax_nas.model import init_variables
    from evojax_nas.samples import read_dna

    dnas, source, run_fraction = _sequence(args)
    new_fraction = args.new_fraction
    for fallback in (run_fraction, CAMPAIGN_NEW_FRACTION):
        new_fraction = fallback if new_fraction is None else new_fraction
    b = Bench(args.dataset, args.steps, args.seed, args.channel_padding)
    rows = []
    for i, dna in enumerate(dnas):
        dna = D.for_data(dna, 1, 10)
        variables = init_variables(dna, jax.random.fold_in(b.key, i))
        row = {"index": i, "architecture": D.describe(dna), **describe_counts(dna)}
        order = ("whole", "layerwise") if i % 2 == 0 else ("layerwise", "whole")
        for path in order:  # alternating, so that load drift hits both alike
            row[path] = getattr(b, path)(dna, variables)
        rows.append(row)
        if not args.json:
            print_row(row, args.steps)
        if args.save:  # a partial result survives an interrupted run
            with open(args.save, "w", encoding="utf-8") as f:
                json.dump({"partial": True, "source": source, "rows": rows}, f)
    check_dna = max(dnas, key=lambda d: (describe_counts(d)["convs"], len(d.edges)))
    checks = {
        "most convolutions of the sequence": b.check(D.for_data(check_dna, 1, 10)),
        "small_conv sample": b.check(D.for_data(read_dna("small_conv"), 1, 10)),
    }
    projection = {
        f"{fraction_name} new, {steps} steps": {
            path: project(rows, path, fraction, steps, args.steps)
            for path in ("whole", "layerwise")
        }
        for fraction_name, fraction in (("all", 1.0), (f"{new_fraction:.2f}", new_fraction))
        for steps in STEP_COUNTS
    }
    totals = {
        path: {k: sum(r[path][k] for r in rows) for k in ("compile", "train", "eval")}
        for path in ("whole", "layerwise")
    }
    return {
        "source": source,
        "dataset_layout": args.dataset,
        "steps": args.steps,
        "architectures": len(rows),
        "signatures": len(b.cache),
        "signatures_by_op": _count_ops(b.cache._ops),
        "new_fraction": new_fraction,
        "rows": rows,
        "totals": totals,
        "projection": projection,
        "check": {"ok": all(c["ok"] for c in checks.values()), **checks},
        "load_average": os.getloadavg(),
        "jax": jax.__version__,
    }


def compare_options(args) -> dict:
    """Layer programs under `layerwise.compiler_options` ("now") against the options before the
    change `args.compare_options` names ("before"): compile and training seconds over the same
    architectures."""
    import jax

    from evojax_nas import dna as D
    from evojax_nas import layerwise
    from evojax_nas.layerwise import OpCache
    from evojax_nas.model import init_variables

    dnas, source, _ = _sequence(args)
    b = Bench(args.dataset, args.steps, args.seed, args.channel_padding)
    before_options = {
        "unrolling": layerwise.options_before_backend_options,
        "emitters": layerwise.options_before_legacy_emitters,
        "padding": layerwise.compiler_options,
    }[args.compare_options]
    options = {"now": b.options, "before": before_options(b.target.platform)}
    paddings = {"now": b.channel_padding, "before": b.channel_padding}
    if args.compare_options == "padding":
        paddings["before"] = (1, 0)
    caches = {name: OpCache(opts) for name, opts in options.items()}
    totals = {name: {"compile": 0.0, "train": 0.0, "eval": 0.0, "correct": 0} for name in caches}
    for i, dna in enumerate(dnas):
        dna = D.for_data(dna, 1, 10)
        variables = init_variables(dna, jax.random.fold_in(b.key, i))
        for name in ("now", "before") if i % 2 == 0 else ("before", "now"):
            b.cache, b.channel_padding = caches[name], paddings[name]
            row = b.layerwise(dna, variables)
            t = totals[name]
            t["compile"] += row["compile_new_signatures"]
            t["train"] += row["train"]
            t["eval"] += row["eval"]
            t["correct"] += row["correct"]
    ratio = {
        k: totals["before"][k] / max(totals["now"][k], 1e-9) for k in ("compile", "train", "eval")
    }
    answers = len(dnas) * LAYOUTS[args.dataset]["n_val"]  # validation answers counted per path
    differ = abs(totals["now"]["correct"] - totals["before"]["correct"])
    return {
        "source": source,
        "architectures": len(dnas),
        "steps": args.steps,
        "signatures": len(caches["now"]),
        "signatures_before": len(caches["before"]),
        "compared": args.compare_options,
        "channel_padding": paddings,
        "options": {k: {o: str(v) for o, v in opts.items()} for k, opts in options.items()},
        "totals": totals,
        "ratio_before_over_now": ratio,
        "answers": answers,
        "answers_differ_by": differ,
        "agree": differ <= 0.001 * answers,
        "load_average": os.getloadavg(),
        "jax": jax.__version__,
    }


def layers_only(args) -> dict:
    """The layer-wise path alone over the architectures: compile (new signatures), training and
    evaluation seconds, correct answers, and the signatures by operation."""
    import jax

    from evojax_nas import dna as D
    from evojax_nas.model import init_variables

    dnas, source, _ = _sequence(args)
    b = Bench(args.dataset, args.steps, args.seed, args.channel_padding)
    totals = {"compile": 0.0, "train": 0.0, "eval": 0.0, "correct": 0}
    for i, dna in enumerate(dnas):
        dna = D.for_data(dna, 1, 10)
        row = b.layerwise(dna, init_variables(dna, jax.random.fold_in(b.key, i)))
        totals["compile"] += row["compile_new_signatures"]
        for k in ("train", "eval", "correct"):
            totals[k] += row[k]
    return {
        "source": source,
        "architectures": len(dnas),
        "steps": args.steps,
        "signatures": len(b.cache),
        "signatures_by_op": _count_ops(b.cache._ops),
        "totals": totals,
        "agree": True,  # nothing to compare within one checkout
        "load_average": os.getloadavg(),
        "jax": jax.__version__,
    }


def print_layers_only(out: dict) -> None:
    t = out["totals"]
    print(
        f"{out['architectures']} architectures ({out['source']}), {out['steps']} steps each: "
        f"{out['signatures']} layer signatures {out['signatures_by_op']}\n"
        f"  compile {t['compile']:7.2f} s  train {t['train']:7.2f} s  eval {t['eval']:6.2f} s  "
        f"correct {t['correct']}\nload average " + " ".join(f"{x:.2f}" for x in out["load_average"])
    )


class SignatureRecorder:
    """An `OpCache` stand-in that compiles nothing: it records each distinct signature (the
    factory, its statics and the abstract arguments) and hands back only the output shapes."""

    def __init__(self):
        self.signatures: dict = {}
        self._outputs: dict = {}  # signature -> its stand-in, traced once (a run repeats most)

    def get(self, factory, statics: tuple, args: list):
        import types

        import jax

        sig = (factory.__name__, statics, tuple((tuple(a.shape), str(a.dtype)) for a in args))
        if sig not in self._outputs:
            self.signatures[sig] = (factory, statics, list(args))
            out_info = jax.eval_shape(factory(*statics), *args)
            self._outputs[sig] = types.SimpleNamespace(out_info=out_info)
        return self._outputs[sig]


def by_op(args) -> dict:
    """Every distinct layer signature of the architectures, compiled afresh one by one (JAX's
    persistent cache off): trace, lower (JAX) and compile (XLA) seconds by operation."""
    import jax

    from evojax_nas import dna as D
    from evojax_nas import layerwise

    dnas, source, _ = _sequence(args)
    b = Bench(args.dataset, args.steps, args.seed, args.channel_padding)
    recorder = SignatureRecorder()
    for dna in dnas:
        layerwise.build(
            D.for_data(dna, 1, 10),
            b.layout,
            b.cfg,
            b.impl,
            recorder,
            channel_padding=b.channel_padding,
        )
    ops: dict = {}
    was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        for factory, statics, abstract in recorder.signatures.values():
            t0 = time.perf_counter()
            traced = jax.jit(factory(*statics), compiler_options=b.options).trace(*abstract)
            t1 = time.perf_counter()
            lowered = traced.lower()
            t2 = time.perf_counter()
            lowered.compile()
            t3 = time.perf_counter()
            row = ops.setdefault(factory.__name__, dict(count=0, trace=0.0, lower=0.0, compile=0.0))
            row["count"] += 1
            row["trace"] += t1 - t0
            row["lower"] += t2 - t1
            row["compile"] += t3 - t2
    finally:
        jax.config.update("jax_enable_compilation_cache", was)
    total = sum(r["trace"] + r["lower"] + r["compile"] for r in ops.values())
    return {
        "source": source,
        "architectures": len(dnas),
        "signatures": len(recorder.signatures),
        "seconds": total,
        "by_op": ops,
        "agree": True,  # nothing to compare within one checkout
        "load_average": os.getloadavg(),
        "jax": jax.__version__,
    }


def print_by_op(out: dict) -> None:
    print(
        f"{out['architectures']} architectures ({out['source']}): {out['signatures']} layer "
        f"signatures compiled afresh in {out['seconds']:.2f} s"
    )
    rows = sorted(
        out["by_op"].items(), key=lambda kv: -sum(v for k, v in kv[1].items() if k != "count")
    )
    for name, r in rows:
        n, spent = r["count"], r["trace"] + r["lower"] + r["compile"]
        print(
            f"  {name:11s} {n:5d}  ms each: trace {1e3 * r['trace'] / n:5.1f}  lower "
            f"{1e3 * r['lower'] / n:5.1f}  compile {1e3 * r['compile'] / n:6.1f}  "
            f"share {100 * spent / out['seconds']:5.1f} %"
        )
    print("load average " + " ".join(f"{x:.2f}" for x in out["load_average"]))


def signatures(args) -> dict:
    """Distinct layer signatures of the architectures with `--channel-padding` (default
    `layerwise.CHANNEL_PADDING`) and without any, by operation: nothing compiles."""
    import jax

    from evojax_nas import dna as D
    from evojax_nas import layerwise

    dnas, source, _ = _sequence(args)
    b = Bench(args.dataset, args.steps, args.seed, args.channel_padding)
    counts = {}
    for name, padding in (("padded", b.channel_padding), ("unpadded", (1, 0))):
        recorder = SignatureRecorder()
        for dna in dnas:
            dna = D.for_data(dna, 1, 10)
            layerwise.build(dna, b.layout, b.cfg, b.impl, recorder, channel_padding=padding)
        by_op = _count_ops(recorder.signatures)
        counts[name] = {"total": len(recorder.signatures), "by_op": by_op}
    return {
        "source": source,
        "architectures": len(dnas),
        "channel_padding": b.channel_padding,
        "signatures": counts,
        "agree": True,  # nothing to compare
        "jax": jax.__version__,
    }


def print_signatures(out: dict) -> None:
    multiple, above = out["channel_padding"]
    print(f"{out['architectures']} architectures ({out['source']}): distinct layer signatures")
    for name, c in out["signatures"].items():
        how = f"depths above {above} padded to a multiple of {multiple}" if name == "padded" else ""
        print(f"  {name:<9} {c['total']:5d}  {how}  {c['by_op']}")


def second_worker(args) -> dict:
    """A first worker compiles the layer programs of the architectures into a run's store; a
    second (cold) worker loads them from there: seconds, counts and bytes of both."""
    import tempfile

    import jax

    from evojax_nas import dna as D
    from evojax_nas.layerwise import OpCache
    from evojax_nas.model import init_variables
    from evojax_nas.programs import SharedLayers
    from evojax_nas.store import open_store

    dnas, source, _ = _sequence(args)
    b = Bench(args.dataset, args.steps, args.seed, args.channel_padding)
    workers: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-layers-") as tmp:
        store = open_store(tmp)
        for name in ("first", "second"):  # the second starts when the first has shared all
            b.cache = cache = OpCache(b.options, shared=SharedLayers(store, b.target))
            t = {"obtain": 0.0, "build": 0.0, "train": 0.0, "eval": 0.0, "correct": 0}
            for i, dna in enumerate(dnas):
                dna = D.for_data(dna, 1, 10)
                row = b.layerwise(dna, init_variables(dna, jax.random.fold_in(b.key, i)))
                t["obtain"] += row["compile_new_signatures"]
                t["build"] += row["compile"]
                for k in ("train", "eval", "correct"):
                    t[k] += row[k]
            workers[name] = t | {"compiles": cache.compiles, "loads": cache.loads}
        folder = os.path.join(tmp, *SharedLayers(store, b.target).folder.split("/"))
        files = os.listdir(folder) if os.path.isdir(folder) else []  # none: nothing shared
        sizes = [os.path.getsize(os.path.join(folder, f)) for f in files]
    first, second = workers["first"], workers["second"]
    return {
        "source": source,
        "architectures": len(dnas),
        "steps": args.steps,
        "workers": workers,
        "obtain_ratio": first["obtain"] / max(second["obtain"], 1e-9),
        "build_ratio": first["build"] / max(second["build"], 1e-9),
        "ms_per_compile": 1e3 * first["obtain"] / max(first["compiles"], 1),
        "ms_per_load": 1e3 * second["obtain"] / max(second["loads"], 1),
        "shared_programs": len(sizes),
        "shared_bytes": sum(sizes),
        "agree": first["correct"] == second["correct"] and second["compiles"] == 0,
        "load_average": os.getloadavg(),
        "jax": jax.__version__,
    }


def print_second_worker(out: dict) -> None:
    print(f"{out['architectures']} architectures ({out['source']}), {out['steps']} steps each")
    for name, t in out["workers"].items():
        print(
            f"  {name:<7} {t['compiles']:4d} compiled, {t['loads']:4d} loaded: obtaining layer "
            f"programs {t['obtain']:6.2f} s, building nets {t['build']:6.2f} s, train "
            f"{t['train']:6.2f} s, eval {t['eval']:5.2f} s, correct {t['correct']}"
        )
    print(
        f"first ÷ second: obtaining {out['obtain_ratio']:.1f}x, building {out['build_ratio']:.1f}x"
        f" ({out['ms_per_compile']:.1f} ms per compile, {out['ms_per_load']:.1f} ms per load); "
        f"store: {out['shared_programs']} programs, {out['shared_bytes'] / 2**20:.1f} MiB "
        f"({out['shared_bytes'] / max(out['shared_programs'], 1) / 1024:.0f} KiB each); "
        f"{'agree' if out['agree'] else 'DISAGREE'}"
    )
    print(f"load average {' '.join(f'{x:.2f}' for x in out['load_average'])}")


def _sequence(args) -> tuple[list, str, float | None]:
    """The architectures `args` names (a run's or a seeded chain's), sliced; where they come
    from; and the run's share of new architectures (None for a chain)."""
    if args.run:
        dnas, fraction = run_dnas(args.run)
        source = f"run {args.run}"
    else:
        dnas, fraction = chain_dnas(args.mutations, args.seed, 1, 10), None
        source = f"seeded chain of {args.mutations} mutations (seed {args.seed})"
    return dnas[args.start : args.start + args.limit], source, fraction


def _count_ops(signatures) -> dict:
    """Signatures (an `OpCache`'s programs or a `SignatureRecorder`'s keys) by operation."""
    counts: dict = {}
    for sig in signatures:
        counts[sig[0]] = counts.get(sig[0], 0) + 1
    return counts


# ---------------------------------------------------------------------------------- printing


def print_row(row: dict, steps: int) -> None:
    w, lw = row["whole"], row["layerwise"]
    print(
        f"{row['index']:3d} conv {row['convs']:2d}  whole: compile {w['compile']:5.2f} s "
        f"train {w['train']:5.2f} s eval {w['eval']:4.2f} s | layerwise: compile "
        f"{lw['compile']:5.2f} s ({lw['new_signatures']:2d} new) train {lw['train']:5.2f} s "
        f"eval {lw['eval']:4.2f} s ({lw['calls_per_step']} calls/step)",
        flush=True,
    )


def print_options(out: dict) -> None:
    print(
        f"{out['architectures']} architectures ({out['source']}), {out['steps']} steps each, "
        f"{out['signatures']} layer signatures ({out['signatures_before']} before); options now "
        f"{out['options']['now']}, before {out['options']['before']}; channel multiple now "
        f"{out['channel_padding']['now']}, before {out['channel_padding']['before']}"
    )
    for name, t in out["totals"].items():
        print(
            f"  {name:<7} compile {t['compile']:7.2f} s  train {t['train']:7.2f} s  "
            f"eval {t['eval']:6.2f} s  correct {t['correct']}"
        )
    r = out["ratio_before_over_now"]
    print(
        f"before ÷ now: compile {r['compile']:.2f}x, train {r['train']:.2f}x, eval "
        f"{r['eval']:.2f}x; correct answers differ by {out['answers_differ_by']} of "
        f"{out['answers']} ({'agree' if out['agree'] else 'DISAGREE'}: at most 0.1 % may)"
    )
    print(f"load average {' '.join(f'{x:.2f}' for x in out['load_average'])}")


def print_summary(out: dict) -> None:
    print(
        f"\n{out['architectures']} architectures ({out['source']}), {out['steps']} steps each, "
        f"{out['dataset_layout']} layout; {out['signatures']} distinct layer signatures "
        f"{out['signatures_by_op']}"
    )
    for path, t in out["totals"].items():
        print(
            f"  {path:<9} compile {t['compile']:7.1f} s  train {t['train']:7.1f} s  "
            f"eval {t['eval']:6.1f} s"
        )
    print("\nprojected per child (compile × share of new architectures + train + eval):")
    for name, paths in out["projection"].items():
        w, lw = paths["whole"], paths["layerwise"]
        print(
            f"  {name:<22} whole: {100 * w['non_training_share']:5.1f} % non-training, "
            f"{w['children_per_minute']:6.1f} children/min | layerwise: "
            f"{100 * lw['non_training_share']:5.1f} %, {lw['children_per_minute']:6.1f} "
            f"children/min ({lw['children_per_minute'] / w['children_per_minute']:.2f}x)"
        )
    check = out["check"]
    print(f"\nnumerical check (whole program vs layer-wise): {'ok' if check['ok'] else 'FAILED'}")
    for name, c in check.items():
        if isinstance(c, dict):
            worst = max(e["max_abs_err"] for e in c["errors"].values())
            print(f"  {name}: max abs error {worst:.2e}")
    print(f"load average {' '.join(f'{x:.2f}' for x in out['load_average'])}")


def main(argv=None) -> int:
    from evojax_nas.devices import apply_cpu_only_environment

    apply_cpu_only_environment()  # before JAX is imported: no libtpu warnings on a CPU host
    args = parse_args(argv)
    for flag, measure, show in (
        (args.compare_options, compare_options, print_options),
        (args.second_worker, second_worker, print_second_worker),
        (args.layers_only, layers_only, print_layers_only),
        (args.by_op, by_op, print_by_op),
        (args.signatures, signatures, print_signatures),
    ):
        if flag:
            out = measure(args)
            if args.save:
                with open(args.save, "w", encoding="utf-8") as f:
                    json.dump(out, f, indent=1)
            print(json.dumps(out)) if args.json else show(out)
            return 0 if out["agree"] else 1
    out = bench(args)
    if args.save:
        with open(args.save, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    if args.json:
        print(json.dumps(out))
    else:
        print_summary(out)
    return 0 if out["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Time one training step of our compiled JAX step against the equivalent PyTorch eager loop.

    .venv/bin/python scripts/bench_train_step.py            # both nets, ~2-3 min on 2 cores
    .venv/bin/python scripts/bench_train_step.py --nets conv4 --steps 5 --repeats 3   # ~40 s

Nets are the DNAs in evojax_nas/samples/bench_conv{4,8}.json (DESIGN §6): batch 50, 32x32x3,
fp32, SGD with momentum, weight decay, BN+ReLU after every convolution. Ours is trained
through `train.compile_programs` and the compiled step, exactly as evolution runs it (with
CIFAR augmentation inside the step); each `--impls` entry is a `TrainConfig.conv_impl`
("xla-default": XLA's own convolution with XLA's default options, i.e. before conv.py;
"custom-dilated": ours with a strided input gradient as one dilated convolution, as before;
"custom-maxrelu": ours with `jax.nn.relu` instead of `conv.stored_relu`, as before).
The baseline is PyTorch eager, channels_last, built from the same DNA (random flip only: its
augmentation costs are negligible next to the convolutions); it is skipped when torch is not
importable (it is not a dependency: `pip install torch==2.13.0 --index-url
https://download.pytorch.org/whl/cpu` into the venv to compare).
Variants are timed in turn within each repeat, so that the ratios see the same machine load.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from importlib import resources
from unittest import mock

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nets", nargs="+", default=["conv4", "conv8"], choices=["conv4", "conv8"])
    p.add_argument(
        "--impls",
        nargs="+",
        default=["xla-default", "xla", "custom"],
        help="conv_impl values; NAME-default compiles with XLA's default options (no "
        "conv.compiler_options), as before the custom convolution; custom-dilated computes a "
        "strided layer's input gradient as one dilated convolution (conv.uses_phases off), as "
        "before 2026-11-30; custom-maxrelu uses jax.nn.relu (as before conv.stored_relu)",
    )
    p.add_argument("--steps", type=int, default=None, help="steps per repeat (conv4 10, conv8 3)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--steps-per-dispatch",
        type=int,
        nargs="+",
        default=None,
        metavar="K",
        help="training steps per compiled call, one variant each (default: the steps per "
        "repeat, as evolution's chunks; at most the synthetic set's 20 batches)",
    )
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    p.add_argument(
        "--torch-device",
        default="cpu",
        help="where the PyTorch baseline runs: cpu (default) or cuda (a GPU, as JAX there)",
    )
    p.add_argument(
        "--xla-flags",
        default=None,
        help="set XLA_FLAGS in this process before JAX starts, e.g. "
        "'--xla_cpu_experimental_ynn_fusion_type='",
    )
    return p.parse_args(argv)


def load_dna(name: str):
    from evojax_nas import dna as dna_lib

    text = resources.files("evojax_nas.samples").joinpath(f"bench_{name}.json").read_text()
    return dna_lib.from_json(text)


def synthetic_dataset(n: int = 1000):
    from evojax_nas.data import Dataset

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.int32)
    return Dataset(
        "bench", x, y, x[:250], y[:250], 10, (125.0, 123.0, 114.0), (63.0, 62.0, 66.0), "cifar"
    )


class Timed:
    """A variant, set up: `run(steps)` returns the seconds that `steps` steps took."""

    def __init__(self, name: str, run, flops: float):
        self.name, self.run, self.flops = name, run, flops
        self.times: list[float] = []


def jax_variant(
    dna, impl: str, dataset, steps_hint: int, per_call: int | None = None
) -> tuple[Timed, dict[str, float]]:
    import jax

    from evojax_nas import conv as conv_lib
    from evojax_nas import model as model_lib
    from evojax_nas import programs as programs_lib
    from evojax_nas.model import init_variables
    from evojax_nas.programs import Layout, Target, chunk_length, compile_programs
    from evojax_nas.train import TrainConfig, TrainState, input_pipeline
    from evojax_nas.train import make_optimizer as optimizer

    conv_impl = impl.removesuffix("-default").removesuffix("-dilated").removesuffix("-maxrelu")
    name = f"jax {impl}" + (f" k={per_call}" if per_call else "")
    per_call = per_call or max(1, min(100, steps_hint))  # chunks as long as the timed runs
    config = TrainConfig(
        steps=steps_hint, batch_size=50, conv_impl=conv_impl, steps_per_dispatch=per_call
    )
    t0 = time.perf_counter()
    variables = init_variables(dna, jax.random.PRNGKey(0))
    t1 = time.perf_counter()
    options = programs_lib.compiler_options if not impl.endswith("-default") else (lambda *_: {})
    phases = conv_lib.uses_phases if not impl.endswith("-dilated") else (lambda *_: False)
    relu_for = model_lib.relu_for if not impl.endswith("-maxrelu") else (lambda _: jax.nn.relu)
    with (
        mock.patch.object(programs_lib, "compiler_options", options),
        mock.patch.object(conv_lib, "uses_phases", phases),
        mock.patch.object(model_lib, "relu_for", relu_for),
    ):
        layout = Layout.of(dataset)
        programs, _ = compile_programs(dna, layout, config, Target.local())
    k = chunk_length(layout, config)
    batches = input_pipeline(layout, config.batch_size, k)
    t2 = time.perf_counter()
    params = jax.device_put(variables["params"])
    stats = jax.device_put(variables["batch_stats"])
    holder = [TrainState(params, stats, optimizer(config).init(params), jax.numpy.asarray(False))]
    x, y = jax.device_put(dataset.x_train), jax.device_put(dataset.y_train)
    perm = jax.device_put(np.random.default_rng(1).permutation(len(y)).astype(np.int32))
    key, lr = jax.random.PRNGKey(1), np.float32(0.01)
    counter = [0]

    def run(steps: int) -> float:
        start = time.perf_counter()
        state = holder[0]
        done = 0
        while done < steps:  # as evolution runs it: a chunk of prepared batches per call
            n = min(k, steps - done)
            xb, yb = batches(x, y, perm, np.int32(counter[0]), key)
            state = programs.train_chunk(state, xb, yb, np.int32(n), lr)
            counter[0] += n
            done += n
        jax.block_until_ready(state)
        holder[0] = state
        return time.perf_counter() - start

    run(1)  # the first dispatch allocates; keep it out of the timings
    timings = {"init": t1 - t0, "compile": t2 - t1}
    return Timed(name, run, programs.flops_train_step), timings


def torch_variant(dna, dataset, flops: float, device: str = "cpu") -> Timed:
    """PyTorch eager on `device`; the data lives there, as ours does on JAX's device."""
    import torch

    torch.manual_seed(0)
    dev = torch.device(device)
    model = TorchNet(dna, torch).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    mean = torch.tensor([125.0, 123.0, 114.0], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([63.0, 62.0, 66.0], device=dev).view(1, 3, 1, 1)
    x_all = torch.from_numpy(dataset.x_train).permute(0, 3, 1, 2).float().to(dev)
    y_all = torch.from_numpy(dataset.y_train).long().to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(0, len(y_all), (50,), generator=gen, device=dev)
            xb = (x_all[idx] - mean) / std
            flip = torch.rand(50, 1, 1, 1, generator=gen, device=dev) < 0.5
            xb = torch.where(flip, xb.flip(3), xb).contiguous(memory_format=torch.channels_last)
            loss = torch.nn.functional.cross_entropy(model(xb), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # the GPU runs behind the Python loop
        return time.perf_counter() - start

    run(1)
    return Timed(f"torch eager {dev.type}", run, flops)


def TorchNet(dna, torch):  # noqa: N802 - builds a class only when torch is there
    """The DNA's network in PyTorch (same convolutions, BN+ReLU, skips, pooling, output)."""
    from evojax_nas.dna import topological_order, vertex_shapes

    nn = torch.nn
    shapes = vertex_shapes(dna)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleDict()
            self.bns = nn.ModuleDict()
            for e in dna.conv_edges():
                kh, kw = e.filter_shape
                self.convs[str(e.id)] = nn.Conv2d(
                    shapes[e.src].depth,
                    shapes[e.dst].depth,
                    (kh, kw),
                    stride=2**e.stride_log2,
                    padding=(kh // 2, kw // 2),
                    bias=False,
                )
            for v in dna.vertices:
                if v.kind == "bn_relu":
                    self.bns[str(v.id)] = nn.BatchNorm2d(shapes[v.id].depth, momentum=0.1)
            self.out = nn.Linear(shapes[dna.output_vertex.id].depth, dna.num_classes)

        def forward(self, x):
            acts = {}
            for vid in topological_order(dna):
                if dna.vertex(vid).role == "input":
                    acts[vid] = x
                    continue
                ins = []
                for e in dna.in_edges(vid):
                    h = acts[e.src]
                    ins.append(self.convs[str(e.id)](h) if e.is_conv else h)
                h = ins[0]
                for other in ins[1:]:
                    step = other.shape[2] // h.shape[2]
                    other = other[:, : h.shape[1], ::step, ::step]
                    if other.shape[1] < h.shape[1]:
                        pad = h.shape[1] - other.shape[1]
                        other = torch.nn.functional.pad(other, (0, 0, 0, 0, 0, pad))
                    h = h + other
                if dna.vertex(vid).kind == "bn_relu":
                    h = torch.relu(self.bns[str(vid)](h))
                acts[vid] = h
            return self.out(acts[dna.output_vertex.id].mean((2, 3)))

    return Net()


def report(net: str, variants: list[Timed], steps: int) -> None:
    print(f"\n{net}: {variants[0].flops / 1e9:.2f} GFLOP per train step (XLA cost analysis)")
    first = variants[0]
    print(
        f"  {'variant':<20} {'min s/step':>10} {'median':>8} {'GFLOP/s':>8}  torch/ours"
        f"{'':<19}{first.name}/ours"
    )
    baseline = next((v for v in variants if v.name.startswith("torch")), None)

    def paired(a: Timed, b: Timed) -> str:  # a's time / b's, per repeat: the same load
        pairs = [ta / tb for ta, tb in zip(a.times, b.times, strict=True)]
        return f"{statistics.median(pairs):.2f} (min/min {min(a.times) / min(b.times):.2f})"

    for v in variants:
        per = [t / steps for t in v.times]
        lo, med = min(per), statistics.median(per)
        ratio = paired(baseline, v) if baseline is not None and v is not baseline else ""
        mine = paired(first, v) if v is not first and v is not baseline else ""
        print(
            f"  {v.name:<20} {lo:>10.4f} {med:>8.4f} {v.flops / lo / 1e9:>8.1f}  {ratio:<28} {mine}"
        )


def main(argv: list[str] | None = None) -> int:
    from evojax_nas.devices import apply_cpu_only_environment

    apply_cpu_only_environment()  # before JAX is imported: no libtpu warnings on a CPU host
    args = parse_args(argv)
    if args.xla_flags is not None:
        # XLA reads its flags once, when the backend starts: this must precede any JAX work.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    import jax

    try:
        import torch
    except ImportError:
        torch = None
        if not args.no_torch:
            print("torch is not importable: the PyTorch baseline is skipped")
    use_torch = torch is not None and not args.no_torch
    if use_torch:
        torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPUs)"
        + (f", torch {torch.__version__} on {args.torch_device}" if use_torch else "")
        + f", XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    dataset = synthetic_dataset()
    for net in args.nets:
        dna = load_dna(net)
        steps = args.steps or {"conv4": 10, "conv8": 3}[net]
        variants: list[Timed] = []
        for impl, per_call in itertools.product(args.impls, args.steps_per_dispatch or [None]):
            v, t = jax_variant(dna, impl, dataset, steps, per_call)
            print(f"{net} {v.name}: init {t['init']:.3f} s, trace+compile {t['compile']:.2f} s")
            variants.append(v)
        if use_torch:
            variants.append(torch_variant(dna, dataset, variants[0].flops, args.torch_device))
        for _ in range(args.repeats):
            for v in variants:
                v.times.append(v.run(steps))
        report(net, variants, steps)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

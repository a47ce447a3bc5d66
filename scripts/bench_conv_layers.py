"""Where a training step's convolution time goes, layer by layer, against PyTorch's.

    .venv/bin/python scripts/bench_conv_layers.py            # bench_conv4's layers, batch 50
    .venv/bin/python scripts/bench_conv_layers.py --net conv8
    .venv/bin/python scripts/bench_conv_layers.py --tiny     # seconds: the test's mode

`scripts/bench_train_step.py` times whole training steps. This splits the convolutions of a
sample net (`evojax_nas/samples/bench_<net>.json`, 32x32x3 inputs) into the three products a
step computes for each layer: the forward pass, the input's gradient and the kernel's gradient.
Ours are `conv.conv2d` and its VJP, each jitted alone under `conv.compiler_options()` (what a
whole training program uses). PyTorch's are `conv2d`, `nn.grad.conv2d_input` and
`conv2d_weight` on channels_last tensors, with as many threads as CPUs. PyTorch is not a
dependency: `pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu` into
the venv to compare; without it only ours are timed. A training step does not need the first
layer's input gradient (its input is the data); it is timed anyway. Milliseconds: the minimum
over `--repeats` of the mean of `--calls` calls, ours and PyTorch's alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import time

PRODUCTS = ("fwd", "dx", "dw")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", choices=["conv4", "conv8"], default="conv4")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--size", type=int, default=32, help="input height and width")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-torch", action="store_true", help="time ours only")
    p.add_argument("--tiny", action="store_true", help="batch 2, 8x8, few calls, ours only")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.size, args.calls, args.repeats, args.no_torch = 2, 8, 2, 1, True
    return args


def layers(net: str, size: int) -> list[dict]:
    """The convolutions of sample net `net` on `size`x`size` inputs, in the DNA's edge order."""
    from evojax_nas.dna import vertex_shapes
    from evojax_nas.samples import read_dna

    dna = read_dna(f"bench_{net}")
    shapes = vertex_shapes(dna)
    out = []
    for e in dna.conv_edges():
        src = shapes[e.src]
        out.append(
            {
                "edge": e.id,
                "size": -(-size // 2**src.scale_log2),
                "cin": src.depth,
                "cout": shapes[e.dst].depth,
                "kernel": tuple(e.filter_shape),
                "stride": 2**e.stride_log2,
            }
        )
    return out


def _time(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        out = fn()
    if hasattr(out, "block_until_ready"):
        out.block_until_ready()
    return (time.perf_counter() - start) / calls


def ours(layer: dict, batch: int) -> dict:
    """Zero-argument callables of our three products for `layer` (compiled, warmed up)."""
    import jax
    import numpy as np

    from evojax_nas import conv as C

    rng = np.random.default_rng(0)
    n, s = layer["size"], layer["stride"]
    kh, kw = layer["kernel"]
    x = jax.numpy.asarray(rng.standard_normal((batch, n, n, layer["cin"]), np.float32))
    w = jax.numpy.asarray(rng.standard_normal((kh, kw, layer["cin"], layer["cout"]), np.float32))
    opts = C.compiler_options()
    fwd = jax.jit(lambda x, w: C.conv2d(x, w, s), compiler_options=opts)
    dy = jax.numpy.ones_like(fwd(x, w))

    def grad(i):
        return jax.jit(
            lambda x, w, dy: jax.vjp(lambda x, w: C.conv2d(x, w, s), x, w)[1](dy)[i],
            compiler_options=opts,
        )

    dx, dw = grad(0), grad(1)
    fns = {"fwd": lambda: fwd(x, w), "dx": lambda: dx(x, w, dy), "dw": lambda: dw(x, w, dy)}
    for f in fns.values():
        jax.block_until_ready(f())
    return fns


def theirs(layer: dict, batch: int, torch) -> dict:
    """PyTorch's three products for `layer` (channels_last, padding kernel // 2)."""
    n, s = layer["size"], layer["stride"]
    kh, kw = layer["kernel"]
    cl = torch.channels_last
    x = torch.randn(batch, layer["cin"], n, n).contiguous(memory_format=cl)
    w = torch.randn(layer["cout"], layer["cin"], kh, kw).contiguous(memory_format=cl)
    pad = (kh // 2, kw // 2)
    conv = torch.nn.functional.conv2d
    dy = torch.ones_like(conv(x, w, stride=s, padding=pad)).contiguous(memory_format=cl)
    grad = torch.nn.grad
    return {
        "fwd": lambda: conv(x, w, stride=s, padding=pad),
        "dx": lambda: grad.conv2d_input(x.shape, w, dy, stride=s, padding=pad),
        "dw": lambda: grad.conv2d_weight(x, w.shape, dy, stride=s, padding=pad),
    }


def bench(args) -> dict:
    torch = None
    if not args.no_torch:
        try:
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
        except ImportError:
            torch = None
    rows = []
    for layer in layers(args.net, args.size):
        variants = {"ours": ours(layer, args.batch)}
        if torch is not None:
            variants["torch"] = theirs(layer, args.batch, torch)
        ms = {name: {p: float("inf") for p in PRODUCTS} for name in variants}
        for _ in range(args.repeats):
            for product in PRODUCTS:
                for name, fns in variants.items():
                    t = _time(fns[product], args.calls)
                    ms[name][product] = min(ms[name][product], 1e3 * t)
        rows.append({**layer, "ms": ms})
    totals = {
        name: {p: sum(r["ms"][name][p] for r in rows) for p in PRODUCTS} for name in rows[0]["ms"]
    }
    return {"net": args.net, "batch": args.batch, "rows": rows, "totals_ms": totals}


def report(res: dict) -> None:
    names = list(res["totals_ms"])
    print(f"{res['net']}, batch {res['batch']}: ms per call (min over repeats)")
    head = "".join(f" {n}:{p:<4}" for n in names for p in PRODUCTS)
    print(f"  {'layer':<24}{head}")
    for r in res["rows"]:
        kh, kw = r["kernel"]
        name = f"{r['size']}² {r['cin']}→{r['cout']} {kh}x{kw}/{r['stride']}"
        cells = "".join(f" {r['ms'][n][p]:>{len(n) + 5}.2f}" for n in names for p in PRODUCTS)
        print(f"  {name:<24}{cells}")
    t = res["totals_ms"]
    cells = "".join(f" {t[n][p]:>{len(n) + 5}.2f}" for n in names for p in PRODUCTS)
    print(f"  {'total':<24}{cells}")
    if "torch" in t:
        ratios = ", ".join(f"{p} {t['torch'][p] / t['ours'][p]:.2f}" for p in PRODUCTS)
        print(f"  PyTorch time ÷ ours: {ratios}")


def main(argv=None) -> int:
    from evojax_nas.devices import apply_cpu_only_environment

    apply_cpu_only_environment()  # before JAX is imported: no libtpu warnings on a CPU host
    args = parse_args(argv)
    res = bench(args)
    if args.json:
        print(json.dumps(res))
    else:
        report(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

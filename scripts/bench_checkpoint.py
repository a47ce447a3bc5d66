"""Time a child's checkpoint: packed (`store._checkpoint.save`, one orbax array per dtype) against
unpacked (orbax's own tree of every array, as the store wrote checkpoints before packing).

    .venv/bin/python scripts/bench_checkpoint.py              # 4, 16 and 40 arrays, ~1 min
    .venv/bin/python scripts/bench_checkpoint.py --tiny       # seconds: the test's mode

A default-job net has one kernel per convolution and four arrays per BN vertex (scale, bias,
mean, variance): 4-50 arrays. Each size is saved and restored `--repeats` times both ways, in
alternating order; printed: wall and CPU milliseconds (all the process's threads: orbax writes
on its own) per save and per restore, and unpacked ÷ packed.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arrays", type=int, nargs="+", default=[4, 16, 40])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--tiny", action="store_true", help="2 and 6 arrays, 2 repeats")
    args = p.parse_args(argv)
    if args.tiny:
        args.arrays, args.repeats = [2, 6], 2
    return args


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def params_of(arrays: int, seed: int = 0) -> dict:
    """`arrays` arrays: 3x3x16x16 kernels and 16-vectors, two per module."""
    rng = np.random.default_rng(seed)
    return {
        f"m{i}": {
            "kernel": rng.standard_normal((3, 3, 16, 16)).astype(np.float32),
            "scale": np.ones(16, np.float32),
        }
        for i in range(arrays // 2)
    } | ({"out": {"bias": np.zeros(10, np.float32)}} if arrays % 2 else {})


def unpacked_save(params: dict, directory: str) -> None:
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(directory), {"params": params})


def bench(args) -> list[dict]:
    from evojax_nas.store import _checkpoint

    ways = {"packed": _checkpoint.save, "unpacked": unpacked_save}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        for n in args.arrays:
            params = params_of(n)
            spent = {w: {"save": [0.0, 0.0], "restore": [0.0, 0.0]} for w in ways}
            for i in range(args.repeats + 1):  # the first round warms up orbax, uncounted
                for way in ways if i % 2 == 0 else reversed(list(ways)):
                    d = os.path.join(tmp, f"{way}-{n}-{i}")
                    for op, fn in (
                        ("save", lambda: ways[way](params, d)),  # noqa: B023
                        ("restore", lambda: _checkpoint.restore(d, d)),  # noqa: B023
                    ):
                        w0, c0 = time.perf_counter(), _cpu()
                        out = fn()
                        if i:
                            spent[way][op][0] += time.perf_counter() - w0
                            spent[way][op][1] += _cpu() - c0
                    np.testing.assert_array_equal(out["m0"]["kernel"], params["m0"]["kernel"])
            rows.append(
                {
                    "arrays": n,
                    **{
                        f"{way}_{op}_ms": [1e3 * s / args.repeats for s in spent[way][op]]
                        for way in ways
                        for op in ("save", "restore")
                    },
                }
            )
    return rows


def main(argv=None) -> int:
    from evojax_nas.devices import apply_cpu_only_environment

    apply_cpu_only_environment()
    args = parse_args(argv)
    for r in bench(args):
        print(f"{r['arrays']} arrays (wall / CPU ms; unpacked / packed):")
        for op in ("save", "restore"):
            (pw, pc), (uw, uc) = r[f"packed_{op}_ms"], r[f"unpacked_{op}_ms"]
            print(
                f"  {op:8s} packed {pw:6.1f} / {pc:6.1f}  unpacked {uw:6.1f} / {uc:6.1f}  "
                f"ratio {uw / pw:4.2f}x / {uc / max(pc, 1e-9):4.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

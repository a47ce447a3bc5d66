"""Few-channel convolutions: tap sums against XLA's convolution, forward + backward, one run.

    .venv/bin/python scripts/bench_tap_conv.py            # batch 50, 28x28 (MNIST's shape)
    .venv/bin/python scripts/bench_tap_conv.py --tiny     # seconds: the test's mode

`evojax_nas.conv.conv2d` runs a convolution as a sum of shifted, scaled copies of its input
where `conv.uses_tap_sum` says so (at most `TAP_SUM_MAX_TERMS` multiply-adds per output pixel,
taps x in x out channels, or at most `TAP_SUM_FEW_INPUTS_MAX_TERMS` with at most
`TAP_SUM_FEW_INPUTS` input channels), forward and for the input's gradient (the kernel's
gradient stays a convolution). This prints, for each layer shape, the seconds of a jitted
forward + backward (`jax.grad` of a sum of squares) through each path, forced by replacing
`uses_tap_sum`, and the ratio convolution / tap sum (> 1: the tap sum is faster), then the
rule's own choice per direction (the forward and the input gradient decide apart: the input
gradient's input channels are the layer's outputs) and convolution / rule, so the rule can be
checked on a new machine. The median of `--repeats` timings of `--calls` calls each, the
paths alternating.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

# (in channels, out channels, kernel, stride): evolution's first layers, then wider ones.
SHAPES = (
    (1, 1, 3, 1),
    (1, 2, 3, 1),
    (2, 2, 3, 1),
    (2, 2, 5, 1),
    (2, 4, 3, 2),
    (4, 4, 3, 1),
    (4, 4, 5, 1),
    (4, 8, 3, 1),
    (8, 8, 3, 1),
    (3, 32, 3, 1),
    (1, 64, 3, 1),
    (3, 16, 5, 1),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--size", type=int, default=28, help="image height and width")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="two small shapes, few calls")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.size, args.calls, args.repeats = 4, 8, 2, 2
    return args


def bench(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from evojax_nas import conv as C

    by_default = C.uses_tap_sum
    rng = np.random.default_rng(0)
    rows = []
    for cin, cout, k, stride in SHAPES[:2] if args.tiny else SHAPES:
        x = jnp.asarray(rng.standard_normal((args.batch, args.size, args.size, cin)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)
        fns = {}
        rules = {"tap_sum": lambda *_: True, "convolution": lambda *_: False, "rule": by_default}
        for path, rule in rules.items():
            C.uses_tap_sum = rule  # read at trace time
            try:
                fn = jax.jit(
                    jax.grad(lambda x, w, s=stride: jnp.sum(C.conv2d(x, w, s) ** 2), (0, 1))
                )
                fns[path] = (fn, jax.block_until_ready(fn(x, w)))
            finally:
                C.uses_tap_sum = by_default
        (da, wa), (db, wb) = fns["tap_sum"][1], fns["convolution"][1]
        error = max(
            float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in ((da, db), (wa, wb))
        )
        times: dict = {path: [] for path in fns}
        for _ in range(args.repeats):
            for path, (fn, _) in fns.items():
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    out = fn(x, w)
                jax.block_until_ready(out)
                times[path].append((time.perf_counter() - t0) / args.calls)
        med = {path: statistics.median(t) for path, t in times.items()}
        rows.append(
            {
                "shape": [cin, cout, k, stride],
                "terms": k * k * cin * cout,
                "tap_sum_by_default": by_default(k, k, cin, cout),
                "input_grad_tap_sum_by_default": by_default(k, k, cout, cin),
                "seconds": med,
                "ratio": med["convolution"] / med["tap_sum"],
                "rule_ratio": med["convolution"] / med["rule"],
                "max_rel_error": error,
            }
        )
    bounds = [C.TAP_SUM_MAX_TERMS, C.TAP_SUM_FEW_INPUTS, C.TAP_SUM_FEW_INPUTS_MAX_TERMS]
    return {"batch": args.batch, "size": args.size, "bounds": bounds, "rows": rows}


def main(argv=None) -> int:
    from evojax_nas.devices import apply_cpu_only_environment

    apply_cpu_only_environment()  # before JAX is imported: no libtpu warnings on a CPU host
    args = parse_args(argv)
    out = bench(args)
    if args.json:
        print(json.dumps(out))
        return 0
    print(
        f"batch {out['batch']}, {out['size']}x{out['size']}, forward + backward; "
        "tap sum up to {} terms, or {} with at most {} input channels".format(
            out["bounds"][0], out["bounds"][2], out["bounds"][1]
        )
    )
    print("  (the rule: forward / input gradient, each a tap sum or a convolution)")
    paths = {True: "tap", False: "conv"}
    for r in out["rows"]:
        cin, cout, k, stride = r["shape"]
        s = r["seconds"]
        print(
            f"  {cin:2d}->{cout:<2d} {k}x{k}/{stride} ({r['terms']:4d} terms, "
            f"rule: {paths[r['tap_sum_by_default']]}/{paths[r['input_grad_tap_sum_by_default']]}"
            f"): tap sum {1e3 * s['tap_sum']:6.3f} ms, convolution {1e3 * s['convolution']:6.3f}"
            f" ms, ratio {r['ratio']:5.2f}x; the rule {1e3 * s['rule']:6.3f} ms,"
            f" {r['rule_ratio']:5.2f}x  (rel. error {r['max_rel_error']:.1e})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
